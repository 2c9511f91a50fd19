"""Tagging heads and the names of their classes.

:class:`LinearHead` is the reference's head for linear evaluation, fine-tuning and C2F.
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

from torch import Tensor, nn

__all__ = ["AUDIOSET_CLASSES", "LinearHead", "audioset_labels", "default_labels"]

AUDIOSET_CLASSES = 527


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
