"""Downstream: layer-wise groups, LinearHead, mixup, manifests' splits, fine-tuning, export, atst-tag."""

from __future__ import annotations

import csv
import json
import time

import numpy as np
import pytest
import soundfile
import torch
from click.testing import CliRunner
from conftest import write_audio, write_two_classes

from atst_features import load_model
from atst_features.cli.tag import tag
from atst_features.cli.tools import convert
from atst_features.encoder import EncoderConfig
from atst_features.errors import InputError
from atst_features.heads import LinearHead, audioset_labels
from atst_features.config import ModelConfig
from atst_features.model import ATSTModel
from atst_features.training.augment import LabelMixup
from atst_features.training.cli import main as train_main
from atst_features.training.finetune import FineTuning
from atst_features.training.supervised import layerwise_groups
from atst_features.audio import centre_crop
from atst_features.training.labelled import LabelledData
from atst_features.training.linear_eval import linear_evaluation, train_linear_head
from atst_features.training.manifests import read_labelled, split_items

RATE = 16000


def small_model(depth: int, cls_token: bool = False, num_classes: int = 3) -> ATSTModel:
    encoder = EncoderConfig(cls_token=cls_token, embed_dim=32, depth=depth, num_heads=2, mlp_hidden_dim=64)
    model = ATSTModel(ModelConfig("clip" if cls_token else "frame", encoder, num_classes=num_classes))
    model.encoder.mask_embed.requires_grad_(False)  # as model_from_source does: used only in pretraining
    return model


# ------------------------------------------------------------------------------------------ layer-wise decay
def reference_scale(name: str, depth: int, decay: float = 0.75) -> float:
    """The reference's ``layer_wise_lr_groups`` (12 blocks), written for any depth."""
    scales = [decay ** (depth - i) for i in range(depth + 1)]
    if name.startswith(("patch_embed", "pos_embed", "cls_token")):
        return scales[0]
    if name.startswith("blocks."):
        return scales[int(name.split(".")[1])]
    if name.startswith("norm."):
        return scales[-2]
    return scales[-1]  # the head


@pytest.mark.parametrize("depth, cls_token", [(12, False), (6, False), (12, True)])
def test_layerwise_groups_follow_the_reference_formula(depth, cls_token):
    model = small_model(depth, cls_token)
    groups = layerwise_groups(model, decay=0.75)
    scale_of = {id(p): g["lr_scale"] for g in groups for p in g["params"]}
    assert sum(len(g["params"]) for g in groups) == len(scale_of)  # no parameter in two groups
    trainable = [p for p in model.parameters() if p.requires_grad]
    assert len(scale_of) == len(trainable)  # nothing trainable is left out
    names = dict(model.encoder.named_parameters())
    for name, parameter in names.items():
        if name == "mask_embed":
            assert id(parameter) not in scale_of  # frozen: used only in pretraining
            continue
        assert scale_of[id(parameter)] == pytest.approx(reference_scale(name, depth)), name
    for parameter in model.head.parameters():
        assert scale_of[id(parameter)] == 1.0
    by_name = {g["name"]: g["lr_scale"] for g in groups}
    assert by_name["embeddings"] == pytest.approx(0.75**depth)
    assert by_name["block.0"] == pytest.approx(0.75**depth) and by_name[f"block.{depth - 1}"] == pytest.approx(0.75)
    assert by_name["norm"] == pytest.approx(0.75) and by_name["head"] == 1.0


def test_layerwise_groups_can_freeze_the_embeddings():
    groups = layerwise_groups(small_model(6), freeze_embed=True)
    assert "embeddings" not in {g["name"] for g in groups}


# ------------------------------------------------------------------------------------------ LinearHead
def test_linear_head_is_the_reference_one():
    torch.manual_seed(0)
    head = LinearHead(512, 1000)
    assert float(head.linear.weight.detach().std()) == pytest.approx(0.01, rel=0.02)
    assert float(head.linear.weight.detach().mean()) == pytest.approx(0.0, abs=2e-4)
    assert torch.count_nonzero(head.linear.bias) == 0
    assert not head.norm.affine and head.norm.weight is None
    head.eval()
    x = torch.randn(4, 512)
    expected = ((x - head.norm.running_mean) / torch.sqrt(head.norm.running_var + head.norm.eps)) @ head.linear.weight.T
    torch.testing.assert_close(head(x), expected)


# ------------------------------------------------------------------------------------------ mixup
def test_label_mixup_mixes_inputs_and_targets_with_one_weight():
    mixup = LabelMixup(alpha=0.5, memory=4, frames=8)
    rng = np.random.default_rng(0)
    first_x, first_y = torch.zeros(2, 3, 8), torch.tensor([[1.0, 0.0], [1.0, 0.0]])
    x, y = mixup(first_x, first_y, rng)
    assert torch.equal(x, first_x) and torch.equal(y, first_y)  # empty bank: unchanged
    second_x, second_y = torch.ones(2, 3, 8), torch.tensor([[0.0, 1.0], [0.0, 1.0]])
    x, y = mixup(second_x, second_y, rng)
    lam = y[:, 1]  # lam * 1 + (1 - lam) * 0 on both
    assert torch.all((lam > 0) & (lam < 1))
    torch.testing.assert_close(x, lam[:, None, None].expand_as(x))
    torch.testing.assert_close(y.sum(dim=1), torch.ones(2))
    assert mixup.filled == 4 and mixup.position == 0


def test_label_mixup_of_different_lengths_mixes_as_the_reference():
    """MixupSpecLabel: a shorter bank clip mixes over its own length at a random offset (the rest of
    x unmixed); a longer one gives a random segment of x's length; padding is never mixed in."""
    mixup = LabelMixup(alpha=0.5, memory=1, frames=20)
    rng = np.random.default_rng(3)
    z = torch.full((1, 2, 20), 10.0)
    z[0, :, :4] = 2.0  # bank entry: 4 valid frames of 2.0, then padding
    mixup(z, torch.tensor([[0.0, 1.0]]), rng, torch.tensor([4]))
    starts = set()
    for _ in range(30):
        x = torch.zeros(1, 2, 20)  # 12 valid frames of 0.0, then padding of 0.0
        mixed, y = mixup(x, torch.tensor([[1.0, 0.0]]), rng, torch.tensor([12]))
        lam = float(y[0, 0])
        changed = (mixed[0, 0] != 0).nonzero().flatten().tolist()
        assert len(changed) == 4 and changed == list(range(changed[0], changed[0] + 4)) and changed[-1] < 12
        torch.testing.assert_close(mixed[0, :, changed], torch.full((2, 4), (1 - lam) * 2.0))
        starts.add(changed[0])
        mixup(z, torch.tensor([[0.0, 1.0]]), rng, torch.tensor([4]))  # the short entry back in the bank
    assert starts <= set(range(8)) and len(starts) > 3  # offsets 0..7, as numpy's randint(0, 12 - 4)

    long = torch.arange(20.0).expand(1, 2, 20).clone()  # 16 valid frames 0..15, then 16..19 as padding
    mixup(long, torch.tensor([[0.0, 1.0]]), rng, torch.tensor([16]))
    x = torch.zeros(1, 2, 20)
    mixed, y = mixup(x, torch.tensor([[1.0, 0.0]]), rng, torch.tensor([5]))
    segment = mixed[0, 0, :5] / (1 - float(y[0, 0]))  # (1 - lam) * z[start:start + 5]
    start = round(float(segment[0]))
    torch.testing.assert_close(segment, torch.arange(start, start + 5.0))
    assert 0 <= start < 11 and bool((mixed[0, :, 5:] == 0).all())  # inside z's 16 frames; x's padding untouched


# ------------------------------------------------------------------------------------------ data
@pytest.fixture(scope="module")
def two_classes(tmp_path_factory):
    """Tones and noise, 1.5 s each: 16 train, 4 valid and 4 test clips per class."""
    return write_two_classes(tmp_path_factory.mktemp("two-classes"), per_class=24)


def test_split_items_holds_out_whole_groups(tmp_path):
    rows = ["path,label,group"]
    for index in range(40):
        write_audio(tmp_path / f"{index}.wav", 0.2)
        rows.append(f"{index}.wav,{'ab'[index % 2]},g{index // 2}")
    (tmp_path / "set.csv").write_text("\n".join(rows) + "\n")
    splits, how = split_items(read_labelled(tmp_path / "set.csv"), seed=3)
    groups = {name: {item.group for item in items} for name, items in splits.items()}
    assert sum(len(items) for items in splits.values()) == 40
    assert not (groups["train"] & groups["valid"]) and not (groups["train"] & groups["test"])
    assert not (groups["valid"] & groups["test"])
    assert len(groups["test"]) == 6 and len(groups["valid"]) == 2 and "seeded grouped" in how


def test_labelled_data_reads_splits_and_checks_other_manifests(two_classes, tmp_path):
    data = LabelledData(str(two_classes / "set.csv"), batch_size=4, num_workers=0)
    assert data.label_names == ["tone", "noise"] and not data.multi_label
    assert {name: len(items) for name, items in data.splits.items()} == {"train": 32, "valid": 8, "test": 8}
    waves, lengths, targets = next(iter(data.train_dataloader()))
    assert waves.shape == (4, 24000) and lengths.tolist() == [24000] * 4 and targets.dtype == torch.int64
    other = tmp_path / "test.csv"
    write_audio(tmp_path / "x.wav", 0.5)
    other.write_text("path,label\nx.wav,bird\n")
    with pytest.raises(InputError, match=r"labels \['bird'\] do not occur"):
        LabelledData(str(two_classes / "set.csv"), test_manifest=str(other))


def test_centre_crop_takes_the_middle():
    x = np.arange(10)
    assert centre_crop(x, 4).tolist() == [3, 4, 5, 6] and centre_crop(x, 20).tolist() == x.tolist()


# ------------------------------------------------------------------------------------------ features
@pytest.mark.slow
@pytest.mark.parametrize("fixture", ["frame_small_ckpt", "clip_small_ckpt"])
def test_training_feature_equals_the_inference_clip_embedding(fixture, request):
    source = str(request.getfixturevalue(fixture))
    module = FineTuning(init=source, labels=["a", "b"], drop_path_rate=0.0).eval()
    rng = np.random.default_rng(0)
    waves = [0.1 * rng.standard_normal(n).astype(np.float32) for n in (16000 * 9, 16000 * 3, 4000)]
    lengths = torch.tensor([len(w) for w in waves])
    padded = torch.nn.utils.rnn.pad_sequence([torch.from_numpy(w) for w in waves], batch_first=True)
    with torch.no_grad():
        mel, n_frames = module.spectrograms(padded, lengths)
        feature = module.features(mel, n_frames)
    reference = module.model.get_clip_embedding([torch.from_numpy(w) for w in waves], n_blocks=1)
    torch.testing.assert_close(feature, reference, atol=2e-5, rtol=1e-4)


# ------------------------------------------------------------------------------------------ fine-tuning
@pytest.fixture(scope="module")
def finetuned(two_classes, tmp_path_factory):
    """``atst-train finetune --config finetune-tiny`` on the two classes: (run folder, seconds)."""
    run = tmp_path_factory.mktemp("finetune-run")
    started = time.perf_counter()
    patch = pytest.MonkeyPatch()
    patch.chdir(run)
    try:
        train_main(["finetune", "--config", "finetune-tiny", "--data.manifest", str(two_classes / "set.csv"),
                    "--trainer.enable_progress_bar", "false"])
    finally:
        patch.undo()
    return run, time.perf_counter() - started


@pytest.mark.slow
def test_finetuning_the_tiny_preset_learns_two_classes(finetuned):
    run, seconds = finetuned
    with open(run / "runs/finetune-tiny/csv/version_0/metrics.csv") as stream:
        rows = list(csv.DictReader(stream))
    train = [float(r["train_accuracy"]) for r in rows if r.get("train_accuracy")]
    valid = [float(r["valid_score"]) for r in rows if r.get("valid_score")]
    test = [float(r["test_accuracy"]) for r in rows if r.get("test_accuracy")]
    print(f"fine-tuning the tiny preset took {seconds:.1f} s; train accuracy per epoch {train}")
    assert len(train) == 8 and max(train) >= 0.95
    assert max(valid) >= 0.95 and test == [1.0]
    checkpoint = torch.load(next((run / "runs/finetune-tiny/checkpoints").glob("epoch=*.ckpt")), weights_only=True)
    assert checkpoint["hyper_parameters"]["labels"] == ["tone", "noise"]


@pytest.mark.slow
def test_export_and_atst_tag_round_trip(finetuned, two_classes, tmp_path):
    run, _ = finetuned
    best = next((run / "runs/finetune-tiny/checkpoints").glob("epoch=*.ckpt"))
    folder = tmp_path / "tagger"
    result = CliRunner().invoke(convert, [str(best), str(folder)])
    assert result.exit_code == 0, result.output
    model = load_model(folder, device="cpu")
    assert model.labels == ("tone", "noise") and not model.config.multi_label
    assert json.loads((folder / "config.json").read_text())["model"]["labels"] == ["tone", "noise"]
    clips = [str(two_classes / "tone/20.wav"), str(two_classes / "noise/21.wav")]
    assert model.get_tag_logits(clips[0]).shape == (1, 2)

    result = CliRunner().invoke(tag, [*clips, "--model", str(folder), "-k", "2", "--num-workers", "0", "-q"])
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    assert lines[0].endswith("tone/20.wav") and lines[1].split()[1] == "tone" and float(lines[1].split()[0]) > 0.5
    assert lines[3].endswith("noise/21.wav") and lines[4].split()[1] == "noise"

    out = tmp_path / "tags.csv"
    result = CliRunner().invoke(tag, [*clips, "--model", str(folder), "-k", "1", "-o", str(out), "-q"])
    assert result.exit_code == 0, result.output
    rows = list(csv.DictReader(out.open()))
    assert [(r["label"], r["rank"]) for r in rows] == [("tone", "1"), ("noise", "1")]
    result = CliRunner().invoke(tag, [*clips, "--model", str(folder), "-o", str(out)])
    assert result.exit_code == 2 and "--overwrite" in result.output

    long = tmp_path / "long.wav"
    tone, noise = soundfile.read(clips[0])[0], soundfile.read(clips[1])[0]
    soundfile.write(long, np.concatenate([np.tile(tone, 8), np.tile(noise, 8)]).astype(np.float32), RATE)  # 24 s
    result = CliRunner().invoke(tag, [str(long), "--model", str(folder), "-k", "1", "--per-window", "--format", "json", "-q"])
    assert result.exit_code == 0, result.output
    windows = json.loads(result.output)
    assert [(w["start"], w["end"]) for w in windows] == [(0.0, 10.0), (10.0, 20.0), (20.0, 24.0)]
    assert windows[0]["label"] == "tone" and windows[2]["label"] == "noise"


def test_atst_tag_refuses_a_model_without_head(frame_small_ckpt, two_classes):
    result = CliRunner().invoke(tag, [str(two_classes / "tone/0.wav"), "--model", str(frame_small_ckpt)])
    assert result.exit_code == 1 and "has no tagging head" in result.output and "Traceback" not in result.output


# ------------------------------------------------------------------------------------------ labels
def test_audioset_names_ship_in_order():
    names = audioset_labels()
    assert len(names) == 527 and names[0] == "Speech" and names[137] == "Music" and names[526] == "Field recording"
    assert names[1] == "Male speech, man speaking" and len(set(names)) == 527


def test_c2f_head_is_named_with_audioset_classes():
    encoder = EncoderConfig(cls_token=False, embed_dim=32, depth=2, num_heads=2, mlp_hidden_dim=64)
    assert ATSTModel(ModelConfig("c2f", encoder, num_classes=527)).labels[0] == "Speech"
    assert ATSTModel(ModelConfig("frame", encoder, num_classes=2)).labels == ("class_0", "class_1")
    assert ATSTModel(ModelConfig("frame", encoder)).labels == ()
    with pytest.raises(ValueError, match="2 label names for a head of 3 classes"):
        ModelConfig("frame", encoder, num_classes=3, labels=("a", "b"))


# ------------------------------------------------------------------------------------------ linear evaluation
def test_reference_linear_evaluation_selects_on_valid():
    rng = np.random.default_rng(0)

    def block(n):
        x = np.concatenate([rng.normal(-1, 1, (n, 16)), rng.normal(1, 1, (n, 16))])
        return torch.tensor(x, dtype=torch.float32), torch.tensor([0] * n + [1] * n)

    (train_x, train_y), (valid_x, valid_y), (test_x, test_y) = block(100), block(50), block(50)
    head, epoch, valid = train_linear_head(train_x, train_y, valid_x, valid_y, multi_label=False, num_classes=2,
                                           learning_rate=0.5, epochs=20)
    assert 1 <= epoch <= 20 and valid > 0.95 and isinstance(head, LinearHead)
    result = linear_evaluation({"train": train_x, "valid": valid_x, "test": test_x},
                               {"train": train_y, "valid": valid_y, "test": test_y},
                               multi_label=False, num_classes=2, learning_rates=(1e-6, 0.5), epochs=20, progress=False)
    assert result.learning_rate == 0.5 and result.test > 0.95


def test_atst_train_without_the_train_extra_is_one_line(monkeypatch, capsys):
    import sys

    for name in [m for m in sys.modules if m == "lightning" or m.startswith("lightning.")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, "lightning", None)  # import lightning -> ImportError
    with pytest.raises(SystemExit) as stopped:
        train_main(["finetune", "--config", "finetune-tiny"])
    assert stopped.value.code == 1
    assert capsys.readouterr().err == "error: atst-train needs the train extra: pip install 'atst-features[train]'\n"


@pytest.fixture()
def one_corrupt_clip(two_classes, tmp_path):
    """The two classes' manifest with one training clip replaced by a file that is not audio."""
    rows = (two_classes / "set.csv").read_text().splitlines()
    (tmp_path / "broken.wav").write_bytes(b"RIFF\x00\x00\x00\x00WAVEjunk" * 8)
    rows = [rows[0], f"{tmp_path / 'broken.wav'},tone,train"] + [f"{two_classes / row}" for row in rows[1:]]
    (tmp_path / "set.csv").write_text("\n".join(rows) + "\n")
    return tmp_path / "set.csv"


@pytest.mark.slow
@pytest.mark.parametrize("workers", ["0", "1"])
def test_atst_train_names_an_unreadable_clip_in_one_line(one_corrupt_clip, workers, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as stopped:
        train_main(["finetune", "--config", "finetune-tiny", "--data.manifest", str(one_corrupt_clip),
                    "--data.num_workers", workers, "--trainer.enable_progress_bar", "false"])
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert stopped.value.code == 1 and "Traceback" not in err
    assert errors == [f"error: {str(tmp_path / 'broken.wav')!r}: cannot decode (Error in WAV file. No 'data' chunk "
                      "marker); convert it to WAV/FLAC/OGG/MP3, e.g. ffmpeg -i INPUT -ac 1 -ar 16000 OUTPUT.wav"]


def test_atst_train_keeps_the_traceback_of_a_bug(two_classes, tmp_path, monkeypatch, capsys):
    from atst_features.training import labelled

    def broken(self, index):
        raise KeyError("a bug")

    monkeypatch.setattr(labelled.LabelledClips, "__getitem__", broken)
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as stopped:
        train_main(["finetune", "--config", "finetune-tiny", "--data.manifest", str(two_classes / "set.csv"),
                    "--trainer.enable_progress_bar", "false"])
    err = capsys.readouterr().err
    assert stopped.value.code == 1
    assert "Traceback (most recent call last)" in err and "KeyError: 'a bug'" in err
    assert err.rstrip().endswith("please report it with the traceback above")
