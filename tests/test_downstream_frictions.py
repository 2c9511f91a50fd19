"""The downstream commands as a new user meets them on an unseen 11-class set (issue 29, item 6):
atst-probe's fits, atst-train's log and random weights, sed-tiny's crop, group columns, atst-score's
undefined F1, atst-detect's plot colours and reference events, Lightning's noise."""

from __future__ import annotations

import contextlib
import io
import json
import logging
import re
import warnings

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from conftest import write_audio

from atst_features import save_pretrained
from atst_features.cli.detect import detect
from atst_features.cli.tools import score
from atst_features.config import ModelConfig
from atst_features.encoder import EncoderConfig
from atst_features.events import Event
from atst_features.model import ATSTModel
from atst_features.training import probe
from atst_features.training.manifests import read_labelled, split_items

CLASSES = tuple(f"class{index}" for index in range(11))


def eleven_classes(root, per_class: int, splits: tuple[str, ...] = ()):
    """``root/set.csv``: ``per_class`` 0.5 s tones per class (a frequency per class) with a ``source``
    column (two clips per source) and, if given, the split of each clip of a class in turn."""
    rows = ["path,label,source" + (",split" if splits else "")]
    for number, label in enumerate(CLASSES):
        for index in range(per_class):
            path = write_audio(root / label / f"{index}.wav", 0.5, freq=200 + 150 * number, noise=0.01, seed=index)
            split = f",{splits[index % len(splits)]}" if splits else ""
            rows.append(f"{path.relative_to(root)},{label},rec-{label}-{index // 2}{split}")
    (root / "set.csv").write_text("\n".join(rows) + "\n")
    return root / "set.csv"


# ------------------------------------------------------------------------------------------ 1. atst-probe
def test_small_probe_fits_run_on_one_thread_and_give_the_threads_back(monkeypatch):
    seen = []
    cross_entropy = torch.nn.functional.cross_entropy

    def recording(*args, **kwargs):
        seen.append(torch.get_num_threads())
        return cross_entropy(*args, **kwargs)

    monkeypatch.setattr(torch.nn.functional, "cross_entropy", recording)
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        x, y = torch.randn(60, 8), torch.arange(3).repeat(20)
        probe.fit_linear(x, y, 1e-3, multi_label=False)
        assert set(seen) == {1} and torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)


def test_atst_probe_shows_each_fit_and_where_the_groups_come_from(tmp_path):
    manifest = eleven_classes(tmp_path, 4, ("train", "train", "train", "test"))
    result = CliRunner().invoke(probe.main, [str(manifest), "--model", "logmel", "--no-cache"])
    assert result.exit_code == 0, result.output
    lines = result.stderr.splitlines()
    assert lines[0].endswith("11 classes (single-label); train 33, test 11 by the manifest's split column; "
                             "groups from the 'source' column")
    fits = [line for line in lines if line.startswith("logmel: fit ")]
    pattern = r"logmel: fit (\d+)/37: L2 \de[-+]\d\d, (fold [1-4]/4:|all of train: test) accuracy [01]\.\d{3} \(\d+\.\d s\)"
    assert [int(re.fullmatch(pattern, line).group(1)) for line in fits] == list(range(1, 38)), fits
    assert fits[-1].startswith("logmel: fit 37/37: L2 ") and "all of train: test accuracy" in fits[-1]


# ------------------------------------------------------------------------------------------ 2, 3, 8. atst-train
@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """``atst-train finetune`` (tiny preset, 2 epochs, random weights) on the 11 classes with stderr in a
    file: (its stderr, Lightning's log messages, the warnings raised, the run folder)."""
    pytest.importorskip("lightning")
    from atst_features.training.cli import main as train_main

    root = tmp_path_factory.mktemp("train-eleven")
    manifest = eleven_classes(root / "data", 4, ("train", "train", "valid", "test"))
    stderr, messages = io.StringIO(), []
    handler = logging.Handler()
    handler.emit = lambda record: messages.append(record.getMessage())
    lightning_log = logging.getLogger("lightning.pytorch")
    lightning_log.addHandler(handler)
    patch = pytest.MonkeyPatch()
    patch.chdir(root)
    try:
        with warnings.catch_warnings(record=True) as caught, contextlib.redirect_stderr(stderr):
            warnings.simplefilter("always")
            train_main(["finetune", "--config", "finetune-tiny", "--data.manifest", str(manifest),
                        "--model.init", "random:atst-frame-mini", "--model.max_epochs", "2"])
    finally:
        patch.undo()
        lightning_log.removeHandler(handler)
    return stderr.getvalue(), messages, [f"{w.message} ({w.filename})" for w in caught], root


def test_atst_train_takes_random_weights_as_atst_probe_does(trained):
    from atst_features.loading import load_model
    from atst_features.training.supervised import model_from_source

    _, _, _, root = trained
    checkpoint = torch.load(root / "runs/finetune-tiny/checkpoints/last.ckpt", weights_only=True)
    assert checkpoint["hyper_parameters"]["init"] == "random:atst-frame-mini"
    pretrained = load_model("atst-frame-mini", device="cpu").encoder.state_dict()
    random = model_from_source("random:atst-frame-mini", list(CLASSES), multi_label=False).encoder.state_dict()
    assert random.keys() == pretrained.keys()
    assert all(random[k].shape == pretrained[k].shape for k in random)
    assert not torch.equal(random["blocks.0.attn.qkv.weight"], pretrained["blocks.0.attn.qkv.weight"])


def test_atst_train_says_its_splits_and_logs_each_epoch_when_stderr_is_a_file(trained):
    err, _, _, _ = trained
    lines = err.splitlines()
    assert "clips: train 22, valid 11, test 11 (the manifest's split column; groups from the 'source' column)" in lines
    epochs = [line for line in lines if line.startswith("epoch ")]
    assert len(epochs) == 2, err
    for number, line in enumerate(epochs, start=1):
        assert re.fullmatch(rf"epoch {number}/2, step {3 * number}/6: loss \d\.\d+, valid_score [01]\.\d{{3}}, "
                            r"valid_accuracy [01]\.\d{3}, \d+\.\d clips/s, 0:0\d:\d\d elapsed", line), line


def test_atst_train_hides_lightning_tips_and_its_deprecation_warning(trained):
    _, messages, caught, _ = trained
    assert any(m.startswith("GPU available") for m in messages)  # Lightning's messages still come through
    assert not [m for m in messages if "Tip:" in m or "litlogger" in m or "litmodels" in m]
    assert not [w for w in caught if "LeafSpec" in w or "deprecated" in w and "/lightning/" in w]


# ------------------------------------------------------------------------------------------ 4. sed-tiny's crop
def test_event_data_says_once_how_many_clips_it_crops(tmp_path, capsys):
    pytest.importorskip("lightning")
    from atst_features.training.sed import EventData

    for name, seconds in (("a", 3.0), ("b", 3.0), ("c", 1.5)):
        write_audio(tmp_path / "audio" / f"{name}.wav", seconds)
    (tmp_path / "strong.tsv").write_text("filename\tonset\toffset\tevent_label\na.wav\t0.5\t1.0\tbeep\n"
                                         "a.wav\t2.5\t2.9\tbuzz\nb.wav\t0.2\t0.6\tbeep\nc.wav\t0.1\t0.5\tbuzz\n")
    EventData(str(tmp_path / "audio"), strong=str(tmp_path / "strong.tsv"), clip_seconds=2.0, num_workers=0)
    assert capsys.readouterr().err.splitlines() == [
        "warning: 2 of 3 clips last longer than 2 s (--data.clip_seconds, at most 10: one encoder window); only their "
        "first 2 s are used: 1 strong events that start later are left out"]
    EventData(str(tmp_path / "audio"), strong=str(tmp_path / "strong.tsv"), clip_seconds=3.0, num_workers=0)
    assert capsys.readouterr().err == ""


# ------------------------------------------------------------------------------------------ 5. group columns
@pytest.mark.parametrize("column", ["source", "src_file", "fsID"])
def test_a_source_column_groups_the_splits(tmp_path, column):
    manifest = eleven_classes(tmp_path, 4)
    manifest.write_text(manifest.read_text().replace("path,label,source", f"path,label,{column}", 1))
    data = read_labelled(manifest)
    assert data.group_column == column
    assert [item.group for item in data.items[:4]] == ["rec-class0-0", "rec-class0-0", "rec-class0-1", "rec-class0-1"]
    splits, _ = split_items(data, seed=1)
    sides = {}
    for name, items in splits.items():
        for item in items:
            sides.setdefault(item.group, set()).add(name)
    assert len(sides) == 22 and all(len(names) == 1 for names in sides.values())


# ------------------------------------------------------------------------------------------ 6. atst-score
def test_atst_score_names_the_classes_without_f1_and_both_macro_means(tmp_path):
    (tmp_path / "reference.tsv").write_text("filename\tonset\toffset\tevent_label\nf.wav\t1.0\t2.0\ta\n"
                                            "f.wav\t3.0\t4.0\tb\nf.wav\t5.0\t6.0\tc\n")
    (tmp_path / "detected.tsv").write_text("filename\tonset\toffset\tevent_label\nf.wav\t1.0\t2.0\ta\n"
                                           "f.wav\t5.5\t7.0\tc\nf.wav\t8.0\t9.0\td\n")
    result = CliRunner().invoke(score, [str(tmp_path / "reference.tsv"), str(tmp_path / "detected.tsv"),
                                        "--json", str(tmp_path / "scores.json")])
    assert result.exit_code == 0, result.output
    assert "nan" not in result.output.lower()
    lines = result.output.splitlines()
    # a: found; c: missed and a false alarm (F1 0); b: never detected, d: not in the reference (F1 undefined)
    assert lines[1].endswith("F1 micro 0.333, macro 0.500 over the 2 classes with reference and detected events "
                             "(0.250 over all 4, the 2 others as 0)")
    assert "reference classes without detections (1): b" in lines
    assert "detected classes absent from the reference (1): d" in lines
    assert lines[-4:] == ["a                       1.000  1.000  1.000      1.000",
                          "b                         n/a    n/a  0.000        n/a",
                          "c                       0.000  0.000  0.000      0.667",
                          "d                         n/a  0.000    n/a        n/a"]
    event_based = json.loads((tmp_path / "scores.json").read_text())["event_based"]
    assert event_based["macro_f1"] == 0.5 and event_based["macro_f1_all"] == 0.25
    assert event_based["undetected"] == ["b"] and event_based["unreferenced"] == ["d"]
    assert event_based["per_class"]["b"]["f1"] is None and event_based["per_class"]["c"]["f1"] == 0.0


# ------------------------------------------------------------------------------------------ 7. plots
def event_model(labels) -> ATSTModel:
    torch.manual_seed(0)
    encoder = EncoderConfig(cls_token=False, embed_dim=32, depth=2, num_heads=2, mlp_hidden_dim=64)
    return ATSTModel(ModelConfig("frame", encoder, num_classes=len(labels), labels=tuple(labels), head_type="events")).eval()


@pytest.fixture()
def figures(monkeypatch):
    """The figures plots save, kept for a look at what they draw."""
    from matplotlib.figure import Figure

    saved, save = [], Figure.savefig
    monkeypatch.setattr(Figure, "savefig", lambda figure, *args, **kwargs: (saved.append(figure), save(figure, *args, **kwargs)))
    return saved


@pytest.mark.parametrize("classes", [11, 25])
def test_plots_give_each_class_drawn_its_own_colour(tmp_path, figures, classes):
    from matplotlib.colors import to_hex

    from atst_features.plots import plot_events

    labels = [f"c{index}" for index in range(classes)]
    audio = np.zeros(16000 * 4, dtype=np.float32)
    events = [Event("x", 0.1 * i, 0.1 * i + 0.5, label) for i, label in enumerate(labels[::2])]
    reference = [Event("x", 0.1 * i, 0.1 * i + 0.4, label) for i, label in enumerate(labels[1::2])]
    probabilities = np.random.default_rng(0).random((100, classes))
    drawn = plot_events(event_model(labels), audio, tmp_path / "p.png", events=events, probabilities=probabilities,
                        reference=reference)
    assert drawn == labels  # every class with events, detected or reference ones
    curves, bars = figures[0].axes[1].get_lines(), figures[0].axes[2].patches
    assert len({to_hex(line.get_color()) for line in curves}) == len(curves) == classes
    assert len(bars) == classes and sum(bar.get_hatch() == "//" for bar in bars) == len(reference)


def test_atst_detect_draws_reference_events_under_its_own(tmp_path, figures):
    labels = ("beep", "buzz", "hiss")
    folder = save_pretrained(event_model(labels), tmp_path / "detector")
    for name in ("a", "b"):
        write_audio(tmp_path / "audio" / f"{name}.wav", 2.0)
    reference = tmp_path / "reference.tsv"
    reference.write_text("filename\tonset\toffset\tevent_label\na.wav\t0.2\t0.8\tbeep\na.wav\t1.0\t1.5\thiss\n")
    arguments = [str(tmp_path / "audio"), "--model", str(folder), "--threshold", "1.1", "-q"]
    result = CliRunner().invoke(detect, [*arguments, "--plot", str(tmp_path / "plots"), "--reference", str(reference)])
    assert result.exit_code == 0, result.output
    assert sorted(p.name for p in (tmp_path / "plots").iterdir()) == ["a.png", "b.png"]
    hatched = [[bar for bar in figure.axes[2].patches if bar.get_hatch() == "//"] for figure in figures]
    assert [len(bars) for bars in hatched] == [2, 0]  # a.wav's two reference events; b.wav is not in the reference
    spans = sorted((bar.get_x(), bar.get_width()) for bar in hatched[0])
    assert np.allclose(spans, [(0.2, 0.6), (1.0, 0.5)])

    result = CliRunner().invoke(detect, [*arguments, "--reference", str(reference)])
    assert result.exit_code == 2 and "give --plot DIR too" in result.output
    reference.write_text("filename\tonset\toffset\tevent_label\na.wav\t0.2\t0.8\tBeep\n")
    result = CliRunner().invoke(detect, [*arguments, "--plot", str(tmp_path / "plots"), "--reference", str(reference)])
    assert result.exit_code == 1 and result.output.count("\n") == 1
    assert "reference: unknown labels ['Beep'] (did you mean 'Beep' -> 'beep'?)" in result.output
