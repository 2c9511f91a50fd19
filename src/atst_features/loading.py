"""``load_model``: turn a source (checkpoint file, ...) into a ready :class:`ATSTModel`."""

from __future__ import annotations

import os
from pathlib import Path

import torch

from .checkpoints import CheckpointContents, read_checkpoint
from .model import ATSTModel

__all__ = ["load_model", "model_from_contents"]


def _default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def model_from_contents(contents: CheckpointContents) -> ATSTModel:
    """Build the model of parsed checkpoint contents (float32, CPU, eval mode)."""
    with torch.device("meta"):
        model = ATSTModel(contents.config)
    as_float = lambda state: {k: v.float() if v.is_floating_point() else v for k, v in state.items()}  # noqa: E731
    model.encoder.load_state_dict(as_float(contents.encoder_state), strict=True, assign=True)
    if model.head is not None:
        model.head.load_state_dict(as_float(contents.head_state), strict=True, assign=True)
    return model.eval()


def load_model(
    source: str | os.PathLike,
    *,
    device: str | torch.device | None = None,
    dtype: torch.dtype | None = None,
) -> ATSTModel:
    """Load an ATST model for inference.

    ``source``: an official checkpoint file (ATST-Clip / ATST-Frame Lightning ``.ckpt``, the C2F
    distillation checkpoint, a bare encoder state dict or an ATST-SED checkpoint). ``device``:
    default CUDA when available, else CPU. ``dtype``: e.g. ``torch.bfloat16`` for the encoder
    (the front end always computes in float32). The model is returned in eval mode.
    """
    path = Path(source)
    if not path.exists():
        raise FileNotFoundError(f"{str(source)!r}: no such checkpoint file")
    model = model_from_contents(read_checkpoint(path))
    model = model.to(device=torch.device(device) if device is not None else _default_device())
    if dtype is not None:
        model = model.to(dtype=dtype)
    return model
