"""Tagging and event heads, and the names of their classes.

:class:`LinearHead` is the reference's head for linear evaluation, fine-tuning and C2F;
:class:`EventHead` its strong + weak head for sound event detection.
``data/audioset_labels.csv`` holds ``index, mid, display_name`` for the 527 AudioSet classes in the
order of Google's ``class_labels_indices.csv`` (the AudioSet ontology, CC BY 4.0,
https://research.google.com/audioset/), the order of every AudioSet head's outputs, C2F's included.
Its text was taken from the copy in github.com/srvk/TALNet (where spaces are written as
underscores) and checked against the copy in github.com/quentin-wang/audioset_classification.
"""

from __future__ import annotations

import csv
import io
from functools import lru_cache
from importlib import resources

import torch
from torch import Tensor, nn

__all__ = ["AUDIOSET_CLASSES", "HEAD_TYPES", "EventHead", "LinearHead", "audioset_labels", "default_labels", "weak_pooling"]

AUDIOSET_CLASSES = 527
HEAD_TYPES = ("clip", "events")  # LinearHead on the clip embedding; EventHead on the last block's frames


@lru_cache(maxsize=1)
def audioset_labels() -> tuple[str, ...]:
    """The 527 AudioSet display names, index 0 ("Speech") to 526 ("Field recording")."""
    text = resources.files("atst_features").joinpath("data/audioset_labels.csv").read_text(encoding="utf-8")
    rows = list(csv.DictReader(io.StringIO(text)))
    return tuple(row["display_name"] for row in rows)


def default_labels(num_classes: int, *, audioset: bool) -> tuple[str, ...]:
    """Names for a head that came without any: AudioSet's for a 527-class C2F head, else ``class_0`` ..."""
    if audioset and num_classes == AUDIOSET_CLASSES:
        return audioset_labels()
    return tuple(f"class_{index}" for index in range(num_classes))


class LinearHead(nn.Module):
    """The reference's ``LinearHead``: BatchNorm1d without affine parameters, then a Linear layer
    (weights drawn from N(0, 0.01^2), zero bias). ``[B, dim]`` -> logits ``[B, num_classes]``."""

    def __init__(self, dim: int, num_classes: int) -> None:
        super().__init__()
        self.norm = nn.BatchNorm1d(dim, affine=False)
        self.linear = nn.Linear(dim, num_classes)
        nn.init.normal_(self.linear.weight, mean=0.0, std=0.01)
        nn.init.zeros_(self.linear.bias)

    def forward(self, x: Tensor) -> Tensor:
        return self.linear(self.norm(x))


class EventHead(nn.Module):
    """The reference's frame-level head for sound event detection (DESED, AudioSet-strong):
    ``strong``, a per-token sigmoid Linear; ``attention``, a Linear whose per-token softmax over the
    classes (clamped to [1e-7, 1]) weighs the strong probabilities into clip-level (weak) ones.
    Weights from N(0, 0.01^2), zero biases. ``norm``: standardise the tokens first with a
    BatchNorm1d without affine parameters, as LinearHead does (not in the reference; SGD on features
    with a large constant part, such as atst-frame-mini's, converges much faster with it)."""

    def __init__(self, dim: int, num_classes: int, norm: bool = False) -> None:
        super().__init__()
        self.norm = nn.BatchNorm1d(dim, affine=False) if norm else None
        self.strong = nn.Linear(dim, num_classes)
        self.attention = nn.Linear(dim, num_classes)
        for layer in (self.strong, self.attention):
            nn.init.normal_(layer.weight, mean=0.0, std=0.01)
            nn.init.zeros_(layer.bias)

    def frame_outputs(self, tokens: Tensor) -> tuple[Tensor, Tensor]:
        """``tokens [B, T, D]`` -> strong probabilities and attention weights, both ``[B, T, C]``."""
        if self.norm is not None:
            tokens = self.norm(tokens.transpose(1, 2)).transpose(1, 2)
        strong = torch.sigmoid(self.strong(tokens))
        weights = torch.softmax(self.attention(tokens), dim=-1).clamp(1e-7, 1.0)
        return strong, weights

    def forward(self, tokens: Tensor, n_tokens: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """``(strong [B, T, C], weak [B, C])`` probabilities; ``n_tokens [B]`` leaves padded tokens
        out of the weak pooling."""
        strong, weights = self.frame_outputs(tokens)
        if n_tokens is not None:
            valid = torch.arange(tokens.shape[1], device=tokens.device)[None, :] < n_tokens.to(tokens.device)[:, None]
            weights = weights * valid[..., None]
        return strong, weak_pooling(strong, weights)


def weak_pooling(strong: Tensor, weights: Tensor) -> Tensor:
    """Attention pooling over time: ``sum_t strong * weights / sum_t weights`` (``[..., T, C]`` -> ``[..., C]``)."""
    return (strong * weights).sum(dim=-2) / weights.sum(dim=-2)
