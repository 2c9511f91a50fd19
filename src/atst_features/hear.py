"""The HEAR 2021 common API (https://hearbenchmark.com/hear-api.html) for ATST models.

    hear-validator atst_features.hear -m atstframe_base.ckpt
    python -m heareval.embeddings.runner atst_features.hear --model atstframe_base.ckpt \\
        --model-options '{"n_blocks": 12}'

Defaults reproduce the paper's HEAR-style setting: all blocks concatenated (12 for the paper's
models, 6 for atst-frame-mini), for both scene and timestamp embeddings. Declared sizes are the
sizes produced (unlike the reference's module, which declares ``2 * 12 * D`` scene dimensions and
produces ``12 * D``); timestamps are token centres, 40 ms apart, none beyond the end of the audio.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .audio import SAMPLE_RATE
from .errors import InputError
from .loading import load_model as _load_atst_model
from .model import ATSTModel
from .registry import DEFAULT_MODEL

__all__ = ["HearModel", "load_model", "get_scene_embeddings", "get_timestamp_embeddings"]


class HearModel(torch.nn.Module):
    """An :class:`ATSTModel` with the attributes HEAR asks for.

    ``sample_rate`` (16000), ``scene_embedding_size`` and ``timestamp_embedding_size`` (true for
    the loaded checkpoint and ``n_blocks``); ``.to(device)`` moves the ATST model.
    """

    sample_rate = SAMPLE_RATE

    def __init__(self, model: ATSTModel, n_blocks: int | None = None, batch_size: int = 32) -> None:
        super().__init__()
        self.model = model
        self.scene_embedding_size = int(model.clip_embedding_size(n_blocks))  # validates n_blocks
        self.timestamp_embedding_size = int(model.frame_embedding_size(n_blocks))
        self.n_blocks = n_blocks
        self.batch_size = batch_size


def load_model(
    model_file_path: str = "", n_blocks: int | None = None, batch_size: int = 32, precision: str | None = None
) -> HearModel:
    """Load a model for HEAR: a checkpoint file, a model folder, a registry name or a Hub id
    (empty: the default model, atst-frame-base). The model stays on the CPU (the evaluation kit
    moves it). Options, also from the evaluation kit's ``--model-options`` JSON: ``n_blocks``
    (last blocks concatenated, default: all of the model's blocks), ``batch_size`` (10 s windows per encoder pass),
    ``precision`` (the encoder's compute precision, e.g. ``"bf16"``; embeddings stay float32)."""
    model = _load_atst_model(model_file_path or DEFAULT_MODEL, device="cpu", precision=precision)
    return HearModel(model, n_blocks=n_blocks, batch_size=batch_size)


def _check_audio(audio: Tensor) -> None:
    if not isinstance(audio, Tensor) or audio.ndim != 2:
        shape = tuple(audio.shape) if hasattr(audio, "shape") else type(audio).__name__
        raise InputError(f"HEAR audio must be a torch tensor [n_sounds, n_samples], got {shape}")


def get_scene_embeddings(audio: Tensor, model: HearModel) -> Tensor:
    """``audio [n_sounds, n_samples]`` at 16 kHz in [-1, 1] -> float32 ``[n_sounds, scene_embedding_size]``,
    on the audio's device."""
    _check_audio(audio)
    embedding = model.model.get_clip_embedding(audio, n_blocks=model.n_blocks, batch_size=model.batch_size)
    return embedding.to(device=audio.device, dtype=torch.float32)


def get_timestamp_embeddings(audio: Tensor, model: HearModel) -> tuple[Tensor, Tensor]:
    """``audio [n_sounds, n_samples]`` -> float32 embeddings ``[n_sounds, T, timestamp_embedding_size]``
    and float32 timestamps ``[n_sounds, T]`` in ms (token centres ``40 i + 15``, inside the audio),
    on the audio's device."""
    _check_audio(audio)
    embeddings, timestamps = model.model.get_frame_embeddings(
        audio, n_blocks=model.n_blocks, batch_size=model.batch_size
    )
    # Audio shorter than one 40 ms token is padded (docs/api.md#short-and-long-audio); its one timestamp stays inside it.
    duration_ms = audio.shape[1] * 1000.0 / model.sample_rate
    timestamps = timestamps.clamp(max=duration_ms)
    return (
        embeddings.to(device=audio.device, dtype=torch.float32),
        timestamps.to(device=audio.device, dtype=torch.float32),
    )
