"""Stopping cleanly before the job is killed: SIGTERM and SIGUSR1 (what SLURM sends before it
preempts a job or its time runs out, with ``#SBATCH --signal=USR1@120``).

On either signal ``atst-train`` finishes the step it is in, writes ``preempted.ckpt`` in the run's
checkpoint folder (replacing an earlier one), asks SLURM to put the job back in the queue when told
to (:attr:`Preemption.requeue`, or SIGUSR1 inside a SLURM job) and stops with exit code 128 + the
signal's number (143 for SIGTERM, 138 for SIGUSR1). In a distributed run, a signal received by any
process stops all of them at the same step.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import threading
from pathlib import Path

import lightning as L

from ..errors import Preempted
from .checkpointing import checkpoint_folder

__all__ = ["Preemption", "requeue_slurm_job", "slurm_job_id"]

SIGNALS = (signal.SIGTERM, signal.SIGUSR1)


def slurm_job_id() -> str | None:
    """This SLURM job's id (``ARRAY_TASK`` form for job arrays), None outside SLURM."""
    array = os.environ.get("SLURM_ARRAY_JOB_ID")
    job = f"{array}_{os.environ['SLURM_ARRAY_TASK_ID']}" if array and os.environ.get("SLURM_ARRAY_TASK_ID") else os.environ.get("SLURM_JOB_ID")
    return job if job and re.fullmatch(r"[0-9_]+", job) else None


def requeue_slurm_job() -> str:
    """Ask SLURM to requeue this job (``scontrol requeue``); a line saying what happened."""
    job = slurm_job_id()
    if job is None:
        return "not requeued: this is not a SLURM job (no SLURM_JOB_ID)"
    try:
        result = subprocess.run(["scontrol", "requeue", job], capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.TimeoutExpired) as error:
        return f"could not requeue SLURM job {job}: {error}"
    if result.returncode:
        return f"could not requeue SLURM job {job}: {(result.stderr or result.stdout).strip() or f'exit code {result.returncode}'}"
    return f"requeued SLURM job {job}: it resumes from this checkpoint when it runs again"


class Preemption(L.Callback):
    """The behaviour of the module docstring. ``requeue``: requeue the SLURM job on either signal
    (``atst-train --requeue``); without it, only on SIGUSR1 inside a SLURM job."""

    def __init__(self, requeue: bool = False) -> None:
        self.requeue = requeue
        self.received: int | None = None
        self._stop: Preempted | None = None
        self._previous: dict[int, object] = {}

    def _handle(self, signum, frame) -> None:
        self.received = signum  # acted on at the next step boundary

    def on_train_start(self, trainer, module) -> None:
        if threading.current_thread() is not threading.main_thread():
            return
        for signum in SIGNALS:  # after Lightning's own handlers (installed when fit starts): ours replace them
            self._previous[signum] = signal.signal(signum, self._handle)

    def teardown(self, trainer, module, stage: str) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
        self._previous.clear()

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx: int) -> None:
        loop = trainer.fit_loop.epoch_loop
        if (batch_idx + 1) % trainer.accumulate_grad_batches and not loop.batch_progress.is_last_batch:
            return  # inside an accumulation: not a step boundary
        stop = self.received is not None
        if trainer.world_size > 1:
            stop = trainer.strategy.reduce_boolean_decision(stop, all=False)
        if not stop:
            return
        signum = self.received or signal.SIGTERM  # another process got it
        folder = checkpoint_folder(trainer) or Path(trainer.default_root_dir) / "checkpoints"
        path = folder / "preempted.ckpt"
        trainer.save_checkpoint(path, weights_only=False)
        name = signal.Signals(signum).name
        lines = [f"{name}: stopped after step {trainer.global_step}; saved {str(path)!r}"]
        if trainer.is_global_zero and (self.requeue or (signum == signal.SIGUSR1 and slurm_job_id())):
            lines.append(requeue_slurm_job())
        else:
            lines.append("continue with --ckpt_path last")
        # stop at the next hook, once Lightning has logged this step's metrics; before validation or the
        # next batch (a run whose last step this was simply ends)
        self._stop = Preempted("; ".join(lines) if trainer.is_global_zero else "", signum)  # one line per run

    def _stop_now(self) -> None:
        if self._stop is not None:
            stop, self._stop = self._stop, None
            raise stop

    def on_train_batch_start(self, trainer, module, batch, batch_idx: int) -> None:
        self._stop_now()

    def on_validation_start(self, trainer, module) -> None:
        self._stop_now()

    def on_train_epoch_end(self, trainer, module) -> None:
        self._stop_now()
