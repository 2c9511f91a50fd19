"""What ``atst-train`` watches for while it trains, for every method: bad batches and collapse.

:class:`FiniteSteps`: an optimizer step whose gradients are not all finite (a NaN or Inf in a batch,
a loss that overflowed, weights that diverged) is skipped, counted (the ``skipped_steps`` metric) and
reported on stderr; ``max_consecutive`` skipped steps in a row stop the run with one ``error:`` line
(:class:`~atst_features.errors.TrainingDiverged`), the checkpoints left as they were.

:class:`CollapseWatch`: a warning when the collapse diagnostic of the pretraining methods (the
logged ``std_student`` / ``std_teacher``, see :func:`~atst_features.training.objective.output_std`)
stays below ``ratio / sqrt(dim)``; healthy outputs give about ``1 / sqrt(dim)``, collapsed ones 0.
"""

from __future__ import annotations

import math

import lightning as L
import torch
from torch import Tensor

from ..errors import InputError, TrainingDiverged
from .progress import say

__all__ = ["CollapseWatch", "FiniteSteps", "all_finite"]

MAX_CONSECUTIVE = 20  # FiniteSteps' default: skipped steps in a row that stop a run
COLLAPSE_RATIO = 0.1  # CollapseWatch's default: warn below COLLAPSE_RATIO / sqrt(dim)
REPORTED = 5  # skipped steps reported one by one; after these, only the 8th, 16th, 32nd, ...


def all_finite(tensors: list[Tensor]) -> bool:
    """Whether every element of ``tensors`` is finite, by their L2 norms: one fused reduction per
    device and dtype (``torch._foreach_norm``), one host sync. A NaN or Inf makes its tensor's norm
    non-finite; so does a norm past the dtype's range (float32: elements around 1e17), a gradient
    no step can use either. (The max-abs norm, which cannot overflow, is 15 times slower on a CPU.)"""
    groups: dict[tuple, list[Tensor]] = {}
    for tensor in tensors:
        groups.setdefault((tensor.device, tensor.dtype), []).append(tensor)
    flags = [torch.isfinite(torch.stack(torch._foreach_norm(group))).all() for group in groups.values()]
    if not flags:
        return True
    if len({flag.device for flag in flags}) == 1:
        return bool(torch.stack(flags).all())
    return all(bool(flag) for flag in flags)


def _persistent_buffers(module: torch.nn.Module) -> list[Tensor]:
    """The buffers a checkpoint holds (BatchNorm's running statistics): a training forward pass
    changes them, a skipped step must not."""
    return [buffer for owner in module.modules() for name, buffer in owner._buffers.items()
            if buffer is not None and name not in owner._non_persistent_buffers_set]


class FiniteSteps(L.Callback):
    """Skip each optimizer step whose gradients are not all finite; stop after ``max_consecutive`` in a row.

    Checked in ``on_before_optimizer_step``: after backward (and gradient accumulation, and DDP's
    gradient all-reduce, so every process reaches the same verdict), before gradient clipping and
    ``optimizer.step()``. A NaN or Inf loss gives non-finite gradients, so one check covers both.
    A skipped step leaves no trace: the gradients are set to None (AdamW and SGD leave a parameter
    without a gradient as it is, their state included: moments, momentum, step count), the persistent
    buffers (BatchNorm's running statistics, which the bad batch's forward pass updated) are restored
    to their values before the batch, a Mixup memory bank that took in non-finite inputs is emptied
    (it refills from the next batches), and ``module.step_skipped`` is True until the next step, so
    the pretraining modules leave their EMA teacher as it is. Lightning still counts the step:
    ``global_step`` advances, and the learning-rate, weight-decay and momentum schedules, functions
    of ``global_step``, move on as if the step had been taken.

    Each skipped step adds one to the ``skipped_steps`` metric (the total, logged at the steps the
    loggers write, every ``log_every_n_steps``; kept in checkpoints across a resume) and is reported
    on stderr (the first ``REPORTED``, then the 8th, 16th, 32nd ... of the run). ``max_consecutive`` skipped steps in a row raise
    :class:`~atst_features.errors.TrainingDiverged`; no checkpoint is written on the way out
    (``ModelCheckpoint`` saves on an exception only with ``save_on_exception``), so the newest one
    holds weights from before the failure. Only the first ``FiniteSteps`` of a trainer's callbacks
    acts: one given with ``--trainer.callbacks`` takes the place of atst-train's default.
    """

    def __init__(self, max_consecutive: int | None = None) -> None:
        self.max_consecutive = MAX_CONSECUTIVE if max_consecutive is None else max_consecutive
        if isinstance(self.max_consecutive, bool) or not isinstance(self.max_consecutive, int) or self.max_consecutive < 1:
            raise InputError(f"FiniteSteps.max_consecutive must be an integer >= 1, got {self.max_consecutive!r}")
        self.skipped = 0  # in all
        self.consecutive = 0
        self.active = True
        self._buffers: list[Tensor] = []
        self._saved: list[Tensor] = []
        self._window_open = False

    def setup(self, trainer, module, stage: str) -> None:
        self.active = next(cb for cb in trainer.callbacks if isinstance(cb, FiniteSteps)) is self

    def on_train_start(self, trainer, module) -> None:
        if not self.active:
            return
        self._buffers = _persistent_buffers(module)
        self._saved = [buffer.clone() for buffer in self._buffers]
        self._window_open = False
        self.consecutive = 0
        module.step_skipped = False

    def on_train_batch_start(self, trainer, module, batch, batch_idx: int) -> None:
        if self.active and not self._window_open:  # the first batch of an optimizer step
            if self._buffers:
                torch._foreach_copy_(self._saved, self._buffers)
            self._window_open = True

    def on_before_optimizer_step(self, trainer, module, optimizer) -> None:
        if not self.active:
            return
        self._window_open = False
        grads = [p.grad for group in optimizer.param_groups for p in group["params"] if p.grad is not None]
        finite = all_finite(grads)
        module.step_skipped = not finite
        if finite:
            self.consecutive = 0
        else:
            self._skip(trainer, module, optimizer)
        connector = getattr(trainer, "_logger_connector", None)  # as LearningRateMonitor: only on the steps loggers write
        if connector is None or connector.should_update_logs:
            module.log("skipped_steps", float(self.skipped), on_step=True, on_epoch=False, batch_size=1)
        if self.consecutive >= self.max_consecutive:
            step = trainer.global_step
            raise TrainingDiverged(
                f"training diverged: {self.consecutive} optimizer steps in a row (steps {step - self.consecutive + 1} "
                f"to {step}) had a non-finite loss or gradients and were skipped; the weights are those from before "
                f"step {step - self.consecutive + 1}. Lower the learning rate (--model.learning_rate) or check the "
                "data, then resume from the last checkpoint with --ckpt_path last"
            )

    def _skip(self, trainer, module, optimizer) -> None:
        optimizer.zero_grad(set_to_none=True)
        for parameter in module.parameters():  # any not in this optimizer
            parameter.grad = None
        if self._buffers:
            torch._foreach_copy_(self._buffers, self._saved)
        for part in module.modules():
            if hasattr(part, "clear_if_not_finite"):  # Mixup and LabelMixup memory banks
                part.clear_if_not_finite()
        self.skipped += 1
        self.consecutive += 1
        if self.skipped <= REPORTED or self.skipped & (self.skipped - 1) == 0:
            next_one = 1 << REPORTED.bit_length()
            quiet = self.skipped == REPORTED and self.consecutive < self.max_consecutive
            later = f"; from now on only the {next_one}th, {2 * next_one}th, ... are reported" if quiet else ""
            say(f"warning: step {trainer.global_step}: non-finite loss or gradients, the step is skipped "
                f"({self.skipped} skipped in all, {self.consecutive} in a row; {self.max_consecutive} in a row "
                f"stop the run{later})")

    def on_save_checkpoint(self, trainer, module, checkpoint: dict) -> None:
        if self.active:
            checkpoint["skipped_steps"] = self.skipped

    def on_load_checkpoint(self, trainer, module, checkpoint: dict) -> None:
        if self.active:
            self.skipped = int(checkpoint.get("skipped_steps", 0))


class CollapseWatch(L.Callback):
    """Warn when a pretraining run's outputs collapse: the logged ``std_student`` or ``std_teacher``
    (the per-dimension standard deviation of the L2-normalised outputs, about ``1 / sqrt(dim)`` when
    healthy, 0 when every clip gets the same output) below ``ratio / sqrt(dim)`` at ``patience``
    checks in a row (one check every ``log_every_n_steps`` steps) gives one ``warning:`` line; it
    warns again only after the value has come back above twice the threshold and fallen again. ``dim``:
    the module's ``projector_out_dim``; modules without it (fine-tuning, distillation, SED) are not
    watched. Non-finite values (a skipped step) are not counted."""

    NAMES = ("std_student", "std_teacher")

    def __init__(self, ratio: float = COLLAPSE_RATIO, patience: int = 3) -> None:
        self.ratio, self.patience = ratio, patience
        self.below = dict.fromkeys(self.NAMES, 0)
        self.warned = dict.fromkeys(self.NAMES, False)
        self.limit: float | None = None
        self.active = True
        self._checked = -1

    def setup(self, trainer, module, stage: str) -> None:
        self.active = next(cb for cb in trainer.callbacks if isinstance(cb, CollapseWatch)) is self
        dim = getattr(module, "hparams", {}).get("projector_out_dim")
        self.limit = self.ratio / math.sqrt(dim) if dim else None

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx: int) -> None:
        step = trainer.global_step
        if not self.active or self.limit is None or step % max(1, trainer.log_every_n_steps) or step == self._checked:
            return
        self._checked = step  # once per optimizer step under gradient accumulation
        metrics = trainer.callback_metrics
        for name in self.NAMES:
            value = metrics.get(name)
            if value is None:
                continue
            value = float(value)
            if not math.isfinite(value):
                continue
            if value >= self.limit:
                self.below[name] = 0
                if value >= 2 * self.limit:  # recovered: a new fall warns again
                    self.warned[name] = False
                continue
            self.below[name] += 1
            if self.below[name] >= self.patience and not self.warned[name]:
                self.warned[name] = True
                dim = round((self.ratio / self.limit) ** 2)
                say(f"warning: step {trainer.global_step}: {name} {value:.3g} has stayed below {self.limit:.3g} "
                    f"({self.ratio:g}/sqrt({dim}); about {1 / math.sqrt(dim):.3g} when healthy): the outputs are "
                    "collapsing to a constant (see Collapse in docs/training.md)")
