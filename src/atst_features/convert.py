"""Checkpoint file -> model folder in our format, verified: the folder appears only once its outputs
equal the source checkpoint's, bit for bit. Used by ``atst-convert`` and by the official downloads."""

from __future__ import annotations

import dataclasses
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from .audio import SAMPLE_RATE
from .checkpoints import CheckpointContents, build_model, read_checkpoint
from .errors import CheckpointError, InputError
from .files import WEIGHTS_NAME, sha256_of
from .model import ATSTModel
from .pretrained import DEFAULT_LICENSE, read_pretrained, save_pretrained

__all__ = ["Conversion", "convert_checkpoint", "same_outputs"]


@dataclass(frozen=True)
class Conversion:
    """What :func:`convert_checkpoint` did: the folder written, the model, sizes and digests."""

    folder: Path
    model: ATSTModel
    layout: str
    source_bytes: int
    source_sha256: str
    weights_bytes: int
    weights_sha256: str


def _probe_audio() -> np.ndarray:
    """12 s of chirp and noise: two 10 s windows, two ATST-Clip chunks, exercises every path."""
    rate = SAMPLE_RATE
    t = np.arange(12 * rate) / rate
    noise = np.random.default_rng(0).standard_normal(t.size)
    return (0.3 * np.sin(2 * np.pi * (100 + 300 * t) * t) + 0.05 * noise).astype(np.float32)


def same_outputs(a: ATSTModel, b: ATSTModel) -> bool:
    """Whether two models give identical frame and clip embeddings (all blocks) and head outputs on
    12 s of probe audio."""
    audio = _probe_audio()
    checks = [
        (a.get_frame_embeddings(audio, n_blocks=a.depth)[0], b.get_frame_embeddings(audio, n_blocks=b.depth)[0]),
        (a.get_clip_embedding(audio, n_blocks=a.depth), b.get_clip_embedding(audio, n_blocks=b.depth)),
    ]
    if a.head_spec is not None:
        checks.append((a.head_spec.predict(a, audio), a.head_spec.predict(b, audio)))
    return all(torch.equal(x, y) for x, y in checks)


def convert_checkpoint(
    source: str | os.PathLike,
    out_dir: str | os.PathLike,
    *,
    license: str = DEFAULT_LICENSE,
    provenance: dict | None = None,
    overwrite: bool = False,
    source_sha256: str | None = None,
    config_overrides: dict | None = None,
    check: Callable[[CheckpointContents], None] | None = None,
) -> Conversion:
    """Convert a checkpoint file (any layout :func:`~atst_features.load_model` reads) into a folder in
    our format at ``out_dir``, written beside it first and renamed into place once verified.

    ``provenance``: extra fields for ``config.json`` (the source file's name, sha256, layout and
    hyperparameters are always recorded; ``source_sha256``: the file's digest when the caller has it
    already). ``config_overrides``: fields of the model's config to set that the checkpoint does not
    hold (a registry entry's class names and detection settings); ``check``: called with what the
    file holds before they are set, raises if it is not what the caller expects (a registry entry's
    kind of model and head). :class:`InputError` if ``out_dir``
    is not empty and ``overwrite`` is false; :class:`CheckpointError` if the source is not a
    checkpoint, or not one the overrides fit.
    """
    source, out_dir = Path(source), Path(out_dir)
    if out_dir.exists() and any(out_dir.iterdir()) and not overwrite:
        raise InputError(f"{str(out_dir)!r} exists and is not empty; pass overwrite=True (--overwrite) to replace it")
    source_sha256 = source_sha256 or sha256_of(source)
    contents = read_checkpoint(source)
    if check is not None:
        check(contents)
    if config_overrides:
        try:
            contents.config = dataclasses.replace(contents.config, **config_overrides)
        except InputError as error:
            raise CheckpointError(f"{str(source)!r}: {error}") from None
    model = build_model(contents)
    provenance = {
        "source_file": source.name,
        "source_sha256": source_sha256,
        "source_layout": contents.layout,
        "hyper_parameters": contents.hyper_parameters,
        **(provenance or {}),
    }
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", dir=out_dir.parent))
    try:
        save_pretrained(model, staging, provenance=provenance, license=license)
        if not same_outputs(model, build_model(read_pretrained(staging))):
            raise CheckpointError(f"{str(source)!r}: the converted model's outputs differ from the source's; nothing written")
        if out_dir.exists():
            shutil.rmtree(out_dir)
        staging.rename(out_dir)
    finally:
        if staging.exists():
            shutil.rmtree(staging)
    weights = out_dir / WEIGHTS_NAME
    return Conversion(
        folder=out_dir,
        model=model,
        layout=contents.layout,
        source_bytes=source.stat().st_size,
        source_sha256=source_sha256,
        weights_bytes=weights.stat().st_size,
        weights_sha256=sha256_of(weights),
    )
