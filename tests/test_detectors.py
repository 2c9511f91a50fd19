"""Ready-made detectors: PretrainedSED's ATST-Frame AudioSet-strong model, the ATST authors' one and
ATST-SED, from their official layouts, equal to their code (tests/data/make_*_parity.py), with their
class names in the order of their outputs, and their post-processing as defaults."""

from __future__ import annotations

import hashlib
import io
import json

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from conftest import DATA, recipe_checkpoint, registry_stand_in, waveform

from atst_features import load_model
from atst_features.cli.detect import detect
from atst_features.heads import label_file
from atst_features.registry import REGISTRY

EXPECTED = np.load(DATA / "expected_pretrainedsed_atst_frame_small.npz")
CASES = {"a_3s": (3.0, 1, 1.0), "b_10s": (10.0, 3, 1.0), "c_23s": (23.3, 4, 1.0), "d_4s_quiet": (4.0, 5, 1e-3)}
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
    """The registry's PretrainedSED model, downloaded from a local server holding the small stand-in
    (12 classes, not the 447 the entry names: everything else is the entry's)."""
    return registry_stand_in(NAME, checkpoint, tmp_path, monkeypatch, labels_file=None)


def test_equal_to_pretrainedsed_inference(detector):
    """10 s chunks cut from the audio, the last zero-padded, each with its own spectrogram: its
    inference.py's probabilities, within 1e-4, for 3 s, 10 s, 23.3 s and a quiet 4 s (its dB clamp)."""
    assert detector.config.head_type == "strong" and detector.config.num_classes == 12
    assert detector.config.detection == {"windows": "audio", "hop_seconds": 10.0, "median": 9, "threshold": 0.5}
    assert detector.config.frontend.clamp_db == (-50.0, 80.0)
    for case, (seconds, seed, gain) in CASES.items():
        strong, stamps, weak = detector.get_event_probabilities(waveform(seconds, seed) * gain)
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
    """PretrainedSED's 447 (its as_strong_train_classes: the display names sorted), the ATST authors'
    407 (the mids of audiossl e584998's list, which their checkpoint's outputs follow) and ATST-SED's 10."""
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
    # ATST-SED's train/local/classes_dict.py: its outputs' order
    assert REGISTRY["atst-sed-desed"].labels == (
        "Alarm_bell_ringing", "Blender", "Cat", "Dishes", "Dog", "Electric_shaver_toothbrush", "Frying", "Running_water",
        "Speech", "Vacuum_cleaner")


# ------------------------------------------------------------------ the ATST authors' 407-class model
AS_STRONG_EXPECTED = np.load(DATA / "expected_audiossl_as_strong_small.npz")
AS_STRONG_CASES = {"a_3s": (3.0, 1), "b_10s": (10.0, 3), "c_23s": (23.3, 4)}


def test_the_authors_as_strong_model_equals_their_code(tmp_path, monkeypatch):
    """audiossl's FineTuningPLModule(FrameATSTPredModule) in the layout of its Lightning checkpoint
    (tests/data/make_audiossl_finetuned_parity.py): the spectrogram of the clip itself, unpadded, as
    their evaluation transform gives it; a 23.3 s clip in windows every 10 s. Within 1e-4; then
    atst-detect runs it by name from the cache, with its median filter of 7 frames."""
    path = tmp_path / "as_strong.ckpt"
    torch.save(recipe_checkpoint("audiossl_as_strong_small"), path)
    model = registry_stand_in("atst-frame-base-as-strong", path, tmp_path, monkeypatch, labels_file=None)
    assert model.config.head_type == "strong" and model.config.num_classes == 12
    assert model.config.detection == {"windows": "spectrogram", "hop_seconds": 10.0, "median": 7, "threshold": 0.5}
    for case, (seconds, seed) in AS_STRONG_CASES.items():
        strong, _, weak = model.get_event_probabilities(waveform(seconds, seed))
        np.testing.assert_allclose(strong[0].numpy(), AS_STRONG_EXPECTED[f"{case}/strong"].T, atol=1e-4, rtol=0)
    import soundfile

    soundfile.write(tmp_path / "c.wav", waveform(23.3, 4), 16000, subtype="FLOAT")
    result = CliRunner().invoke(detect, [str(tmp_path / "c.wav"), "--model", "atst-frame-base-as-strong", "--format",
                                         "json", "-q"])
    assert result.exit_code == 0, result.output
    events = model.detect_events(str(tmp_path / "c.wav"), median=7)[0]
    assert [(e["onset"], e["offset"], e["label"]) for e in json.loads(result.output)] == \
        [(e.onset, e.offset, e.label) for e in events] and events


# ------------------------------------------------------------------------------------------ ATST-SED
SED_EXPECTED = np.load(DATA / "expected_atst_sed_small.npz")
SED_CASES = {"a_4s": (4.0, 1, 1.0), "b_10s": (10.0, 3, 1.0), "c_23s": (23.3, 4, 1.0), "d_4s_quiet": (4.0, 5, 1e-3)}


@pytest.fixture
def atst_sed(tmp_path, monkeypatch):
    """The registry's ATST-SED, downloaded from a local server holding a small stand-in in the layout of
    its Lightning checkpoint (student and teacher; the teacher is run)."""
    path = tmp_path / "Stage2_wo_ext.ckpt"
    torch.save(recipe_checkpoint("atst_sed_small"), path)
    return registry_stand_in("atst-sed-desed", path, tmp_path, monkeypatch)


def _windows_averaged(case: str, n_samples: int) -> np.ndarray:
    """The reference's window outputs placed on one 64 ms grid (a window starting at sample s begins at
    frame round(s / 1024)) and averaged where they overlap: ``[frames, classes]``."""
    frames = (1 + n_samples // 256) // 4
    sums, counts = np.zeros((frames, 10)), np.zeros((frames, 1))
    for start, strong in zip(SED_EXPECTED[f"{case}/starts"], SED_EXPECTED[f"{case}/strong"]):
        first = int(round(start / 1024))
        count = max(0, min(156, frames - first))
        sums[first : first + count] += strong.T[:count]
        counts[first : first + count] += 1
    return sums / counts


def test_atst_sed_equals_its_code(atst_sed):
    """Its CRNN and ATST front ends, the CNN, fusion, BiGRU and heads of the teacher branch: within 1e-4
    of its code, for 4 s (one padded window), 10 s, 23.3 s (six windows every 3 s, averaged on the 64 ms
    grid) and a quiet clip (the dB clamp at -50 decides)."""
    assert atst_sed.config.head_type == "atst-sed" and atst_sed.labels[0] == "Alarm_bell_ringing"
    assert atst_sed.config.frontend.clamp_db == (-50.0, 80.0) and atst_sed.config.detection["hop_seconds"] == 3.0
    for case, (seconds, seed, gain) in SED_CASES.items():
        audio = waveform(seconds, seed) * gain
        strong, stamps, weak = atst_sed.get_event_probabilities(audio)
        expected = _windows_averaged(case, len(audio))
        assert strong[0].shape == expected.shape
        np.testing.assert_allclose(strong[0].numpy(), expected, atol=1e-4, rtol=0)
        assert stamps[0][:2].tolist() == [24.0, 88.0]  # frame centres, 64 ms apart
    _, _, weak = atst_sed.get_event_probabilities(waveform(10.0, 3))
    np.testing.assert_allclose(weak[0].numpy(), SED_EXPECTED["b_10s/weak"][0], atol=1e-4, rtol=0)


def test_atst_sed_unites_each_windows_decisions(atst_sed):
    """Its inference.py: each window median-filtered (per class: 6, 20, 7, 4, 7, 6, ... frames) and
    thresholded on its own, a frame active where any window says so; here without its drift."""
    from atst_features.events import decode_events, median_filter

    sizes = atst_sed.config.detection["median"]
    assert atst_sed.config.detection["combine"] == "union" and sizes["Blender"] == 20 and sizes["Dishes"] == 4
    audio = waveform(23.3, 4)
    frames = (1 + len(audio) // 256) // 4
    active = np.zeros((frames, 10), dtype=bool)
    for start, strong in zip(SED_EXPECTED["c_23s/starts"], SED_EXPECTED["c_23s/strong"]):
        first = int(round(start / 1024))
        decided = median_filter(strong.T, [sizes[label] for label in atst_sed.labels]) >= 0.5
        active[first : first + 156] |= decided[: frames - first]
    expected = decode_events(active.astype(float), atst_sed.labels, hop=0.064, threshold=0.5)
    events = atst_sed.detect_events(audio)[0]
    assert [(e.onset, e.offset, e.label) for e in events] == [(e.onset, e.offset, e.label) for e in expected]
    assert events and all(0 < e.score <= 1 for e in events)
    averaged = atst_sed.detect_events(audio, combine="average")[0]
    assert averaged != events  # the other way to combine windows gives other events here


@pytest.mark.slow
def test_atst_detect_runs_atst_sed_by_name(atst_sed, tmp_path):
    """`atst-detect FILE --model atst-sed-desed`, offline from the cache: its events, its score tables
    (one row per 64 ms frame) and a plot of its 10 classes."""
    import soundfile

    soundfile.write(tmp_path / "c.wav", waveform(23.3, 4), 16000, subtype="FLOAT")
    result = CliRunner().invoke(detect, [str(tmp_path / "c.wav"), "--model", "atst-sed-desed", "--format", "json", "-q",
                                         "--scores", str(tmp_path / "scores"), "--plot", str(tmp_path / "plots")])
    assert result.exit_code == 0, result.output
    events = atst_sed.detect_events(str(tmp_path / "c.wav"))[0]
    assert [(e["onset"], e["offset"], e["label"]) for e in json.loads(result.output)] == \
        [(e.onset, e.offset, e.label) for e in events] and events
    table = (tmp_path / "scores" / "c.tsv").read_text().splitlines()
    assert table[0].split("\t") == ["onset", "offset", *atst_sed.labels] and len(table) - 1 == (1 + len(waveform(23.3, 4)) // 256) // 4
    assert [float(x) for x in table[1].split("\t")[:2]] == [0.0, 0.064]
    assert (tmp_path / "plots" / "c.png").stat().st_size > 10_000


# ------------------------------------------------------------------------- a file downloaded by hand
def test_a_file_downloaded_by_hand_becomes_the_named_model(checkpoint, tmp_path, monkeypatch):
    """`atst-convert FILE --as NAME` (Google Drive refused the download): the file is converted with
    NAME's settings into the cache where NAME is looked up; then it loads offline by name. Another
    file for the same name, a file of another kind and an unknown name are one `error:` line each."""
    import dataclasses

    from atst_features.cli.tools import convert

    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub-cache"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setitem(REGISTRY, NAME, dataclasses.replace(REGISTRY[NAME], labels_file=None))
    result = CliRunner().invoke(convert, [str(checkpoint), "--as", NAME])
    assert result.exit_code == 0, result.output
    assert f"installed {NAME}:" in result.output and checkpoint.exists()
    model = load_model(NAME, device="cpu")
    assert model.config.detection["median"] == 9 and model.config.frontend.clamp_db == (-50.0, 80.0)
    strong, _, _ = model.get_event_probabilities(waveform(3.0, 1))
    np.testing.assert_allclose(strong[0].numpy(), EXPECTED["a_3s/strong"].T[: len(strong[0])], atol=1e-4, rtol=0)

    other = tmp_path / "other.pt"
    torch.save({k: v + 1 for k, v in recipe_checkpoint("pretrainedsed_atst_frame_small").items()}, other)
    result = CliRunner().invoke(convert, [str(other), "--as", NAME])
    last = result.output.splitlines()[-1]
    assert result.exit_code == 1 and last.startswith(f"Error: {other}: sha256 ") and "differs from the first" in last
    result = CliRunner().invoke(convert, [str(checkpoint), "--as", "atst-frame-base"])
    assert result.exit_code == 1 and "holds an ATST-frame model with a frame-level head (strong), not the frame model 'atst-frame-base' names; not " \
        "used (is it the right file?)" in result.output
    result = CliRunner().invoke(convert, [str(checkpoint), "--as", "atst-sed-desed"])
    assert result.exit_code == 1 and result.output.splitlines()[-1].endswith(
        "not the frame model with an ATST-SED head (atst-sed) 'atst-sed-desed' names, expected as ATST-SED's Lightning "
        "checkpoint (sed_teacher.atst_frame.atst.*, sed_teacher.cnn.*, sed_teacher.rnn.*, sed_teacher.dense.*); not used "
        "(is it the right file?)")
    result = CliRunner().invoke(convert, [str(checkpoint), "--as", "atst-nothing"])
    assert result.exit_code == 2 and "'atst-nothing' is not a registry model with an official download" in result.output
    result = CliRunner().invoke(convert, [str(checkpoint)])
    assert result.exit_code == 2 and "give OUT_DIR, or --as NAME" in result.output


def test_plots_of_many_classes_show_those_that_matter(detector, tmp_path):
    """Above 10 classes (AudioSet detectors have hundreds), a plot draws the classes with events and
    then the most probable, 10 in all."""
    from atst_features.detection import detect_events
    from atst_features.plots import MAX_PLOTTED_CLASSES, plot_events

    audio = waveform(23.3, 4)
    (events,), (probabilities,) = detect_events(detector, audio, threshold=0.6)
    drawn = plot_events(detector, audio, tmp_path / "c.png", events=events, probabilities=probabilities)
    assert len(detector.labels) == 12 and len(drawn) == MAX_PLOTTED_CLASSES
    assert {e.label for e in events} <= set(drawn)
    left_out = set(detector.labels) - set(drawn)
    peaks = dict(zip(detector.labels, probabilities.max(axis=0)))
    assert max(peaks[label] for label in left_out) <= min(peaks[label] for label in drawn if label not in {e.label for e in events})
    assert (tmp_path / "c.png").stat().st_size > 10_000
    assert plot_events(detector, audio, tmp_path / "again.png", threshold=0.6) == drawn  # computing them itself


def test_a_class_the_model_lacks_is_one_line(atst_sed, tmp_path):
    import soundfile

    soundfile.write(tmp_path / "a.wav", waveform(2.0, 1), 16000)
    result = CliRunner().invoke(detect, [str(tmp_path / "a.wav"), "--model", "atst-sed-desed", "--threshold", "dog=0.3"])
    assert result.exit_code == 1 and result.output.count("\n") == 1
    assert "unknown labels ['dog'] (did you mean 'dog' -> 'Dog'?); the model's labels are ['Alarm_bell_ringing', " \
        in result.output
