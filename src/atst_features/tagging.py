"""Tagging with a model's clip-level head: which part of each clip its embedding pools.

- ``span="all"`` (the default): all of it. ATST-Frame / C2F: the token-weighted mean over every 10 s
  window; ATST-Clip: its 6 s chunks, a chunk after the first counting when it holds more than 3 s.
- ``span="reference"``: what the ATST authors' fine-tuning code scores (audiossl's
  ``FinetuneEvalTransform`` and ``PretrainedEncoderPLModule``): only the central 12 s of a longer clip,
  in chunks of which one after the first counts only when it holds more than half a chunk. For
  ATST-Frame (10 s chunks) that is the first 10 s of the central 12 s; for ATST-Clip, the 6 s chunks
  of the central 12 s. Use it to reproduce their outputs on long audio; it ignores the rest.

Both are the same for clips of up to 10 s (ATST-Frame) or 12 s (ATST-Clip).
"""

from __future__ import annotations

from torch import Tensor

from .errors import InputError

__all__ = ["REFERENCE_SECONDS", "SPANS", "clip_embedding_for_tagging"]

SPANS = ("all", "reference")
REFERENCE_SECONDS = 12.0  # the central crop of the authors' evaluation transform


def clip_embedding_for_tagging(model, waves: list[Tensor], span: str, batch_size: int) -> Tensor:
    """The last block's clip embedding ``[B, D]`` (ATST-Clip: ``[B, 2D]``) of each 16 kHz waveform over
    ``span``, for the tagging head; run inside the model's inference context."""
    if span not in SPANS:
        raise InputError(f"span must be one of {SPANS}, got {span!r:.40}")
    later_min_frames = 0
    if span == "reference":
        keep = int(REFERENCE_SECONDS * model.sample_rate)
        waves = [wave[(wave.numel() - keep) // 2 :][:keep] if wave.numel() > keep else wave for wave in waves]
        later_min_frames = model.frame_window // 2
    if model.config.encoder.cls_token:
        return model._clip_pooling(waves, 1, batch_size)
    return model._frame_pooling(waves, 1, batch_size, later_min_frames=later_min_frames)
