"""What ``atst-train`` says on stderr while it trains: the clips of each split at the start and, when no
progress bar is there to watch (stderr is not a terminal: a log file, a batch job; or the bar is off),
a line at the end of every epoch and at least every ``interval`` seconds within one: the epoch, the
step, the loss, the clips per second and the time elapsed. Reads of unreadable training files
skipped in an epoch (pretraining data) are counted at its end: a line and the logged ``unreadable_files``."""

from __future__ import annotations

import math
import sys
import time
from datetime import timedelta

import lightning as L
import torch
from lightning.pytorch.utilities import rank_zero_only

__all__ = ["ProgressLog", "say"]


@rank_zero_only
def say(line: str) -> None:
    """Print ``line`` on stderr, once in a distributed run (by the first process)."""
    print(line, file=sys.stderr, flush=True)


class ProgressLog(L.Callback):
    """The lines of the module docstring; ``interval``: seconds between lines within an epoch."""

    def __init__(self, interval: float = 60.0) -> None:
        self.interval = interval
        self.lines = False
        self.started = self.last = 0.0
        self.clips, self.loss = 0, math.nan
        self.unreadable = 0  # files skipped as unreadable, up to the last epoch's end (this process)

    def on_fit_start(self, trainer, module) -> None:
        data = trainer.datamodule
        splits = getattr(data, "splits", None)
        if splits:
            counts = ", ".join(f"{name} {len(items)}" for name, items in splits.items())
            how = getattr(data, "split_description", "")
            say(f"clips: {counts}" + (f" ({how})" if how else ""))

    def on_train_start(self, trainer, module) -> None:
        self.lines = not sys.stderr.isatty() or trainer.progress_bar_callback is None
        self.started = self.last = time.perf_counter()

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx: int) -> None:
        self.clips += len(batch[0]) * trainer.world_size
        loss = outputs.get("loss") if isinstance(outputs, dict) else outputs
        if loss is not None:
            self.loss = loss.detach() if isinstance(loss, torch.Tensor) else loss  # read when a line is printed: no sync per step
        if self.lines and time.perf_counter() - self.last >= self.interval:
            self._line(trainer, {})

    def on_train_epoch_end(self, trainer, module) -> None:
        self._count_unreadable(trainer, module)
        if self.lines:
            self._line(trainer, {name: float(value) for name, value in trainer.callback_metrics.items()
                                 if name.startswith("valid_") and value.numel() == 1})

    def _count_unreadable(self, trainer, module) -> None:
        counter = getattr(trainer.datamodule, "unreadable_files", None)
        if counter is None:
            return
        total = counter()
        skipped = torch.tensor(float(total - self.unreadable), device=module.device)
        self.unreadable = total
        module.log("unreadable_files", skipped, reduce_fx="sum", sync_dist=trainer.world_size > 1, on_epoch=True)
        skipped = int(trainer.strategy.reduce(skipped, reduce_op="sum")) if trainer.world_size > 1 else int(skipped)
        if skipped:
            say(f"epoch {trainer.current_epoch + 1}: {skipped} read(s) of unreadable training files skipped "
                "(a file counts each time it is drawn; the first ones are named in the warnings)")

    def _line(self, trainer, scores: dict[str, float]) -> None:
        now = time.perf_counter()
        self.last = now
        epochs = f"/{trainer.max_epochs}" if trainer.max_epochs and trainer.max_epochs > 0 else ""
        total = trainer.estimated_stepping_batches
        steps = f"/{int(total)}" if math.isfinite(total) else ""
        elapsed = timedelta(seconds=round(now - self.started))
        figures = ", ".join([f"loss {float(self.loss):.4g}", *(f"{name} {value:.3f}" for name, value in scores.items())])
        say(f"epoch {trainer.current_epoch + 1}{epochs}, step {trainer.global_step}{steps}: {figures}, "
            f"{self.clips / max(now - self.started, 1e-9):.1f} clips/s, {elapsed} elapsed")
