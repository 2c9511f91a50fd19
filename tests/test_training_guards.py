"""Bad batches and collapse in atst-train (:mod:`atst_features.training.guards`): a non-finite step is
skipped without a trace, counted and reported; too many in a row stop the run with one line and the
checkpoints as they were; the collapse diagnostic warns once when it stays low."""

from __future__ import annotations

import copy
import csv
import math
from pathlib import Path

import pytest
import soundfile
import torch
from conftest import waveform, write_two_classes

L = pytest.importorskip("lightning")

from atst_features.errors import TrainingDiverged  # noqa: E402
from atst_features.training import guards  # noqa: E402
from atst_features.training.augment import Mixup  # noqa: E402
from atst_features.training.cli import main as train_main  # noqa: E402
from atst_features.training.finetune import FineTuning  # noqa: E402
from atst_features.training.guards import CollapseWatch, FiniteSteps, all_finite  # noqa: E402
from atst_features.training.module import FramePretraining  # noqa: E402

NAN = float("nan")


@pytest.fixture(scope="module")
def audio_folder(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("audio")
    for index in range(24):
        soundfile.write(folder / f"{index:02d}.flac", waveform(1.5 + (index % 5) * 0.7, index), 16000)
    return folder


def poison(steps, record=()):
    """A LightningModule ``on_train_batch_start`` hook: NaN into the first clip of the batches of the
    optimizer steps ``steps`` (in place, before the forward pass); with ``record``, a copy of the
    module's state and optimizer state before the batches of the steps in ``record``."""
    states = {}

    def hook(self, batch, batch_idx):
        step = self.trainer.global_step
        if step in record:
            states[step] = (copy.deepcopy(self.state_dict()), copy.deepcopy(self.trainer.optimizers[0].state_dict()))
        if step in steps:
            batch[0][0] = NAN

    return hook, states


def assert_same(first, second, same: bool = True):
    """Whether two (nested) state dicts are equal, NaN included, or (``same=False``) differ somewhere."""
    flat = []

    def walk(a, b):
        if isinstance(a, dict):
            assert a.keys() == b.keys()
            for key in a:
                walk(a[key], b[key])
        elif isinstance(a, (list, tuple)):
            for x, y in zip(a, b):
                walk(x, y)
        elif isinstance(a, torch.Tensor):
            flat.append(torch.equal(a, b) or bool(torch.isclose(a, b, rtol=0, atol=0, equal_nan=True).all()))
        else:
            flat.append(a == b)

    walk(first, second)
    assert all(flat) if same else not all(flat)


# ------------------------------------------------------------------------------------------ units
def test_all_finite():
    assert all_finite([]) and all_finite([torch.ones(3), torch.zeros(2, dtype=torch.bfloat16)])
    assert not all_finite([torch.ones(3), torch.tensor([1.0, NAN])])
    assert not all_finite([torch.tensor([float("inf")], dtype=torch.bfloat16), torch.ones(2)])
    assert not all_finite([torch.full((4,), 1e20)])  # a norm past float32's range: no usable step either


class Tiny(L.LightningModule):
    """Mixup bank -> Linear -> BatchNorm, the loss their square: the stateful parts of the real modules."""

    def __init__(self, optimizer: str) -> None:
        super().__init__()
        self.optimizer = optimizer
        self.mixup = Mixup(ratio=0.4, memory=32)
        self.linear = torch.nn.Linear(8, 3)
        self.norm = torch.nn.BatchNorm1d(3)

    def training_step(self, batch, batch_idx):
        x = self.mixup(batch[0]).flatten(1)
        return self.norm(self.linear(x)).pow(2).mean() + self.linear.weight.pow(2).sum()

    def configure_optimizers(self):
        if self.optimizer == "adamw":
            return torch.optim.AdamW(self.parameters(), lr=0.1)
        return torch.optim.SGD(self.parameters(), lr=0.1, momentum=0.9)


@pytest.mark.parametrize("optimizer", ["adamw", "sgd"])
def test_a_nan_step_leaves_weights_optimizer_statistics_and_bank_unchanged(optimizer, tmp_path, monkeypatch, capsys):
    hook, states = poison({3}, record={3, 4, 5})
    monkeypatch.setattr(Tiny, "on_train_batch_start", hook, raising=False)
    data = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(torch.randn(24, 2, 4)), batch_size=4)
    module, finite = Tiny(optimizer), FiniteSteps()
    trainer = L.Trainer(accelerator="cpu", max_steps=6, logger=False, enable_checkpointing=False, log_every_n_steps=1,
                        enable_progress_bar=False, enable_model_summary=False, callbacks=[finite],
                        default_root_dir=tmp_path)
    trainer.fit(module, data)
    assert trainer.global_step == 6 and finite.skipped == 1
    assert float(trainer.callback_metrics["skipped_steps"]) == 1.0
    (weights_3, optimizer_3), (weights_4, optimizer_4), (weights_5, _) = states[3], states[4], states[5]
    assert_same(weights_3, weights_4)  # step 3 skipped: parameters and BatchNorm statistics as before it
    assert_same(optimizer_3, optimizer_4)  # AdamW's moments and step count / SGD's momentum too
    assert_same(weights_4, weights_5, same=False)  # step 4 trained
    assert optimizer_3["state"] and all(torch.isfinite(p).all() for p in module.parameters())
    bank = module.mixup.bank[: module.mixup.filled]
    assert torch.isfinite(bank).all() and module.mixup.filled == 8  # the poisoned bank was emptied, then refilled
    err = capsys.readouterr().err
    assert "warning: step 3: non-finite loss or gradients, the step is skipped (1 skipped in all, 1 in a row" in err


def test_consecutive_bad_steps_stop_the_run(tmp_path, monkeypatch, capsys):
    hook, _ = poison(set(range(2, 100)))
    monkeypatch.setattr(Tiny, "on_train_batch_start", hook, raising=False)
    data = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(torch.randn(200, 2, 4)), batch_size=2)
    trainer = L.Trainer(accelerator="cpu", max_steps=90, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, default_root_dir=tmp_path,
                        callbacks=[FiniteSteps(max_consecutive=40), FiniteSteps(max_consecutive=3)])  # the first acts
    with pytest.raises(TrainingDiverged, match=r"^training diverged: 40 optimizer steps in a row \(steps 2 to 41\)"):
        trainer.fit(Tiny("adamw"), data)
    warnings = [line for line in capsys.readouterr().err.splitlines() if line.startswith("warning:")]
    assert [line.split(":")[1] for line in warnings] == [f" step {k}" for k in (2, 3, 4, 5, 6, 9, 17, 33)]  # 1-5, 8, 16, 32
    assert "from now on only the 8th, 16th, ... are reported" in warnings[4]


def test_max_consecutive_is_checked():
    with pytest.raises(ValueError, match="max_consecutive must be an integer >= 1"):
        FiniteSteps(max_consecutive=0)


class _Trainer:
    def __init__(self) -> None:
        self.global_step, self.log_every_n_steps, self.callback_metrics = 0, 1, {}


def test_collapse_warns_once_per_fall(capsys):
    watch = CollapseWatch()
    trainer = _Trainer()
    trainer.callbacks = [watch]
    watch.setup(trainer, FramePretraining(arch="small", embed_dim=64, depth=1, num_heads=2, projector_hidden_dim=32,
                                          projector_out_dim=64), "fit")
    assert watch.limit == pytest.approx(0.1 / 8)
    # low from step 3 (NaN: not counted); at step 9 back above the threshold, not above twice it: no new warning;
    # at step 13 recovered, then low again
    student = [0.1, 0.05, 0.01, 0.01, NAN, 0.01, 0.01, 0.01, 0.02, 0.005, 0.005, 0.005, 0.05, 0.005, 0.005, 0.005]
    for step, value in enumerate(student, start=1):
        trainer.global_step = step
        trainer.callback_metrics = {"std_student": torch.tensor(value), "std_teacher": torch.tensor(0.1)}
        watch.on_train_batch_end(trainer, None, None, None, 0)
    lines = capsys.readouterr().err.splitlines()
    assert lines == [
        "warning: step 6: std_student 0.01 has stayed below 0.0125 (0.1/sqrt(64); about 0.125 when healthy): "
        "the outputs are collapsing to a constant (see Collapse in docs/training.md)",
        "warning: step 16: std_student 0.005 has stayed below 0.0125 (0.1/sqrt(64); about 0.125 when healthy): "
        "the outputs are collapsing to a constant (see Collapse in docs/training.md)",
    ]


def test_collapse_is_not_watched_without_projector_dim():
    watch, trainer = CollapseWatch(), _Trainer()
    trainer.callbacks = [watch]
    watch.setup(trainer, Tiny("sgd"), "fit")
    assert watch.limit is None


# ------------------------------------------------------------------------------------------ atst-train
def frame_tiny(audio_folder, tmp_path, monkeypatch, *options):
    """``atst-train frame --config frame-tiny`` in ``tmp_path``: (exit code, stderr, run folder)."""
    monkeypatch.chdir(tmp_path)
    code = 0
    try:
        train_main(["frame", "--config", "frame-tiny", "--data.path", str(audio_folder),
                    "--trainer.enable_progress_bar", "false", *options])
    except SystemExit as stop:
        code = stop.code
    return code, tmp_path / "runs/frame-tiny"


def metrics(run: Path) -> list[dict]:
    with open(next(run.glob("csv/*/metrics.csv")), newline="") as stream:
        return list(csv.DictReader(stream))


@pytest.mark.slow
def test_atst_train_skips_a_nan_batch(audio_folder, tmp_path, monkeypatch, capsys):
    hook, states = poison({7}, record={7, 8, 9})
    monkeypatch.setattr(FramePretraining, "on_train_batch_start", hook, raising=False)
    code, run = frame_tiny(audio_folder, tmp_path, monkeypatch)
    err = capsys.readouterr().err
    assert code == 0, err[-3000:]
    warnings = [line for line in err.splitlines() if line.startswith("warning:")]
    assert warnings == ["warning: step 7: non-finite loss or gradients, the step is skipped (1 skipped in all, "
                        "1 in a row; 20 in a row stop the run)"]  # and no collapse warning on a healthy run
    rows = {int(row["step"]): row for row in metrics(run) if row.get("loss")}
    assert math.isnan(float(rows[7]["loss"])) and all(math.isfinite(float(rows[k]["loss"])) for k in rows if k != 7)
    assert [float(rows[k]["skipped_steps"]) for k in (6, 7, 29)] == [0.0, 1.0, 1.0]
    (weights_7, optimizer_7), (weights_8, _), (weights_9, _) = states[7], states[8], states[9]
    assert_same(weights_7, weights_8)  # student, EMA teacher and BatchNorm statistics as before step 7
    assert_same(weights_8, weights_9, same=False)
    assert_same(optimizer_7["state"], states[8][1]["state"])  # AdamW's moments and step counts (lr follows the schedule)
    checkpoint = torch.load(run / "checkpoints/last.ckpt", weights_only=False)
    assert checkpoint["global_step"] == 30 and checkpoint["skipped_steps"] == 1
    assert all(torch.isfinite(value).all() for value in checkpoint["state_dict"].values())


@pytest.mark.slow
def test_atst_train_stops_after_bad_steps_in_a_row(audio_folder, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(FramePretraining, "on_train_batch_start", poison(set(range(12, 100)))[0], raising=False)
    code, run = frame_tiny(audio_folder, tmp_path, monkeypatch, "--trainer.callbacks+=atst_features.training.guards.FiniteSteps",
                           "--trainer.callbacks.max_consecutive", "5")
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert code == 1 and "Traceback" not in err, err[-3000:]
    assert errors == ["error: training diverged: 5 optimizer steps in a row (steps 12 to 16) had a non-finite loss or "
                      "gradients and were skipped; the weights are those from before step 12. Lower the learning rate "
                      "(--model.learning_rate) or check the data, then resume from the last checkpoint with --ckpt_path last"]
    # the checkpoint of step 10, none written by the failure
    assert sorted(path.name for path in (run / "checkpoints").iterdir()) == ["epoch=1-step=10.ckpt", "last.ckpt"]
    assert torch.load(run / "checkpoints/last.ckpt", weights_only=False)["global_step"] == 10


@pytest.mark.slow
def test_atst_train_takes_the_default_max_consecutive(audio_folder, tmp_path, monkeypatch, capsys):
    assert guards.MAX_CONSECUTIVE == 20
    monkeypatch.setattr(guards, "MAX_CONSECUTIVE", 3)  # the module-wide default the CLI's FiniteSteps() takes
    monkeypatch.setattr(FramePretraining, "on_train_batch_start", poison({1, 2, 3})[0], raising=False)
    code, _ = frame_tiny(audio_folder, tmp_path, monkeypatch, "--model.max_steps", "5")
    assert code == 1 and "error: training diverged: 3 optimizer steps in a row (steps 1 to 3)" in capsys.readouterr().err


@pytest.fixture(scope="module")
def two_classes(tmp_path_factory):
    return write_two_classes(tmp_path_factory.mktemp("two-classes"), per_class=12)


@pytest.mark.slow
def test_fine_tuning_skips_a_nan_batch(two_classes, tmp_path, monkeypatch, capsys):
    hook, states = poison({2}, record={2, 3})
    monkeypatch.setattr(FineTuning, "on_train_batch_start", hook, raising=False)
    monkeypatch.chdir(tmp_path)
    train_main(["finetune", "--config", "finetune-tiny", "--data.manifest", str(two_classes / "set.csv"),
                "--model.max_epochs", "2", "--trainer.enable_progress_bar", "false"])
    err = capsys.readouterr().err
    assert "warning: step 2: non-finite loss or gradients, the step is skipped (1 skipped in all" in err
    assert_same(states[2][0], states[3][0])  # the weights and the head's BatchNorm statistics as before step 2
    assert_same(states[2][1]["state"], states[3][1]["state"])  # SGD's momentum
    rows = list(csv.DictReader(open(next(tmp_path.glob("runs/finetune-tiny/csv/*/metrics.csv")))))
    assert max(float(row["skipped_steps"]) for row in rows if row.get("skipped_steps")) == 1.0
    assert all(math.isfinite(float(row["valid_score"])) for row in rows if row.get("valid_score"))
    checkpoint = torch.load(tmp_path / "runs/finetune-tiny/checkpoints/last.ckpt", weights_only=False)
    assert all(torch.isfinite(value).all() for value in checkpoint["state_dict"].values() if value.is_floating_point())
