"""Faults injected into ``atst-train`` runs (imported by the subprocesses of tests/test_training_faults.py
through ``--trainer.callbacks+=fault_injection.NAME`` with this folder on PYTHONPATH)."""

from __future__ import annotations

import os
import signal

import lightning as L


class KillAt(L.Callback):
    """Sends ``signum`` to this process when optimizer step ``step`` is about to start (after the
    checkpoints of step ``step - 1``... and every step before it)."""

    def __init__(self, step: int, signum: int = int(signal.SIGKILL)) -> None:
        self.step, self.signum = step, signum

    def on_train_batch_start(self, trainer, module, batch, batch_idx) -> None:
        if trainer.global_step == self.step:
            os.kill(os.getpid(), self.signum)


class KillWhileSaving(L.Callback):
    """The process dies (SIGKILL) half way through writing the checkpoint of step ``step``."""

    def __init__(self, step: int) -> None:
        self.step = step

    def setup(self, trainer, module, stage: str) -> None:
        import atst_features.outputs as outputs

        write, callback = outputs._torch_save, self

        def dying_write(value, path):
            if trainer.global_step != callback.step:
                return write(value, path)
            write(value, path)
            size = os.path.getsize(path)
            os.truncate(path, size // 2)  # what was on disk when the process died
            os.kill(os.getpid(), signal.SIGKILL)

        outputs._torch_save = dying_write
