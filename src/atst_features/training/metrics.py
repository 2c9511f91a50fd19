"""Downstream metrics as the reference computes them: top-1 accuracy and mAP.

mAP is the mean over classes of the average precision (scikit-learn's ``average_precision_score``),
leaving out classes without a positive example in the set.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

__all__ = ["accuracy", "average_precision", "mean_average_precision", "score"]


def average_precision(scores: Tensor, targets: Tensor) -> float:
    """Area under the precision-recall curve of one class, as scikit-learn's
    ``average_precision_score``: ``sum_k (R_k - R_{k-1}) P_k`` over distinct score thresholds."""
    order = torch.argsort(scores.double(), descending=True, stable=True)
    scores, targets = scores.double()[order], targets.double()[order]
    last_of_tie = torch.ones_like(scores, dtype=torch.bool)
    last_of_tie[:-1] = scores[1:] != scores[:-1]
    true_positives = targets.cumsum(0)[last_of_tie]
    predicted = torch.arange(1, len(scores) + 1, dtype=torch.float64)[last_of_tie]
    positives = targets.sum()
    if positives == 0:
        return float("nan")
    precision = true_positives / predicted
    recall = true_positives / positives
    previous = torch.cat([torch.zeros(1, dtype=torch.float64), recall[:-1]])
    return float(((recall - previous) * precision).sum())


def mean_average_precision(scores: Tensor, targets: Tensor) -> float:
    """Mean over classes of :func:`average_precision` (``scores``, ``targets``: ``[N, C]``); classes
    without positives are left out."""
    values = [average_precision(scores[:, c], targets[:, c]) for c in range(targets.shape[1])]
    values = [v for v in values if not np.isnan(v)]
    return float(np.mean(values)) if values else float("nan")


def accuracy(scores: Tensor, targets: Tensor) -> float:
    """Top-1 accuracy of ``scores [N, C]`` against class indices ``[N]`` (or one-hot ``[N, C]``)."""
    if targets.ndim == 2:
        targets = targets.argmax(dim=1)
    return float((scores.argmax(dim=1) == targets.to(scores.device)).double().mean())


def score(scores: Tensor, targets: Tensor, multi_label: bool) -> float:
    """mAP for a multi-label task, else accuracy."""
    return mean_average_precision(scores, targets) if multi_label else accuracy(scores, targets)
