"""Every script in examples/ runs as written."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import soundfile
from conftest import waveform

EXAMPLES = Path(__file__).parent.parent / "examples"


def run(*args: str, env: dict | None = None) -> str:
    result = subprocess.run([sys.executable, *args], capture_output=True, text=True, timeout=300, env=env)
    assert result.returncode == 0, result.stderr
    return result.stdout


def test_quickstart_offline_with_packaged_model(tmp_path):
    # As a newcomer runs it: no arguments, no network, an empty Hub cache.
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_HUB_CACHE=str(tmp_path / "hub"), HF_HOME=str(tmp_path / "home"))
    out = run(str(EXAMPLES / "quickstart.py"), env=env)
    assert "frame model, width 256, 6 blocks" in out
    assert "clip embedding: (1, 1536)" in out
    assert "frame embeddings: (1, 263, 256) first timestamps (ms): [15.0, 55.0, 95.0]" in out
    assert not (tmp_path / "hub").exists()


@pytest.mark.slow
def test_quickstart_checkpoint_and_audio_file(clip_small_ckpt, tmp_path):
    path = tmp_path / "speech.flac"
    soundfile.write(path, waveform(2.0, 3), 16000)
    out = run(str(EXAMPLES / "quickstart.py"), str(clip_small_ckpt), str(path))
    assert "clip model, width 384, 12 blocks" in out
    assert "clip embedding: (1, 9216)" in out
    assert "frame embeddings: (1, 50, 384)" in out


def needs_atst_train() -> None:
    import shutil

    pytest.importorskip("lightning")
    if not shutil.which("atst-train"):
        pytest.skip("atst-train is not installed as a command")


@pytest.mark.slow
def test_pretrain_tiny_example():
    needs_atst_train()
    out = run(str(EXAMPLES / "pretrain_tiny.py"))
    assert "trained model: width 64, 2 blocks; frames (1, " in out


@pytest.mark.slow
def test_finetune_and_tag_example():
    needs_atst_train()
    out = run(str(EXAMPLES / "finetune_and_tag.py"))
    assert "labels: ['chirp', 'knock']" in out
    tagged = out.splitlines()[-2:]  # atst-tag's table: the true class first
    clip = out.splitlines()[-3]
    assert tagged[0].split()[1] == Path(clip).parent.name


@pytest.mark.slow
def test_detect_events_example(tmp_path):
    needs_atst_train()
    out = run(str(EXAMPLES / "detect_events.py"), "--out", str(tmp_path))
    assert (tmp_path / "events.tsv").is_file() and len(list((tmp_path / "plots").glob("*.png"))) == 12
    assert "event-based (onset collar 0.2 s" in out and "s000.wav" not in out.split("event-based")[1]
    micro = float(out.split("event-based")[1].split("F1 micro ")[1].split(",")[0])
    assert micro >= 0.8


@pytest.mark.slow
def test_detect_events_atst_sed_example(tmp_path):
    """Offline, on a random-weight stand-in in the layout of ATST-SED's checkpoint: installed once with
    --checkpoint (as a file downloaded by hand), then loaded by name from the cache."""
    import torch
    from conftest import recipe_checkpoint

    torch.save(recipe_checkpoint("atst_sed_small"), tmp_path / "Stage2_wo_ext.ckpt")
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_HUB_CACHE=str(tmp_path / "hub"), HF_HOME=str(tmp_path / "home"))
    script = str(EXAMPLES / "detect_events_atst_sed.py")
    first = run(script, "--checkpoint", str(tmp_path / "Stage2_wo_ext.ckpt"), "--out", str(tmp_path / "one"), env=env)
    assert "installing" in first and "atst-sed-desed: 10 classes" in first and "'combine': 'union'" in first
    again = run(script, "--out", str(tmp_path / "two"), env=env)  # the cache only
    assert first.split("\n", 1)[1].replace("one", "two") == again
    assert (tmp_path / "two" / "speech-demo-nogo.png").stat().st_size > 10_000
    rows = (tmp_path / "two" / "events.tsv").read_text().splitlines()
    assert rows[0].split("\t") == ["filename", "onset", "offset", "event_label", "score"]
    assert len(rows) - 1 == int(again.split("speech-demo-nogo.flac: ")[1].split()[0])
