"""What a checkpoint holds beyond Lightning's own state, so that a resumed run is the run that was
interrupted: the random generators of every process and each process's Mixup memory banks.

Lightning saves the weights, the EMA teacher (part of the weights), the optimizer, the step and
epoch counters and the loader position (:class:`~.sampling.ResumableLoader`), from the first
process only. What differs between processes is gathered here into ``checkpoint["atst_processes"]``
(one entry per rank) when a checkpoint is written: torch's CPU and CUDA generators (DropPath),
numpy's and Python's, the module's own augmentation generators (``generator``, ``rng``) and the
memory banks of :class:`~.augment.Mixup` and :class:`~.augment.LabelMixup` (for ATST-Frame base,
64 x 1001 x 2000 float32 = 512 MB per process). A resumed run restores them when training starts.
"""

from __future__ import annotations

import random

import lightning as L
import numpy as np
import torch
import torch.distributed as dist

from .progress import say

__all__ = ["ExactResume", "process_state", "restore_process_state"]

KEY = "atst_processes"


def _to_cpu(value):
    if isinstance(value, torch.Tensor):
        return value.detach().cpu()
    if isinstance(value, dict):
        return {key: _to_cpu(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(_to_cpu(item) for item in value)
    return value


def _numpy_state() -> tuple:
    """numpy's global generator state with its key array as a tensor (checkpoints load with
    ``weights_only``: no numpy arrays)."""
    name, keys, position, has_gauss, gauss = np.random.get_state()
    return name, torch.from_numpy(keys.astype(np.int64)), position, has_gauss, gauss


def _set_numpy_state(state: tuple) -> None:
    name, keys, position, has_gauss, gauss = state
    np.random.set_state((name, keys.numpy().astype(np.uint32), position, has_gauss, gauss))


def process_state(module: L.LightningModule) -> dict:
    """This process's random generators and memory banks (on the CPU)."""
    generators = {}
    for name in ("generator", "rng"):
        value = getattr(module, name, None)
        if isinstance(value, torch.Generator):
            generators[name] = value.get_state()
        elif isinstance(value, np.random.Generator):
            generators[name] = value.bit_generator.state
    banks = {name: child.bank_state() for name, child in module.named_modules() if hasattr(child, "bank_state")}
    return _to_cpu({
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "numpy": _numpy_state(),
        "python": random.getstate(),
        "generators": generators,
        "banks": banks,
    })


def restore_process_state(module: L.LightningModule, state: dict) -> None:
    """Set what :func:`process_state` saved."""
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available() and len(state["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(state["cuda"])
    _set_numpy_state(state["numpy"])
    random.setstate(state["python"])
    for name, saved in state["generators"].items():
        value = getattr(module, name, None)
        if isinstance(value, torch.Generator):
            value.set_state(saved)
        elif isinstance(value, np.random.Generator):
            value.bit_generator.state = saved
    children = dict(module.named_modules())
    for name, saved in state["banks"].items():
        if name in children:
            children[name].load_bank_state(saved, module.device)


class ExactResume(L.Callback):
    """Writes every process's :func:`process_state` into each checkpoint and restores this process's
    one when a resumed run starts training. A run resumed on a different number of processes takes
    rank ``r``'s state from saved rank ``r mod saved`` and says that it is not the same run."""

    def __init__(self) -> None:
        self._loaded: dict | None = None
        self._cpu_group = None

    def on_save_checkpoint(self, trainer, module, checkpoint: dict) -> None:
        state = process_state(module)
        if trainer.world_size > 1 and dist.is_available() and dist.is_initialized():
            # to the first process only (it writes the file), through the CPU: with NCCL the banks
            # (512 MB per process for base) would otherwise pass through every GPU's memory
            if dist.get_backend() != "gloo" and self._cpu_group is None:
                self._cpu_group = dist.new_group(backend="gloo")  # every process saves at once: all create it
            states = [None] * trainer.world_size if trainer.global_rank == 0 else None
            dist.gather_object(state, states, dst=0, group=self._cpu_group)
            if states is None:  # the other processes' checkpoint dictionaries are not written
                return
        else:
            states = [state]
        checkpoint[KEY] = states

    def on_load_checkpoint(self, trainer, module, checkpoint: dict) -> None:
        states = checkpoint.get(KEY)
        if not states:
            say("note: this checkpoint holds no random generators or memory banks (written by an earlier version of "
                "atst-features): the resumed run continues with fresh ones, not as the interrupted run would have")
            return
        if len(states) != trainer.world_size:
            say(f"note: the checkpoint was written by {len(states)} processes, this run has {trainer.world_size}: "
                "random generators and memory banks are taken from its processes in turn; the run will not be the one "
                "that was interrupted, only like it")
        self._loaded = states[trainer.global_rank % len(states)]

    def on_train_start(self, trainer, module) -> None:
        if self._loaded is not None:
            restore_process_state(module, self._loaded)
            self._loaded = None
