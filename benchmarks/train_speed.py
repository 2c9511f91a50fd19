"""Pretraining speed: optimizer steps per second and clips per second, per preset.

Runs the real LightningModule of a preset (front end, augmentations, masks, student and teacher,
AdamW, EMA) on synthetic crops held in memory, so the figure is the model's, not the disk's.
Prints the machine, torch version, thread count, batch size and the seconds per step: "bare" (the
module alone) and "atst-train" (with the callbacks every ``atst-train`` run has: exact resume,
bad-batch guard, preemption, progress; and a durable checkpoint every ``--checkpoint-every`` steps,
whose seconds per save and size are printed apart, not counted in the step).

    python benchmarks/train_speed.py [--presets frame-tiny clip-tiny frame-small clip-small]
        [--batch-size 8] [--steps 10] [--device cpu|cuda] [--precision 32-true|bf16-mixed]
        [--checkpoint-every 5]

The paper presets use 144-384 clips per GPU; on a CPU use a small --batch-size (default: the
preset's own batch size for tiny presets, 8 for the others).
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import lightning as L
import torch
import yaml
from torch.utils.data import DataLoader, Dataset

from atst_features.training.checkpointing import DurableCheckpointIO
from atst_features.training.cli import preset_path, training_callbacks
from atst_features.training.module import ClipPretraining, FramePretraining

from embed_speed import machine


class SyntheticCrops(Dataset):
    def __init__(self, crop_seconds: list[float], items: int) -> None:
        generator = torch.Generator().manual_seed(0)
        self.crops = [0.1 * torch.randn(items, int(s * 16000), generator=generator) for s in crop_seconds]

    def __len__(self) -> int:
        return len(self.crops[0])

    def __getitem__(self, index: int):
        return tuple(crop[index] for crop in self.crops)


class SyntheticData(L.LightningDataModule):
    def __init__(self, crop_seconds: list[float], batch_size: int, steps: int) -> None:
        super().__init__()
        self.batch_size = batch_size
        self.dataset = SyntheticCrops(crop_seconds, batch_size * (steps + 2))

    def train_dataloader(self) -> DataLoader:
        return DataLoader(self.dataset, batch_size=self.batch_size, drop_last=True)


class StepTimer(L.Callback):
    def __init__(self, skip: int = 2) -> None:
        self.skip, self.times = skip, []

    def on_train_batch_start(self, trainer, module, batch, batch_idx) -> None:
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        self.start = time.perf_counter()

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx) -> None:
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        if batch_idx >= self.skip:
            self.times.append(time.perf_counter() - self.start)


class TimedCheckpointIO(DurableCheckpointIO):
    """atst-train's checkpoint writer, timed."""

    def __init__(self) -> None:
        super().__init__()
        self.seconds, self.sizes = [], []

    def save_checkpoint(self, checkpoint, path, storage_options=None) -> None:
        start = time.perf_counter()
        super().save_checkpoint(checkpoint, path, storage_options)
        self.seconds.append(time.perf_counter() - start)
        self.sizes.append(Path(path).stat().st_size)


def measure(preset: str, batch_size: int | None, steps: int, device: str, precision: str, checkpoint_every: int,
            as_atst_train: bool) -> None:
    config = yaml.safe_load(open(preset_path(preset), encoding="utf-8"))
    method = ClipPretraining if preset.startswith("clip") else FramePretraining
    model_args = dict(config["model"], max_steps=max(config["model"]["max_steps"], steps + 3))
    batch = batch_size or (config["data"]["batch_size"] if preset.endswith("tiny") else 8)
    module = method(**model_args)
    data = SyntheticData(config["data"]["crop_seconds"], batch, steps)
    timer = StepTimer()
    writer = TimedCheckpointIO()
    with tempfile.TemporaryDirectory() as folder:
        extra = dict(enable_checkpointing=False, callbacks=[timer])
        if as_atst_train:  # the timer first: the checkpoint (always the last callback) is not in the step
            checkpoints = L.pytorch.callbacks.ModelCheckpoint(dirpath=folder, every_n_train_steps=checkpoint_every,
                                                              monitor="step", mode="max", save_top_k=3, save_last="link")
            extra = dict(callbacks=[timer, *training_callbacks(), checkpoints], plugins=[writer])
        trainer = L.Trainer(accelerator=device, devices=1, precision=precision, max_steps=steps + timer.skip,
                            logger=False, enable_progress_bar=False, enable_model_summary=False, **extra)
        trainer.fit(module, datamodule=data)
    seconds = sum(timer.times) / len(timer.times)
    params = sum(p.numel() for p in module.model.student.parameters()) / 1e6
    saves = (f"{sum(writer.seconds) / len(writer.seconds):>7.2f} s {max(writer.sizes) / 2**20:>6.0f} MiB"
             if writer.seconds else "")
    print(
        f"{preset:<12} {'atst-train' if as_atst_train else 'bare':<10} {params:>7.1f} M {batch:>6} "
        f"{str(config['data']['crop_seconds']):<11} {seconds:>8.3f} {1 / seconds:>8.2f} {batch / seconds:>8.1f} {saves}"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--presets", nargs="+", default=["frame-tiny", "clip-tiny", "frame-small", "clip-small"])
    parser.add_argument("--batch-size", type=int, default=None)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--precision", default="32-true")
    parser.add_argument("--checkpoint-every", type=int, default=5)
    args = parser.parse_args()
    print(f"machine: {machine()}")
    print(f"torch {torch.__version__}, lightning {L.__version__}, threads {torch.get_num_threads()}, "
          f"device {args.device}, precision {args.precision}")
    if args.device == "cuda":
        print(f"gpu: {torch.cuda.get_device_name()}")
    print(f"{'preset':<12} {'run':<10} {'student':>9} {'batch':>6} {'crops (s)':<11} {'s/step':>8} {'steps/s':>8} "
          f"{'clips/s':>8} {'per save':>9} {'size':>10}")
    for preset in args.presets:
        for as_atst_train in (False, True):
            measure(preset, args.batch_size, args.steps, args.device, args.precision, args.checkpoint_every, as_atst_train)


if __name__ == "__main__":
    main()
