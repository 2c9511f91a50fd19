"""Ready-made detectors: PretrainedSED's ATST-Frame AudioSet-strong model and the ATST authors' one,
from their official layouts, equal to their code (tests/data/make_pretrainedsed_parity.py), with
their class names in the order of their outputs, and their post-processing as defaults."""

from __future__ import annotations

import dataclasses
import hashlib
import io
import json

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from conftest import DATA, recipe_checkpoint, waveform
from download_server import DownloadServer

from atst_features import load_model
from atst_features.cli.detect import detect
from atst_features.heads import label_file
from atst_features.registry import REGISTRY

EXPECTED = np.load(DATA / "expected_pretrainedsed_atst_frame_small.npz")
CASES = {"a_3s": (3.0, 1), "b_10s": (10.0, 3), "c_23s": (23.3, 4)}
NAME = "atst-frame-base-as-strong-447"


@pytest.fixture
def checkpoint(tmp_path):
    """A PretrainedSED ATST-F strong checkpoint (a plain state dict, as ATST-F_strong_1.pt), small, recipe weights."""
    path = tmp_path / "ATST-F_strong_1.pt"
    buffer = io.BytesIO()
    torch.save(recipe_checkpoint("pretrainedsed_atst_frame_small"), buffer)
    path.write_bytes(buffer.getvalue())
    return path


@pytest.fixture
def detector(checkpoint, tmp_path, monkeypatch):
    """The registry's PretrainedSED model, downloaded from a local server holding the small stand-in."""
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub-cache"))
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")
    with DownloadServer({checkpoint.name: checkpoint.read_bytes()}) as server:
        # the stand-in has 12 classes, not the 447 the entry names; everything else is the entry's
        entry = dataclasses.replace(REGISTRY[NAME], download_url=f"{server.url}/direct/{checkpoint.name}", labels_file=None)
        monkeypatch.setitem(REGISTRY, NAME, entry)
        model = load_model(NAME, device="cpu")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # from here on, the cache only
    return model


def test_equal_to_pretrainedsed_inference(detector):
    """10 s chunks cut from the audio, the last zero-padded, each with its own spectrogram: its
    inference.py's probabilities, within 1e-4, for 3 s, 10 s and 23.3 s."""
    assert detector.config.head_type == "strong" and detector.config.num_classes == 12
    assert detector.config.detection == {"windows": "audio", "hop_seconds": 10.0, "median": 9, "threshold": 0.5}
    for case, (seconds, seed) in CASES.items():
        strong, stamps, weak = detector.get_event_probabilities(waveform(seconds, seed))
        expected = EXPECTED[f"{case}/strong"].T[: len(strong[0])]
        assert len(strong[0]) == (1 + int(round(seconds * 16000)) // 160) // 4
        np.testing.assert_allclose(strong[0].numpy(), expected, atol=1e-4, rtol=0)
        assert torch.equal(weak[0], strong[0].max(dim=0).values)  # a strong head's clip level: its highest frame


def test_a_full_window_needs_no_audio_windows(checkpoint):
    """Loaded from the file itself (no registry settings: spectrogram windows), a 10 s clip is one
    window, the same as the authors' run."""
    model = load_model(checkpoint, device="cpu")
    assert model.config.detection == {} and model.labels[:2] == ("class_0", "class_1")
    strong, _, _ = model.get_event_probabilities(waveform(10.0, 3))
    np.testing.assert_allclose(strong[0].numpy(), EXPECTED["b_10s/strong"].T, atol=1e-4, rtol=0)


def test_detection_uses_the_models_post_processing(detector, tmp_path):
    import soundfile

    audio = waveform(23.3, 4)
    soundfile.write(tmp_path / "c.wav", audio, 16000, subtype="FLOAT")
    events = detector.detect_events(str(tmp_path / "c.wav"))[0]
    again = detector.detect_events(str(tmp_path / "c.wav"), median=9, threshold=0.5, hop_seconds=10.0)[0]
    assert events == again and all(e.filename == str(tmp_path / "c.wav") for e in events)
    result = CliRunner().invoke(detect, [str(tmp_path / "c.wav"), "--model", NAME, "--format", "json", "-q"])
    assert result.exit_code == 0, result.output
    found = json.loads(result.output)
    assert [(e["onset"], e["offset"], e["label"]) for e in found] == [(e.onset, e.offset, e.label) for e in events]


def test_class_names_in_the_order_of_the_outputs():
    """PretrainedSED's 447 (its as_strong_train_classes: the display names sorted) and the ATST
    authors' 407 (the mids of audiossl e584998's list, which their checkpoint's outputs follow)."""
    names = label_file("audioset_strong_447")
    assert len(names) == len(set(names)) == 447 and list(names) == sorted(names)
    assert names[:2] == ("Accelerating, revving, vroom", "Air brake") and names[-1] == "Zipper (clothing)"
    import csv

    from importlib import resources

    text = resources.files("atst_features").joinpath("data/audioset_strong_407.csv").read_text(encoding="utf-8")
    mids = [row["mid"] for row in csv.DictReader(io.StringIO(text))]
    assert hashlib.sha256("\n".join(mids).encode()).hexdigest() == \
        "31c5aef8cc6d1f2593b0f5196882bc846840d9f4574cd2e11341bb184f8caf81"
    assert mids[:2] == ["/m/032s66", "/m/01h3n"] and mids.index("/m/09x0r") == 118  # Speech
    assert label_file("audioset_strong_407")[118] == "Speech" and len(REGISTRY["atst-frame-base-as-strong"].labels) == 407
    assert len(REGISTRY[NAME].labels) == 447
