"""Label-balanced sampling: the reference's weights and draws, sharding over ranks, and Lightning
keeping the sampler (one process and DDP over two)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import textwrap

import pytest
import torch
from conftest import write_audio
from torch.utils.data import WeightedRandomSampler

L = pytest.importorskip("lightning")

from atst_features.errors import InputError  # noqa: E402
from atst_features.training.labelled import LabelledData  # noqa: E402
from atst_features.training.sampling import BalancedSampler, label_balanced_weights  # noqa: E402


def reference_draw(weights: torch.Tensor, seed: int, epoch: int) -> list[int]:
    """What the reference's ``DistributedSamplerWrapper`` draws for all ranks in an epoch:
    ``WeightedRandomSampler(weights, len(weights))`` with a generator seeded by ``seed + epoch``."""
    generator = torch.Generator()
    generator.manual_seed(seed + epoch)
    return list(WeightedRandomSampler(weights, len(weights), generator=generator))


def test_weights_are_the_reference_formula():
    # atstframe/downstream/test_sampler.py: sum(labels * 1000 / (labels.sum(0) + 0.01), -1)
    multi_hot = torch.tensor([[1, 0, 1], [1, 0, 0], [0, 1, 0], [1, 1, 0]], dtype=torch.float32)
    expected = [1000 / 3.01 + 1000 / 1.01, 1000 / 3.01, 1000 / 2.01, 1000 / 3.01 + 1000 / 2.01]
    torch.testing.assert_close(label_balanced_weights(multi_hot), torch.tensor(expected, dtype=torch.float64))
    indices = torch.tensor([0, 0, 0, 1])  # single-label: class indices
    expected = [1000 / 3.01] * 3 + [1000 / 1.01]
    torch.testing.assert_close(label_balanced_weights(indices), torch.tensor(expected, dtype=torch.float64))


def test_sampler_draws_as_the_reference_and_ranks_share_one_draw():
    weights = label_balanced_weights(torch.tensor([0] * 9 + [1, 2]))  # 11 clips
    for epoch in (0, 3):
        draw = reference_draw(weights, seed=5, epoch=epoch)
        one = BalancedSampler(weights, seed=5)
        one.set_epoch(epoch)
        assert list(one) == draw and len(one) == 11
        ranks = [BalancedSampler(weights, num_replicas=3, rank=rank, seed=5) for rank in range(3)]
        for sampler in ranks:
            sampler.set_epoch(epoch)
        padded = draw + draw[:1]  # 12 = 3 ranks x 4: the first draw again
        assert [list(sampler) for sampler in ranks] == [padded[rank::3] for rank in range(3)]
        assert [len(sampler) for sampler in ranks] == [4, 4, 4]
    assert reference_draw(weights, 5, 0) != reference_draw(weights, 5, 1)  # a new draw every epoch


def test_rare_classes_are_drawn_as_often_as_common_ones():
    targets = torch.tensor([0] * 90 + [1] * 10)
    sampler = BalancedSampler(label_balanced_weights(targets))
    draws = []
    for epoch in range(20):
        sampler.set_epoch(epoch)
        draws += list(sampler)
    rare = float((targets[draws] == 1).float().mean())
    assert 0.45 < rare < 0.55  # 10 % of the clips, half of the 2 000 draws (standard deviation 0.011)
    assert len(set(draws)) == 100  # every clip comes up


def test_bad_weights_and_sampling_names_are_refused(tmp_path):
    with pytest.raises(ValueError, match="every weight is 0"):
        BalancedSampler(torch.zeros(3))
    with pytest.raises(ValueError, match="finite, non-negative"):
        BalancedSampler(torch.tensor([1.0, -1.0]))
    write_audio(tmp_path / "a.wav", 0.5)
    (tmp_path / "set.csv").write_text("path,label,split\na.wav,x,train\n")
    with pytest.raises(InputError, match=r"--data.sampling 'uniform': use one of shuffle, balanced"):
        LabelledData(str(tmp_path / "set.csv"), sampling="uniform")


@pytest.fixture(scope="module")
def imbalanced(tmp_path_factory):
    """A manifest of 1 s clips: 12 tones and 3 noises to train on, 2 of each to validate and test."""
    root = tmp_path_factory.mktemp("imbalanced")
    rows = ["path,label,split"]
    for label, train in (("tone", 12), ("noise", 3)):
        for index in range(train + 4):
            split = "train" if index < train else "valid" if index < train + 2 else "test"
            noise, freq = (0.2, 0.0) if label == "noise" else (0.01, 300.0 + 20 * index)
            write_audio(root / label / f"{index}.wav", 1.0, freq=freq, noise=noise, seed=index)
            rows.append(f"{label}/{index}.wav,{label},{split}")
    (root / "set.csv").write_text("\n".join(rows) + "\n")
    return root / "set.csv"


def train_weights(manifest) -> torch.Tensor:
    data = LabelledData(str(manifest))
    return label_balanced_weights(data.data.targets(data.splits["train"]))


class Steps(L.LightningModule):
    """One parameter, pulled towards the batch's share of class 1: enough for Lightning to step."""

    def __init__(self) -> None:
        super().__init__()
        self.share = torch.nn.Parameter(torch.zeros(()))

    def training_step(self, batch, batch_index):
        _, _, targets = batch
        return (self.share - targets.float().mean()) ** 2

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


class SamplerRecorder(L.Callback):
    def __init__(self) -> None:
        self.epochs = []

    def on_train_epoch_start(self, trainer, module) -> None:
        sampler = trainer.train_dataloader.sampler
        self.epochs.append((type(sampler).__name__, sampler.epoch, list(sampler)))


def test_lightning_keeps_the_sampler_and_draws_anew_each_epoch(imbalanced, tmp_path):
    data = LabelledData(str(imbalanced), batch_size=4, num_workers=0, sampling="balanced", seed=7)
    recorder = SamplerRecorder()
    trainer = L.Trainer(max_epochs=2, accelerator="cpu", logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, callbacks=[recorder],
                        default_root_dir=tmp_path)
    trainer.fit(Steps(), datamodule=data)
    weights = train_weights(imbalanced)
    assert recorder.epochs == [("BalancedSampler", epoch, reference_draw(weights, 7, epoch)) for epoch in (0, 1)]
    assert trainer.global_step == 2 * 4  # 15 draws per epoch in batches of 4


RECORDER = """
import json, os
import lightning as L

class SamplerRecorder(L.Callback):
    def on_train_epoch_start(self, trainer, module):
        sampler = trainer.train_dataloader.sampler
        with open(f"sampler-{trainer.global_rank}.json", "w") as out:
            json.dump({"type": type(sampler).__name__, "ranks": sampler.num_replicas, "rank": sampler.rank,
                       "draws": list(sampler)}, out)
"""


@pytest.mark.slow
def test_two_process_ddp_ranks_share_the_reference_draw(imbalanced, tmp_path):
    script = shutil.which("atst-train") or pytest.skip("atst-train is not installed as a command")
    (tmp_path / "recorder.py").write_text(textwrap.dedent(RECORDER))
    result = subprocess.run(
        [script, "finetune", "--config", "finetune-tiny", "--data.manifest", str(imbalanced), "--data.sampling",
         "balanced", "--model.max_epochs", "1", "--trainer.devices", "2", "--trainer.strategy", "ddp",
         "--trainer.callbacks+=recorder.SamplerRecorder", "--trainer.enable_progress_bar", "false"],
        cwd=tmp_path, capture_output=True, text=True, timeout=300, env={**os.environ, "PYTHONPATH": str(tmp_path)},
    )
    assert result.returncode == 0, result.stderr[-3000:]
    ranks = [json.loads((tmp_path / f"sampler-{rank}.json").read_text()) for rank in (0, 1)]
    assert [(r["type"], r["ranks"], r["rank"]) for r in ranks] == [("BalancedSampler", 2, 0), ("BalancedSampler", 2, 1)]
    draw = reference_draw(train_weights(imbalanced), seed=0, epoch=0)  # the preset's seed_everything: 0
    padded = draw + draw[:1]
    assert ranks[0]["draws"] == padded[0::2] and ranks[1]["draws"] == padded[1::2]
