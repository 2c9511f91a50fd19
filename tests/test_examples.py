"""Every script in examples/ runs as written."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import soundfile
from conftest import waveform

EXAMPLES = Path(__file__).parent.parent / "examples"


def run(*args: str) -> str:
    result = subprocess.run([sys.executable, *args], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    return result.stdout


def test_quickstart_synthetic_audio(frame_small_ckpt):
    out = run(str(EXAMPLES / "quickstart.py"), str(frame_small_ckpt))
    assert "frame model, width 384" in out
    assert "clip embedding: (1, 4608)" in out
    assert "frame embeddings: (1, 75, 384) first timestamps (ms): [15.0, 55.0, 95.0]" in out


def test_quickstart_audio_file(clip_small_ckpt, tmp_path):
    path = tmp_path / "speech.flac"
    soundfile.write(path, waveform(2.0, 3), 16000)
    out = run(str(EXAMPLES / "quickstart.py"), str(clip_small_ckpt), str(path))
    assert "clip model, width 384" in out
    assert "clip embedding: (1, 9216)" in out
    assert "frame embeddings: (1, 50, 384)" in out


def test_pretrain_tiny_example():
    import shutil

    import pytest

    pytest.importorskip("lightning")
    if not shutil.which("atst-train"):
        pytest.skip("atst-train is not installed as a command")
    out = run(str(EXAMPLES / "pretrain_tiny.py"))
    assert "trained model: width 64, 2 blocks; frames (1, " in out
