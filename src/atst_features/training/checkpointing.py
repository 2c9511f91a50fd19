"""Training checkpoints that survive the job being killed while it writes one.

A checkpoint is written to a hidden temporary file in the checkpoint folder, flushed to disk, then
renamed into place (:class:`DurableCheckpointIO`): a checkpoint file is complete or absent, also
after SIGKILL or a power loss, and a full disk is one error naming the file, the files already
there untouched. ``--ckpt_path last`` resolves to the newest checkpoint in the run's folder that
is complete (:func:`newest_checkpoint`): a file that does not read as a whole (truncated, torn by
another writer, copied in part) is skipped with a warning naming it.

A run is its checkpoint folder: the ``dirpath`` of its ``ModelCheckpoint`` (``runs/<preset>/
checkpoints`` in the presets). Resuming "the same run" means taking the newest checkpoint there.
When training ends at a step no checkpoint was written for, ``last.ckpt`` there gets the final
state (:class:`FinalCheckpoint`).
"""

from __future__ import annotations

import zipfile
from pathlib import Path

import lightning as L
from lightning.pytorch.plugins.io import TorchCheckpointIO

from ..outputs import save_torch_durably
from .progress import say

__all__ = ["DurableCheckpointIO", "FinalCheckpoint", "checkpoint_folder", "newest_checkpoint"]

ELSEWHERE = "another checkpoint folder: the dirpath of the ModelCheckpoint callback, --config or --trainer.callbacks"


class DurableCheckpointIO(TorchCheckpointIO):
    """Lightning's checkpoint writer, writing each file durably and as one step (module docstring)."""

    def save_checkpoint(self, checkpoint: dict, path, storage_options=None) -> None:
        if storage_options is not None:
            raise TypeError(f"{type(self).__name__} takes no storage_options")
        save_torch_durably(checkpoint, Path(path), ELSEWHERE)


def checkpoint_folder(trainer) -> Path | None:
    """The folder the trainer's (first) ``ModelCheckpoint`` writes to, when it names one."""
    callback = trainer.checkpoint_callback
    dirpath = getattr(callback, "dirpath", None)
    return Path(dirpath) if dirpath else None


class FinalCheckpoint(L.Callback):
    """Writes ``last.ckpt`` in the run's checkpoint folder when training ends after the last step a
    checkpoint was written for (a step count that is no multiple of the cadence, an epoch whose score
    was not the best), so that ``last.ckpt`` always holds the final state."""

    def on_train_end(self, trainer, module) -> None:
        folder = checkpoint_folder(trainer)
        saved = [getattr(callback, "_last_global_step_saved", -1) for callback in trainer.checkpoint_callbacks]
        if folder is not None and max(saved, default=-1) < trainer.global_step:
            trainer.save_checkpoint(folder / "last.ckpt", weights_only=False)


def _reads_whole(path: Path) -> bool:
    """Whether ``path`` is a complete ``torch.save`` archive: its zip directory is there and every
    member's checksum matches (reads the whole file once)."""
    try:
        with zipfile.ZipFile(path) as archive:
            return archive.testzip() is None and any(name.endswith("/data.pkl") for name in archive.namelist())
    except (zipfile.BadZipFile, OSError, EOFError, ValueError):
        return False


def newest_checkpoint(folder: Path) -> Path | None:
    """The most recently written complete ``*.ckpt`` file in ``folder`` (links such as
    ``last.ckpt`` count as the file they point to), or None; incomplete ones are skipped with a
    warning each."""
    if not folder.is_dir():
        return None
    files = {path.resolve() for path in folder.glob("*.ckpt") if path.resolve().is_file()}
    for path in sorted(files, key=lambda item: item.stat().st_mtime_ns, reverse=True):
        if _reads_whole(path):
            return path
        say(f"warning: skipping checkpoint {str(path)!r}: it does not read as a whole (cut short or damaged); "
            "taking the one before it")
    return None
