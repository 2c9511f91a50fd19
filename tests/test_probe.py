"""Labelled manifests and the atst-probe linear probe."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from conftest import write_audio

from atst_features.errors import InputError
from atst_features.training.manifests import grouped_folds, grouped_holdout, read_labelled
from atst_features.training.metrics import average_precision, mean_average_precision
from atst_features.training.probe import fit_linear, linear_probe, main



# ------------------------------------------------------------------------------------------ manifests
def test_single_label_manifest_with_splits_and_groups(tmp_path):
    for name in ("a.wav", "b.wav", "c.wav"):
        write_audio(tmp_path / "audio" / name)
    manifest = tmp_path / "set.csv"
    manifest.write_text("path,label,split,group\naudio/a.wav,dog,train,r1\naudio/b.wav,cat,validation,r2\n"
                        "audio/c.wav,dog,test,r3\n")
    data = read_labelled(manifest)
    assert data.label_names == ("dog", "cat") and not data.multi_label and data.has_splits
    assert [item.split for item in data.items] == ["train", "valid", "test"]
    assert [item.group for item in data.items] == ["r1", "r2", "r3"]
    assert data.items[0].path == tmp_path / "audio" / "a.wav"


def test_multi_label_tsv(tmp_path):
    write_audio(tmp_path / "a.wav")
    write_audio(tmp_path / "b.wav")
    manifest = tmp_path / "set.tsv"
    manifest.write_text("file\tlabels\na.wav\tSpeech;Music\nb.wav\tMusic, Dog\n")
    data = read_labelled(manifest)
    assert data.multi_label and data.label_names == ("Speech", "Music", "Dog")
    assert data.items[1].labels == ("Music", "Dog") and not data.has_splits


def test_label_folders(tmp_path):
    write_audio(tmp_path / "dog" / "1.wav")
    write_audio(tmp_path / "cat" / "2.flac")
    data = read_labelled(tmp_path)
    assert sorted(data.label_names) == ["cat", "dog"]
    assert {item.path.name: item.labels for item in data.items} == {"1.wav": ("dog",), "2.flac": ("cat",)}


@pytest.mark.parametrize(
    ("rows", "message"),
    [
        ("path,label\nmissing.wav,dog\n", r"line 2: no such audio file .*missing\.wav"),
        ("path,label,split\na.wav,dog,holdout\n", r"line 2: unknown split 'holdout'; use train, valid or test"),
        ("path,label\na.wav,\n", r"line 2: empty label"),
        ("path,category\na.wav,dog\n", r"no 'label' .* or 'labels' .* column"),
        ("name,label\na.wav,dog\n", r"no path column"),
    ],
)
def test_bad_rows_name_the_line(tmp_path, rows, message):
    write_audio(tmp_path / "a.wav")
    manifest = tmp_path / "set.csv"
    manifest.write_text(rows)
    with pytest.raises(InputError, match=message):
        read_labelled(manifest)


# ------------------------------------------------------------------------------------------ metrics
def test_average_precision_equals_scikit_learn():
    metrics = pytest.importorskip("sklearn.metrics")
    rng = np.random.default_rng(0)
    for _ in range(20):
        targets = rng.integers(0, 2, size=(40, 5))
        targets[:, 0] = 0  # a class without positives is left out of the mean
        scores = np.round(rng.standard_normal((40, 5)), 1)  # ties
        ours = [average_precision(torch.tensor(scores[:, c]), torch.tensor(targets[:, c])) for c in range(1, 5)]
        theirs = [metrics.average_precision_score(targets[:, c], scores[:, c]) for c in range(1, 5)]
        np.testing.assert_allclose(ours, theirs, atol=1e-12)
        assert mean_average_precision(torch.tensor(scores), torch.tensor(targets)) == pytest.approx(np.mean(theirs))


def test_average_precision_hand_case():
    # ranking: pos, neg, pos -> precision 1 at recall 0.5, 2/3 at recall 1 -> AP = 0.5 + 0.5 * 2/3
    assert average_precision(torch.tensor([0.9, 0.8, 0.7]), torch.tensor([1, 0, 1])) == pytest.approx(5 / 6)


def test_grouped_holdout_keeps_groups_together():
    groups = [f"g{i // 3}" for i in range(30)]
    held = grouped_holdout(groups, 0.25, seed=0)
    for group in set(groups):
        assert len({h for g, h in zip(groups, held) if g == group}) == 1
    assert sum(held) == 6  # round(10 groups * 0.25) = 2 groups of 3 items


def test_stratified_holdout_takes_a_share_of_each_class_and_never_a_whole_class():
    labels = ["a"] * 20 + ["b"] * 6 + ["c"] * 2
    groups = [f"{label}{i // 2}" for i, label in enumerate(labels)]  # 10, 3 and 1 groups of two items
    for seed in range(5):
        held = grouped_holdout(groups, 0.4, seed=seed, strata=labels)
        for group in set(groups):
            assert len({h for g, h in zip(groups, held) if g == group}) == 1
        per_class = {label: sum(h for lab, h in zip(labels, held) if lab == label) for label in "abc"}
        assert per_class == {"a": 8, "b": 2, "c": 2}  # round(10 * 0.4) groups, round(3 * 0.4), the one group
    draws = {tuple(grouped_holdout(groups, 0.4, seed=seed, strata=labels)) for seed in range(5)}
    assert len(draws) > 1  # the seed changes the draw
    assert grouped_holdout(groups, 0.4, seed=3, strata=labels) == grouped_holdout(groups, 0.4, seed=3, strata=labels)


def test_grouped_folds_keep_groups_together():
    groups = [f"g{i % 7}" for i in range(35)]
    folds = grouped_folds(groups, 4, seed=1)
    for group in set(groups):
        assert len({f for g, f in zip(groups, folds) if g == group}) == 1
    assert sorted(set(folds)) == [0, 1, 2, 3]


@pytest.mark.slow
def test_logistic_regression_fits_separable_classes():
    rng = np.random.default_rng(0)
    x = torch.tensor(np.concatenate([rng.normal(-2, 1, (50, 3)), rng.normal(2, 1, (50, 3))]))
    y = torch.tensor([0] * 50 + [1] * 50)
    weight, bias = fit_linear(x, y, l2=1e-3, multi_label=False)
    assert ((x.double() @ weight + bias).argmax(1) == y).double().mean() > 0.95
    groups = [str(i) for i in range(100)]
    l2, cross_val, test = linear_probe(x, y, groups, x, y, multi_label=False)
    assert cross_val > 0.9 and test > 0.95


# ------------------------------------------------------------------------------------------ command
def two_class_set(tmp_path):
    rows = ["path,label,split,group"]
    for index in range(16):
        split = "test" if index % 4 == 0 else "train"
        low = write_audio(tmp_path / "tone" / f"{index}.wav", seconds=1.0, freq=150 + 10 * index)
        noise = write_audio(tmp_path / "hiss" / f"{index}.wav", seconds=1.0, freq=0.0, noise=0.3, seed=index)
        rows += [f"{low.relative_to(tmp_path)},tone,{split},t{index}", f"{noise.relative_to(tmp_path)},hiss,{split},n{index}"]
    manifest = tmp_path / "set.csv"
    manifest.write_text("\n".join(rows) + "\n")
    return manifest


@pytest.mark.slow
def test_atst_probe_separates_two_obvious_classes(tmp_path, frame_small_ckpt):
    manifest = two_class_set(tmp_path)
    out = tmp_path / "probe.json"
    result = CliRunner().invoke(main, [str(manifest), "--model", str(frame_small_ckpt), "--model", "logmel",
                                       "--model", f"random:{frame_small_ckpt}", "--n-blocks", "2",
                                       "--device", "cpu", "--json", str(out)])
    assert result.exit_code == 0, result.output
    payload = json.loads(out.read_text())
    scores = {r["model"]: r for r in payload["results"]}
    assert payload["split"] == "the manifest's split column"
    for name in (str(frame_small_ckpt), "logmel", f"random:{frame_small_ckpt}"):
        assert scores[name]["test"] == 1.0 and scores[name]["n_test"] == 8 and scores[name]["metric"] == "accuracy"
    assert scores[str(frame_small_ckpt)]["dims"] == 2 * 384 and scores["logmel"]["dims"] == 128
    assert "test accuracy" in result.output


@pytest.mark.slow
def test_atst_probe_resplits_score_each_model_on_the_same_fresh_splits(tmp_path):
    manifest = two_class_set(tmp_path)
    out = tmp_path / "probe.json"
    result = CliRunner().invoke(main, [str(manifest), "--model", "logmel", "--resplits", "3", "--no-cache",
                                       "--json", str(out)])
    assert result.exit_code == 0, result.output
    payload = json.loads(out.read_text())
    assert payload["resplits"] == {"count": 3, "test_share": 0.25}  # 8 of the 32 groups are in the test split
    (logmel,) = payload["results"]
    assert logmel["resplits"] == [1.0, 1.0, 1.0] and logmel["test"] == 1.0
    assert "3 re-splits" in result.output and "1.000 ± 0.000" in result.output


def test_atst_probe_resplits_need_the_logreg_protocol(tmp_path):
    manifest = two_class_set(tmp_path)
    result = CliRunner().invoke(main, [str(manifest), "--model", "logmel", "--protocol", "reference", "--resplits", "2"])
    assert result.exit_code == 1
    assert "--resplits works with --protocol logreg" in result.output and "Traceback" not in result.output


def test_atst_probe_reports_bad_manifest_in_one_line(tmp_path):
    manifest = tmp_path / "set.csv"
    manifest.write_text("path,label\nnothing.wav,dog\n")
    result = CliRunner().invoke(main, [str(manifest), "--model", "logmel"])
    assert result.exit_code == 1
    assert "line 2: no such audio file" in result.output and "Traceback" not in result.output


@pytest.mark.slow
def test_atst_probe_reference_protocol_and_its_cache(tmp_path, frame_small_ckpt):
    manifest = two_class_set(tmp_path)
    cache, out = tmp_path / "cache", tmp_path / "probe.json"
    arguments = [str(manifest), "--model", str(frame_small_ckpt), "--model", "logmel", "--protocol", "reference",
                 "--learning-rate", "0.1", "--learning-rate", "1.0", "--epochs", "20", "--n-blocks", "1",
                 "--device", "cpu", "--cache", str(cache), "--json", str(out)]
    result = CliRunner().invoke(main, arguments)
    assert result.exit_code == 0, result.output
    first = json.loads(out.read_text())
    assert first["protocol"] == "reference" and "valid 15% of the train groups" in first["split"]
    for r in first["results"]:
        assert r["protocol"] == "reference" and r["setting"].startswith(("lr 0.1 ", "lr 1 ")) and r["test"] == 1.0
        assert r["n_train"] + r["n_test"] < 32  # the valid clips are neither
    assert len(list(cache.glob("*.pt"))) == 2  # one entry per model
    stamps = {p: p.stat().st_mtime_ns for p in cache.glob("*.pt")}
    assert CliRunner().invoke(main, arguments).exit_code == 0
    assert {p: p.stat().st_mtime_ns for p in cache.glob("*.pt")} == stamps  # read, not recomputed
    assert [r["test"] for r in json.loads(out.read_text())["results"]] == [r["test"] for r in first["results"]]
