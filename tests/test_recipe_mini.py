"""recipes/mini: the corpus builder's cutting, splitting and safety rules, and the model card writer."""

from __future__ import annotations

import csv
import importlib.util
import json
import random
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

RECIPE = Path(__file__).parent.parent / "recipes" / "mini"


def load(name: str):
    spec = importlib.util.spec_from_file_location(f"recipe_{name}", RECIPE / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


corpus = load("build_corpus")
RATE = corpus.SAMPLE_RATE


def test_training_pieces_are_4_to_10_seconds():
    rng = random.Random(0)
    long = np.ones(int(95.3 * RATE), dtype=np.float32)
    pieces = corpus.training_pieces([long], rng)
    assert sum(len(p) for p in pieces) == len(long)  # cut, nothing lost
    assert all(4 * RATE <= len(p) <= 10 * RATE for p in pieces)
    shorts = [np.ones(int(s * RATE), dtype=np.float32) for s in (0.5, 1.2, 3.0, 2.2, 0.8, 1.9, 2.5, 3.3)]
    joined = corpus.training_pieces(shorts, rng)
    assert all(len(p) <= 10 * RATE for p in joined) and all(len(p) >= 4 * RATE for p in joined[:-1])


def test_eval_clips_are_evenly_spaced_and_at_most_4_seconds():
    audio = np.arange(20 * RATE, dtype=np.float32)
    clips = corpus.eval_clips(audio, 3)
    assert [len(c) for c in clips] == [4 * RATE] * 3
    assert [int(c[0]) for c in clips] == [0, 8 * RATE, 16 * RATE]
    assert len(corpus.eval_clips(audio[: 2 * RATE], 3)[0]) == 2 * RATE


def test_probe_splits_never_share_a_group():
    rows = [dict(label=label, group=f"{label}{i // 2}") for label in ("a", "b") for i in range(20)]
    corpus.assign_probe_splits(rows, random.Random(0))
    for group in {r["group"] for r in rows}:
        assert len({r["split"] for r in rows if r["group"] == group}) == 1
    for label in ("a", "b"):
        assert {r["split"] for r in rows if r["label"] == label} == {"train", "test"}


def test_drum_loops_play_recorded_hits(tmp_path):
    import soundfile

    for name, freq in (("kick.wav", 60), ("snare.wav", 200), ("hihat.wav", 5000)):
        t = np.arange(int(0.4 * RATE)) / RATE  # hits under MIN_SECONDS (0.3 s) are skipped, as everywhere
        soundfile.write(tmp_path / name, (0.5 * np.sin(2 * np.pi * freq * t) * np.exp(-20 * t)).astype(np.float32), RATE)
    loops = corpus.drum_loops(sorted(tmp_path.glob("*.wav")), 4.0, 3, random.Random(0))
    assert len(loops) == 3 and all(len(loop) == 4 * RATE for loop in loops)
    assert all(0.5 < np.abs(loop).max() <= 0.9 + 1e-6 for loop in loops)


def test_refuses_to_write_audio_into_the_repository():
    result = subprocess.run([sys.executable, str(RECIPE / "build_corpus.py"), "--out", str(RECIPE / "data")],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode != 0 and "inside the repository; audio never goes there" in result.stderr
    assert not (RECIPE / "data").exists()


@pytest.mark.slow
def test_model_card_from_run_records(tmp_path, frame_small_ckpt):
    pytest.importorskip("matplotlib")
    from atst_features import load_model, save_pretrained

    folder = tmp_path / "model"
    save_pretrained(load_model(frame_small_ckpt, device="cpu"), folder, license="cc-by-sa-4.0")
    data = tmp_path / "data"
    data.mkdir()
    (data / "summary.json").write_text(json.dumps({
        "train_hours": 6.9, "train_pieces": 3, "train_minutes_by_package": {"pkg-a": 300.0, "pkg-b": 114.0},
        "eval_clips": 4, "eval_clips_by_label": {"speech": {"train": 1, "test": 1}, "music": {"train": 1, "test": 1}},
        "seed": 1, "recipe": "x"}))
    with open(data / "train.csv", "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerows([["path", "duration", "package", "licence", "source"],
                          ["a.flac", "5", "pkg-a", "CC-BY-SA-3.0 (/usr/share/doc/<package>/copyright)", "x"],
                          ["b.flac", "5", "pkg-b", "GPL-2+ (/usr/share/doc/<package>/copyright)", "y"]])
    with open(data / "eval.csv", "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["path", "label", "split", "group", "duration", "package", "licence", "source"])
        writer.writerows([[f"{i}.flac", label, split, f"g{i}", "4", "pkg-c", "CC0", "z"]
                          for i, (label, split) in enumerate([("speech", "train"), ("speech", "test"),
                                                              ("music", "train"), ("music", "test")])])
    run = tmp_path / "run"
    log = run / "runs/frame-mini/csv/version_0"
    log.mkdir(parents=True)
    log.joinpath("metrics.csv").write_text("ema,epoch,loss,lr,std_student,std_teacher,step,wd\n" + "".join(
        f"0.99,0,{1 - step / 200:.3f},0.0005,0.05,0.051,{step},0.05\n" for step in range(0, 100, 10)))
    probe = {"results": [
        {"model": str(folder), "dims": 4608, "metric": "accuracy", "test": 0.9, "n_test": 2},
        {"model": f"random:{folder}", "dims": 4608, "metric": "accuracy", "test": 0.7, "n_test": 2},
        {"model": "logmel", "dims": 128, "metric": "accuracy", "test": 0.8, "n_test": 2},
        {"model": "runs/frame-mini/checkpoints/epoch=1-step=50.ckpt", "dims": 4608, "metric": "accuracy", "test": 0.85, "n_test": 2},
    ]}
    (tmp_path / "probe.json").write_text(json.dumps(probe))
    result = subprocess.run([sys.executable, str(RECIPE / "model_card.py"), str(folder), "--data", str(data), "--run", str(run),
                             "--probe", str(tmp_path / "probe.json"), "--seconds", "4800"],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    card = (folder / "README.md").read_text()
    assert "license: cc-by-sa-4.0" in card and "a small demo and test model" in card
    assert "| atst-frame-mini (this model) | 4608 | 0.900 |" in card and "more separable" in card
    assert "| same architecture, random weights | 4608 | 0.700 |" in card and "| log-mel mean + std | 128 | 0.800 |" in card
    assert "| pkg-a | 300 | CC-BY-SA-3.0 |" in card and "50: 0.850" in card
    assert "![training curves and probe accuracy per checkpoint](training.png)" in card
    assert (folder / "training.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
