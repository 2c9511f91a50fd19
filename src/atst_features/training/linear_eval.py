"""The paper's linear evaluation of frozen embeddings (``docs/reference-notes.md#linear-evaluation``).

A :class:`~atst_features.heads.LinearHead` (BatchNorm1d without affine parameters, then a Linear
layer initialised from N(0, 0.01^2)) trained on fixed embeddings: SGD with momentum 0.9 and no
weight decay, learning rate ``lr * batch / 256`` (batch 1024), a cosine annealing to 0 stepped per
epoch, 100 epochs, cross-entropy (single-label) or BCE (multi-label). The epoch with the best
validation score is kept and scored on test. The reference sweeps the learning rate per task; here
the sweep's best validation score chooses it.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor
from tqdm import tqdm

from ..heads import LinearHead
from .metrics import score

__all__ = ["REFERENCE_LEARNING_RATES", "LinearEvalResult", "linear_evaluation", "train_linear_head"]

# Every learning rate of the reference's linear-evaluation scripts (section 7.1 table, per 256 clips).
REFERENCE_LEARNING_RATES = (2.5e-4, 5e-4, 1e-3, 2e-3, 0.02, 0.05, 0.1, 0.5, 1.0, 2.0, 4.0)


@dataclass
class LinearEvalResult:
    """The chosen learning rate and epoch, and the validation and test scores of that head."""

    learning_rate: float
    epoch: int
    valid: float
    test: float


def train_linear_head(
    train_x: Tensor,
    train_y: Tensor,
    valid_x: Tensor,
    valid_y: Tensor,
    *,
    multi_label: bool,
    num_classes: int,
    learning_rate: float,
    epochs: int = 100,
    batch_size: int = 1024,
    seed: int = 0,
) -> tuple[LinearHead, int, float]:
    """Train a LinearHead on ``train_x [N, E]`` with the reference recipe; returns the head of the
    epoch (1-based) with the best validation score, that epoch and the score."""
    generator = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    head = LinearHead(train_x.shape[1], num_classes)
    optimiser = torch.optim.SGD(head.parameters(), lr=learning_rate * batch_size / 256, momentum=0.9, weight_decay=0.0)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimiser, T_max=epochs, eta_min=0.0)
    targets = train_y.float() if multi_label else train_y.long()
    best: tuple[float, int, dict] | None = None
    for epoch in range(1, epochs + 1):
        head.train()
        order = torch.randperm(len(train_x), generator=generator)
        for first in range(0, len(order), batch_size):
            rows = order[first : first + batch_size]
            if len(rows) < 2:  # BatchNorm needs two items
                continue
            logits = head(train_x[rows])
            loss = F.binary_cross_entropy_with_logits(logits, targets[rows]) if multi_label \
                else F.cross_entropy(logits, targets[rows])
            optimiser.zero_grad()
            loss.backward()
            optimiser.step()
        schedule.step()
        head.eval()
        with torch.no_grad():
            value = score(head(valid_x), valid_y, multi_label)
        if best is None or value > best[0]:
            best = (value, epoch, copy.deepcopy(head.state_dict()))
    head.load_state_dict(best[2])
    return head.eval(), best[1], best[0]


def linear_evaluation(
    features: dict[str, Tensor],
    targets: dict[str, Tensor],
    *,
    multi_label: bool,
    num_classes: int,
    learning_rates: tuple[float, ...] = REFERENCE_LEARNING_RATES,
    epochs: int = 100,
    batch_size: int = 1024,
    seed: int = 0,
    progress: bool = True,
) -> LinearEvalResult:
    """Run :func:`train_linear_head` for each learning rate on the ``train`` / ``valid`` features;
    the best validation score (ties: the smaller rate) chooses the head scored on ``test``."""
    best = None
    for lr in tqdm(sorted(learning_rates), desc="linear heads", unit="lr", leave=False, disable=not progress):
        head, epoch, valid = train_linear_head(
            features["train"], targets["train"], features["valid"], targets["valid"], multi_label=multi_label,
            num_classes=num_classes, learning_rate=lr, epochs=epochs, batch_size=batch_size, seed=seed,
        )
        if best is None or valid > best[0].valid:
            with torch.no_grad():
                test = score(head(features["test"]), targets["test"], multi_label) if len(features["test"]) else float("nan")
            best = (LinearEvalResult(lr, epoch, valid, test), head)
    return best[0]
