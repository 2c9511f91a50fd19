"""The recording that ships with the package, so that examples run from any install."""

from __future__ import annotations

from importlib import resources
from pathlib import Path


def example_audio() -> Path:
    """Path of ``speech-demo-nogo.flac``: 10.5 s of English speech, mono, 8 kHz (resampled to 16 kHz
    when embedded), CC BY-SA 3.0; its origin and licence are in ``LICENSE.md`` beside it."""
    return Path(str(resources.files("atst_features") / "data" / "audio" / "speech-demo-nogo.flac"))

