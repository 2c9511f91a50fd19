"""C2F distillation, sound event detection (heads, training, decoding, scoring) and their commands."""

from __future__ import annotations

import csv
import importlib.util
import json
import math
from pathlib import Path

import numpy as np
import pytest
import soundfile
import torch
from click.testing import CliRunner

from atst_features import load_model, save_pretrained
from atst_features.cli.detect import detect
from atst_features.cli.tools import convert, score
from atst_features.encoder import EncoderConfig
from atst_features.events import Event, decode_events, median_filter, read_events, read_strong_labels, write_events
from atst_features.heads import EventHead, weak_pooling
from atst_features.errors import InputError
from atst_features.config import ModelConfig
from atst_features.model import ATSTModel
from atst_features.scoring import event_based, segment_based
from atst_features.training.cli import main as train_main
from atst_features.training.distill import Distillation, distillation_loss
from atst_features.training.sed import event_targets, frame_targets

RATE = 16000
_spec = importlib.util.spec_from_file_location("detect_events", Path(__file__).parent.parent / "examples/detect_events.py")
example = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(example)
CLASSES, write_scenes = example.CLASSES, example.write_scenes


# ------------------------------------------------------------------------------------------ losses and heads
def test_distillation_loss_hand_cases():
    student = torch.tensor([[math.log(3.0), 0.0]])
    teacher = torch.tensor([[0.0, 0.0]])
    # BCE against sigmoid(teacher) = 0.5: -(0.5 log s + 0.5 log(1 - s)) per output, averaged
    s = torch.sigmoid(student)
    expected = float((-(0.5 * s.log() + 0.5 * (1 - s).log())).mean())
    assert float(distillation_loss(student, teacher, soft_labels=False)) == pytest.approx(expected)
    # soft cross-entropy against softmax(teacher) = [0.5, 0.5]; student softmax [0.75, 0.25]
    assert float(distillation_loss(student, teacher, soft_labels=True)) == pytest.approx(-(0.5 * math.log(0.75) + 0.5 * math.log(0.25)))
    student.requires_grad_(), teacher.requires_grad_()
    distillation_loss(student, teacher, soft_labels=True).backward()
    assert teacher.grad is None and student.grad is not None  # no gradient reaches the teacher


def test_attention_pooling_hand_case():
    strong = torch.tensor([[[0.9, 0.1], [0.3, 0.5]]])  # [B=1, T=2, C=2]
    weights = torch.tensor([[[3.0, 1.0], [1.0, 1.0]]])
    expected = torch.tensor([[(0.9 * 3 + 0.3 * 1) / 4, (0.1 + 0.5) / 2]])
    torch.testing.assert_close(weak_pooling(strong, weights), expected)
    head = EventHead(4, 2)
    tokens = torch.randn(2, 5, 4)
    full_strong, full_weak = head(tokens)
    masked_strong, masked_weak = head(tokens, torch.tensor([5, 3]))
    torch.testing.assert_close(masked_strong, full_strong)
    torch.testing.assert_close(masked_weak[0], full_weak[0])
    torch.testing.assert_close(masked_weak[1], head(tokens[1:, :3])[1][0])  # padded tokens do not count
    big = EventHead(256, 50)
    assert float(big.strong.weight.detach().std()) == pytest.approx(0.01, rel=0.05) and not big.strong.bias.any()


# ------------------------------------------------------------------------------------------ decoding
def test_median_filter_mirrors_edges_like_scipy():
    x = np.array([[0.0], [1.0], [0.0], [0.0], [1.0], [1.0], [0.0]])
    assert median_filter(x, 3)[:, 0].tolist() == [0.0, 0.0, 0.0, 0.0, 1.0, 1.0, 0.0]
    assert median_filter(x, 1)[:, 0].tolist() == x[:, 0].tolist()
    scipy = pytest.importorskip("scipy.ndimage")
    rng = np.random.default_rng(0)
    y = rng.random((50, 3))
    for size in (3, 4, 7):
        np.testing.assert_allclose(median_filter(y, size), scipy.median_filter(y, size=(size, 1)))


def test_decode_events_exact_times():
    p = np.zeros((50, 2))
    p[10:20, 0] = 0.9  # 0.40 s .. 0.80 s
    p[22:25, 0] = 0.8  # a gap of 2 frames (0.08 s), then 3 frames
    p[30:31, 1] = 0.7  # one frame of class b: removed by the median filter
    p[40:48, 1] = 0.6
    events = decode_events(p, ["a", "b"], filename="x.wav", threshold=0.5)
    assert [(e.label, e.onset, e.offset) for e in events] == [
        ("a", 0.4, 0.8), ("a", 0.88, 1.0), ("b", 1.2, 1.24), ("b", 1.6, 1.92)]
    merged = decode_events(p, ["a", "b"], median={"a": 1, "b": 3}, min_gap=0.1, min_length=0.2, threshold={"a": 0.5, "*": 0.65})
    assert [(e.label, e.onset, e.offset) for e in merged] == [("a", 0.4, 1.0)]
    assert merged[0].score == pytest.approx((0.9 * 10 + 0.8 * 3) / 15, abs=1e-4)  # the 2 gap frames count as 0
    with pytest.raises(ValueError, match="unknown labels"):
        decode_events(p, ["a", "b"], threshold={"c": 0.5})


def test_event_files_round_trip(tmp_path):
    events = [Event("a.wav", 0.5, 1.25, "dog", 0.9), Event("b.wav", 2.0, 3.0, "cat", 0.6)]
    write_events(events, tmp_path / "e.tsv")
    assert read_events(tmp_path / "e.tsv") == events
    (tmp_path / "bad.tsv").write_text("filename\tonset\toffset\tevent_label\na.wav\tx\t1\tdog\n")
    with pytest.raises(InputError, match="line 2: onset, offset and score must be numbers"):
        read_events(tmp_path / "bad.tsv")


def test_frame_targets_and_strong_labels(tmp_path):
    targets = frame_targets([(0.10, 0.30, "b"), (0.41, 0.43, "a")], {"a": 0, "b": 1}, 10, hop=0.04)
    # tokens of 40 ms: b covers [0.10, 0.30): token 2 ([0.08, 0.12)) by half, tokens 3..6 fully, token 7 by half
    assert targets[:, 1].tolist() == [0, 0, 1, 1, 1, 1, 1, 1, 0, 0]
    assert targets[:, 0].tolist() == [0] * 10  # 20 ms inside token 10: beyond the 10 tokens
    inside = frame_targets([(0.41, 0.43, "a")], {"a": 0}, 12, hop=0.04)
    assert inside[:, 0].nonzero().flatten().tolist() == [10]
    batch = event_targets([[(0.10, 0.30, "b")], None, [(0.41, 0.43, "a")]], {"a": 0, "b": 1}, 10, hop=0.04)
    assert torch.equal(batch[0], frame_targets([(0.10, 0.30, "b")], {"a": 0, "b": 1}, 10, hop=0.04))
    assert not batch[1].any() and not batch[2].any()  # a clip without strong labels; an event beyond 10 tokens
    assert event_targets([[(0.10, 0.30, "b")]], {"a": 0, "b": 1}, 5, hop=0.08)[0, :, 1].tolist() == [0, 1, 1, 1, 0]
    (tmp_path / "s.tsv").write_text("filename\tonset\toffset\tevent_label\na.wav\t1.0\t0.5\tdog\n")
    with pytest.raises(InputError, match="line 2: need 0 <= onset <= offset"):
        read_strong_labels(tmp_path / "s.tsv")


# ------------------------------------------------------------------------------------------ scoring
def test_event_based_f1_hand_case():
    reference = [Event("a", 1.0, 2.0, "x"), Event("a", 5.0, 6.0, "x"), Event("a", 3.0, 4.0, "y")]
    detected = [Event("a", 1.15, 2.1, "x"), Event("a", 5.3, 6.0, "x"), Event("a", 3.0, 4.0, "x")]
    scores = event_based(reference, detected)
    x, y = scores.per_class["x"], scores.per_class["y"]
    assert (x.tp, x.fp, x.fn) == (1, 2, 1) and (y.tp, y.fp, y.fn) == (0, 0, 1)
    assert scores.micro_f1 == pytest.approx(2 / (2 + 2 + 2))
    assert scores.macro_f1 == pytest.approx(0.4) and math.isnan(y.f1)  # y never detected: left out, as sed_eval
    segments = segment_based(reference, detected)
    assert (segments.per_class["x"].tp, segments.per_class["x"].fp, segments.per_class["x"].fn) == (2, 2, 0)  # s 1, 5; 2, 3


def test_scores_equal_sed_eval():
    sed_eval = pytest.importorskip("sed_eval")  # needs setuptools' pkg_resources (dcase_util)
    rng = np.random.default_rng(1)
    reference, detected = [], []
    for f in range(4):
        for _ in range(4):
            on = round(float(rng.uniform(0, 8)), 3)
            reference.append(Event(f"{f}.wav", on, round(on + float(rng.uniform(0.2, 2)), 3), str(rng.choice(["a", "b"]))))
            detected.append(Event(f"{f}.wav", round(on + float(rng.normal(0, 0.15)), 3),
                                  round(on + float(rng.uniform(0.2, 2)), 3), str(rng.choice(["a", "b"]))))
    events = sed_eval.sound_event.EventBasedMetrics(event_label_list=["a", "b"], t_collar=0.2, percentage_of_length=0.2)
    segments = sed_eval.sound_event.SegmentBasedMetrics(event_label_list=["a", "b"], time_resolution=1.0)
    as_dicts = lambda es, f: [dict(filename=e.filename, event_onset=e.onset, event_offset=e.offset, event_label=e.label) for e in es if e.filename == f]  # noqa: E731
    for f in sorted({e.filename for e in reference}):
        events.evaluate(reference_event_list=as_dicts(reference, f), estimated_event_list=as_dicts(detected, f))
        segments.evaluate(reference_event_list=as_dicts(reference, f), estimated_event_list=as_dicts(detected, f))
    assert event_based(reference, detected).micro_f1 == pytest.approx(events.results_overall_metrics()["f_measure"]["f_measure"])
    assert segment_based(reference, detected).macro_f1 == pytest.approx(
        segments.results_class_wise_average_metrics()["f_measure"]["f_measure"])


# ------------------------------------------------------------------------------------------ event probabilities
@pytest.fixture(scope="module")
def event_model():
    torch.manual_seed(0)
    encoder = EncoderConfig(cls_token=False, embed_dim=32, depth=2, num_heads=2, mlp_hidden_dim=64)
    model = ATSTModel(ModelConfig("frame", encoder, num_classes=3, labels=CLASSES, head_type="events", head_norm=True))
    model.head.norm.running_mean.normal_()
    return model.eval()


def test_event_probabilities_equal_one_pass_up_to_10_s(event_model):
    audio = np.random.default_rng(0).standard_normal(int(9.5 * RATE)).astype(np.float32) * 0.1
    frames, _ = event_model.get_frame_embeddings(audio, n_blocks=1)
    with torch.no_grad():
        expected_strong, expected_weak = event_model.head(frames)
    for hop in (2.0, 5.0, 10.0):
        strong, timestamps, weak = event_model.get_event_probabilities(audio, hop_seconds=hop)
        torch.testing.assert_close(strong[0], expected_strong[0])
        torch.testing.assert_close(weak[0], expected_weak[0])
        assert timestamps[0][:2].tolist() == [15.0, 55.0]
    torch.testing.assert_close(event_model.get_tag_probabilities(audio), expected_weak)
    with pytest.raises(ValueError, match="probabilities, not logits"):
        event_model.get_tag_logits(audio)


def test_overlapping_windows_average_the_token_probabilities(event_model):
    audio = np.random.default_rng(1).standard_normal(15 * RATE).astype(np.float32) * 0.1  # 375 tokens
    strong, _, _ = event_model.get_event_probabilities(audio, hop_seconds=5.0)
    assert strong[0].shape == (375, 3)
    mel, _ = event_model.frontend(torch.from_numpy(audio)[None])
    with torch.no_grad():
        windows = [event_model.head.frame_outputs(event_model.encoder(mel[..., first : first + 1000]).tokens[0])[0][0]
                   for first in (0, 500)]  # windows at 0 s and 5 s (125 tokens apart)
    torch.testing.assert_close(strong[0][:125], windows[0][:125])
    torch.testing.assert_close(strong[0][125:250], (windows[0][125:] + windows[1][:125]) / 2)
    torch.testing.assert_close(strong[0][250:], windows[1][125:])


# ------------------------------------------------------------------------------------------ end to end
@pytest.mark.slow
def test_sed_train_detect_score_end_to_end(tmp_path, monkeypatch):
    write_scenes(tmp_path / "train", 48, 5.0, seed=0)
    write_scenes(tmp_path / "test", 12, 5.0, seed=7)
    monkeypatch.chdir(tmp_path)
    train_main(["sed", "--config", "sed-tiny", "--data.audio", str(tmp_path / "train/audio"),
                "--data.strong", str(tmp_path / "train/strong.tsv"), "--trainer.enable_progress_bar", "false"])
    best = next((tmp_path / "runs/sed-tiny/checkpoints").glob("epoch=*.ckpt"))
    assert CliRunner().invoke(convert, [str(best), str(tmp_path / "detector")]).exit_code == 0
    model = load_model(tmp_path / "detector", device="cpu")
    assert model.labels == CLASSES and model.config.head_type == "events"

    result = CliRunner().invoke(detect, [str(tmp_path / "test/audio"), "--model", str(tmp_path / "detector"),
                                         "-o", str(tmp_path / "detected.tsv"), "--plot", str(tmp_path / "plots"), "-q"])
    assert result.exit_code == 0, result.output
    assert len(list((tmp_path / "plots").glob("*.png"))) == 12
    rows = list(csv.DictReader(open(tmp_path / "detected.tsv"), delimiter="\t"))
    assert rows and set(rows[0]) == {"filename", "onset", "offset", "event_label", "score"}

    result = CliRunner().invoke(score, [str(tmp_path / "test/strong.tsv"), str(tmp_path / "detected.tsv"),
                                        "--json", str(tmp_path / "scores.json")])
    assert result.exit_code == 0, result.output
    scores = json.loads((tmp_path / "scores.json").read_text())
    print(result.output)
    assert scores["event_based"]["micro_f1"] >= 0.8
    assert "event-based (onset collar 0.2 s" in result.output

    result = CliRunner().invoke(detect, [str(tmp_path / "test/audio/s000.wav"), "--model", str(tmp_path / "detector"),
                                         "--threshold", "cat=0.5"])
    assert result.exit_code == 1 and "unknown labels ['cat']" in result.output


# ------------------------------------------------------------------------------------------ distillation
@pytest.fixture(scope="module")
def teacher_folder(tmp_path_factory):
    """A small ATST-Clip model with a random tagging head for two classes, as a model folder."""
    torch.manual_seed(0)
    encoder = EncoderConfig(cls_token=True, embed_dim=32, depth=2, num_heads=2, mlp_hidden_dim=64)
    model = ATSTModel(ModelConfig("clip", encoder, num_classes=2, labels=("tone", "noise"), multi_label=False))
    return save_pretrained(model, tmp_path_factory.mktemp("teacher") / "clip")


@pytest.mark.slow
def test_distillation_teacher_is_frozen_and_every_student_parameter_trains(teacher_folder, tmp_path):
    import lightning as L

    from atst_features.training.labelled import LabelledData

    rows = ["path,label,split"]
    rng = np.random.default_rng(0)
    for index in range(8):
        for label in ("tone", "noise"):
            t = np.arange(RATE) / RATE
            x = 0.3 * np.sin(2 * np.pi * 500 * t) if label == "tone" else 0.2 * rng.standard_normal(RATE)
            soundfile.write(tmp_path / f"{label}{index}.wav", x.astype(np.float32), RATE)
            rows.append(f"{label}{index}.wav,{label},{'train' if index < 6 else 'valid'}")
    (tmp_path / "set.csv").write_text("\n".join(rows) + "\n")
    data = LabelledData(str(tmp_path / "set.csv"), batch_size=4, num_workers=0, crop_seconds=2.0)
    module = Distillation(init="atst-frame-mini", teacher=str(teacher_folder), labels=data.label_names,
                          project=True, max_epochs=1, warmup_epochs=0, learning_rate=1.0)
    assert module.model.kind == "c2f"
    assert all(not p.requires_grad for p in module.teacher.parameters())
    before = {k: v.clone() for k, v in module.teacher.state_dict().items()}
    student_before = module.model.encoder.blocks[0].attn.qkv.weight.detach().clone()
    trainer = L.Trainer(max_epochs=1, accelerator="cpu", logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0)
    trainer.fit(module, datamodule=data)
    groups = trainer.optimizers[0].param_groups
    in_groups = {id(p) for g in groups for p in g["params"]}
    trainable = [(n, p) for n, p in module.named_parameters() if p.requires_grad]
    assert [n for n, p in trainable if id(p) not in in_groups] == []  # nothing silently left out
    assert {n for n, p in module.named_parameters() if not p.requires_grad} == \
        {"model.encoder.mask_embed"} | {f"teacher.{n}" for n, _ in module.teacher.named_parameters()}
    after = module.teacher.state_dict()
    changed = [k for k in before if not torch.equal(before[k], after[k])]
    # the reference's teacher runs in training mode: only its BatchNorm running statistics move
    assert changed and all(k.startswith("head.norm.") for k in changed)
    assert not torch.equal(student_before, module.model.encoder.blocks[0].attn.qkv.weight)


def test_event_model_card_shows_detection(event_model, tmp_path):
    folder = save_pretrained(event_model, tmp_path / "detector")
    card = (folder / "README.md").read_text()
    assert "## Sound event detection" in card and "`beep`, `buzz`, `hiss`" in card and "atst-detect" in card
    assert "## Tagging" not in card


@pytest.mark.parametrize("mode, training", [
    ("last", {"blocks[0]": False, "blocks[-1]": True, "norm": True, "head": True}),
    ("freeze", {"blocks[0]": False, "blocks[-1]": False, "norm": False, "head": True}),
    ("full", {"blocks[0]": True, "blocks[-1]": True, "norm": True, "head": True}),
])
@pytest.mark.slow
def test_parts_that_do_not_train_run_in_eval_mode(tmp_path, mode, training):
    """The reference's DESED step: encoder.eval(), then the trained parts back in training mode
    (frozen blocks with DropPath would compute other features than at inference)."""
    import lightning as L

    from atst_features.training.sed import EventData, SoundEventDetection

    write_scenes(tmp_path, 8, 2.0, seed=0)
    data = EventData(str(tmp_path / "audio"), strong=str(tmp_path / "strong.tsv"), batch_size=4, num_workers=0)
    module = SoundEventDetection(init="atst-frame-mini", labels=data.label_names, mode=mode, max_epochs=1,
                                 warmup_epochs=0)
    seen = []

    class Modes(L.Callback):
        def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
            encoder = module.model.encoder
            parts = {"blocks[0]": encoder.blocks[0], "blocks[-1]": encoder.blocks[-1], "norm": encoder.norm,
                     "head": module.model.head}
            seen.append({name: part.training for name, part in parts.items()})

    trainer = L.Trainer(max_steps=2, accelerator="cpu", logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0, callbacks=[Modes()])
    trainer.fit(module, datamodule=data)
    assert seen == [training, training]
