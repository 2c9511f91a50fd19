"""Which training clips come in what order: resumable samplers and loaders, and label-balanced
sampling as the reference's AudioSet runs draw clips.

A resumed run must see the batches the interrupted one would have seen next. Each epoch's order
is a function of ``(seed, epoch)`` (:class:`ResumableSampler`), and :class:`ResumableLoader`
tells Lightning (which saves the ``state_dict`` of a loader that has one in every checkpoint) how
many batches of the epoch were trained on, so that a resumed run skips exactly those. Random
choices made while loading an item (a pretraining crop's offset) come from a seed drawn for that
item's place in the epoch (``draw_seeds``), not from a process-wide generator, so they do not
depend on the number of workers or on where a run was resumed.

Balanced sampling:

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
from collections.abc import Callable

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import DataLoader, DistributedSampler

from ..errors import InputError

__all__ = ["BalancedSampler", "ResumableLoader", "ResumableSampler", "draw_seed", "label_balanced_weights", "resumable_loader"]


def label_balanced_weights(targets: Tensor) -> Tensor:
    """Sampling weight of each clip, float64 ``[N]``: the sum over its labels of
    ``1000 / (count + 0.01)``, ``count`` the clips with that label. ``targets``: class indices ``[N]``
    or multi-hot ``[N, C]``. A clip without labels weighs 0 (never drawn)."""
    if targets.ndim == 1:
        targets = torch.nn.functional.one_hot(targets.long())
    hot = targets.to(torch.float64)
    return (hot * (1000.0 / (hot.sum(dim=0) + 0.01))).sum(dim=1)


def draw_seed(seed: int, epoch: int, position: int) -> int:
    """The seed of the random choices made for the item at ``position`` of epoch ``epoch``'s order."""
    return int(np.random.SeedSequence([seed, epoch, position]).generate_state(1, np.uint64)[0] >> 1)


class ResumableSampler(DistributedSampler):
    """:class:`~torch.utils.data.DistributedSampler` (shuffled by ``seed + epoch``, rank ``rank`` of
    ``num_replicas`` yields every ``num_replicas``-th item; Lightning keeps it as it is under DDP and
    calls :meth:`set_epoch`) that can start an epoch part way (:meth:`resume`). With ``draw_seeds``
    it yields ``(index, seed)`` pairs: the dataset draws that item's random choices from ``seed``."""

    def __init__(self, size: int, *, num_replicas: int = 1, rank: int = 0, seed: int = 0, shuffle: bool = True,
                 draw_seeds: bool = False) -> None:
        super().__init__(range(size), num_replicas=num_replicas, rank=rank, shuffle=shuffle, seed=seed)
        self.draw_seeds = draw_seeds
        self._resume: tuple[int, int] | None = None  # (epoch, items of this rank already seen)

    def order(self) -> list[int]:
        """This rank's item indices for the current epoch, in order."""
        return list(super().__iter__())

    def resume(self, epoch: int, items: int) -> None:
        """Start at ``epoch``, leaving out its first ``items`` items of this rank (once)."""
        self.set_epoch(epoch)
        self._resume = (epoch, items)

    def __iter__(self):
        order = self.order()
        start = 0
        if self._resume is not None and self._resume[0] == self.epoch:
            start = self._resume[1]
        self._resume = None
        for position in range(start, len(order)):
            if self.draw_seeds:  # the place of the item in the epoch's whole order, the same for any world size
                yield order[position], draw_seed(self.seed, self.epoch, position * self.num_replicas + self.rank)
            else:
                yield order[position]


class ResumableLoader(DataLoader):
    """A :class:`~torch.utils.data.DataLoader` over a :class:`ResumableSampler` whose ``state_dict``
    (saved by Lightning in each checkpoint) holds the epoch and how many of its batches were trained on,
    read from ``trained_batches()`` (the trainer's count: batches fetched ahead are not counted)."""

    def __init__(self, dataset, *, sampler: ResumableSampler, trained_batches: Callable[[], int], **kwargs) -> None:
        super().__init__(dataset, sampler=sampler, **kwargs)
        self.trained_batches = trained_batches

    def state_dict(self) -> dict:
        return {"epoch": self.sampler.epoch, "batches": int(self.trained_batches())}

    def load_state_dict(self, state: dict) -> None:
        self.sampler.resume(state["epoch"], state["batches"] * self.batch_size)


def resumable_loader(dataset, trainer, *, seed: int, weights: Tensor | None = None, draw_seeds: bool = False,
                     **options) -> ResumableLoader:
    """The training loader of a data module: ``dataset`` in a resumable order for this process's rank of
    ``trainer``'s world (rank 0 of 1 without a trainer), shuffled by ``seed`` and the epoch, or drawn in
    proportion to ``weights`` (:class:`BalancedSampler`); ``options`` go to the DataLoader."""
    world, rank = (trainer.world_size, trainer.global_rank) if trainer is not None else (1, 0)
    if weights is not None:
        sampler = BalancedSampler(weights, num_replicas=world, rank=rank, seed=seed)
    else:
        sampler = ResumableSampler(len(dataset), num_replicas=world, rank=rank, seed=seed, draw_seeds=draw_seeds)
    trained = (lambda: trainer.fit_loop.epoch_loop.batch_progress.current.processed) if trainer is not None else (lambda: 0)
    return ResumableLoader(dataset, sampler=sampler, trained_batches=trained, **options)


class BalancedSampler(ResumableSampler):
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
        super().__init__(len(weights), num_replicas=num_replicas, rank=rank, shuffle=True, seed=seed)
        self.weights = weights

    def order(self) -> list[int]:
        generator = torch.Generator()
        generator.manual_seed(self.seed + self.epoch)
        draws = torch.multinomial(self.weights, len(self.weights), replacement=True, generator=generator).tolist()
        padding = self.total_size - len(draws)  # every rank the same number of steps
        draws += (draws * math.ceil(padding / len(draws)))[:padding]
        return draws[self.rank : self.total_size : self.num_replicas]
