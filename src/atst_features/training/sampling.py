"""Label-balanced sampling of training clips, as the reference's AudioSet runs draw them.

The reference fine-tunes and distils on AudioSet with ``WeightedRandomSampler(weights, len(weights))``
over a ``weights_labels.pt`` that is not published; ``atstframe/downstream/test_sampler.py`` builds
it as PSLA does: per clip, the sum over its labels of ``1000 / (clips with that label + 0.01)``, so
that a clip of a rare class is drawn about as often per epoch as one of a common class. Under DDP
its ``DistributedSamplerWrapper`` draws the whole epoch on every rank with a generator seeded by
``seed + epoch`` and rank ``r`` keeps draws ``r, r + world, ...``. :class:`BalancedSampler` does the
same and pads the draws (as :class:`~torch.utils.data.DistributedSampler` does) so that every rank
gets as many.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor
from torch.utils.data import DistributedSampler

from ..errors import InputError

__all__ = ["BalancedSampler", "label_balanced_weights"]


def label_balanced_weights(targets: Tensor) -> Tensor:
    """Sampling weight of each clip, float64 ``[N]``: the sum over its labels of
    ``1000 / (count + 0.01)``, ``count`` the clips with that label. ``targets``: class indices ``[N]``
    or multi-hot ``[N, C]``. A clip without labels weighs 0 (never drawn)."""
    if targets.ndim == 1:
        targets = torch.nn.functional.one_hot(targets.long())
    hot = targets.to(torch.float64)
    return (hot * (1000.0 / (hot.sum(dim=0) + 0.01))).sum(dim=1)


class BalancedSampler(DistributedSampler):
    """Per epoch, ``len(weights)`` clip indices drawn with replacement in proportion to ``weights``
    (one draw for all ranks, seeded by ``seed + epoch``), of which rank ``rank`` of ``num_replicas``
    yields every ``num_replicas``-th. Lightning keeps a :class:`DistributedSampler` as it is and calls
    :meth:`set_epoch` before each epoch, so a resumed run draws what the uninterrupted one would."""

    def __init__(self, weights: Tensor, *, num_replicas: int = 1, rank: int = 0, seed: int = 0) -> None:
        weights = torch.as_tensor(weights, dtype=torch.float64)
        if weights.ndim != 1 or not len(weights) or not bool(torch.isfinite(weights).all()) or bool((weights < 0).any()):
            raise InputError("BalancedSampler needs a non-empty 1-D tensor of finite, non-negative weights")
        if not float(weights.sum()) > 0:
            raise InputError("BalancedSampler: every weight is 0 (no clip has a label)")
        super().__init__(range(len(weights)), num_replicas=num_replicas, rank=rank, shuffle=True, seed=seed)
        self.weights = weights

    def __iter__(self):
        generator = torch.Generator()
        generator.manual_seed(self.seed + self.epoch)
        draws = torch.multinomial(self.weights, len(self.weights), replacement=True, generator=generator).tolist()
        padding = self.total_size - len(draws)  # every rank the same number of steps
        draws += (draws * math.ceil(padding / len(draws)))[:padding]
        return iter(draws[self.rank : self.total_size : self.num_replicas])
