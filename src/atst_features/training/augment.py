"""Augmentations of the ATST pretraining recipe, batched on the training device.

The reference applies them per item in DataLoader workers (BYOL-A's ``Mixup`` and
``RandomResizeCrop``, fairseq's span masks). Here they run on whole batches of normalised log-mel
spectrograms ``[B, F, T]`` on the GPU, with the same per-item distributions. Every random draw
comes from the ``generator`` argument, so runs are reproducible per rank.
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..errors import InputError

__all__ = ["LabelMixup", "Mixup", "RandomResizeCrop", "span_masks"]


def _uniform(shape, low: float, high: float, generator, device) -> Tensor:
    return low + (high - low) * torch.rand(shape, generator=generator, device=device)


class Mixup(nn.Module):
    """Log-mixup-exp with a FIFO memory bank of past unmixed inputs (BYOL-A, ratio 0.4, 2000 items).

    For each item: ``a ~ ratio * U(0, 1)``; if the bank is empty the item passes unchanged, else a
    uniformly drawn bank entry ``z`` gives ``log((1 - a) exp(x) + a exp(z) + eps)``. Then the batch's
    unmixed inputs are appended to the bank, keeping the last ``memory`` items. Items of one batch
    draw from the bank as it was before the batch (the reference, one item at a time per worker,
    can draw an item of the same worker's batch). The bank lives on the device; checkpoints hold it
    (:meth:`bank_state`, see :mod:`.resume`).
    """

    def __init__(self, ratio: float = 0.4, memory: int = 2000) -> None:
        super().__init__()
        if memory < 1:
            raise InputError("the memory bank must hold at least one item")
        self.ratio = ratio
        self.memory = memory
        self.register_buffer("bank", torch.empty(0), persistent=False)
        self.filled = 0
        self.position = 0  # next slot of the ring buffer

    def contents(self) -> Tensor:
        """The bank, oldest item first: ``[filled, F, T]``."""
        if self.filled < self.memory:
            return self.bank[: self.filled]
        return torch.roll(self.bank, -self.position, dims=0)

    def _push(self, x: Tensor) -> None:
        x = x.detach()[-self.memory :]
        if self.bank.numel() == 0:
            self.bank = x.new_empty((self.memory, *x.shape[1:]))
        elif self.bank.shape[1:] != x.shape[1:]:
            raise InputError(f"Mixup got items of shape {tuple(x.shape[1:])}, its bank holds {tuple(self.bank.shape[1:])}")
        slots = (self.position + torch.arange(len(x), device=x.device)) % self.memory
        self.bank[slots] = x
        self.position = (self.position + len(x)) % self.memory
        self.filled = min(self.filled + len(x), self.memory)

    def clear_if_not_finite(self) -> None:
        """Empty the bank if it took in NaN or Inf (a skipped bad batch); it refills from the next batches."""
        if self.filled and not bool(torch.isfinite(self.bank[: self.filled]).all()):
            self.filled = self.position = 0

    def bank_state(self) -> dict:
        """The bank's items and ring position, for a checkpoint."""
        return {"bank": self.bank[: self.filled], "filled": self.filled, "position": self.position}

    def load_bank_state(self, state: dict, device) -> None:
        self.filled, self.position = state["filled"], state["position"]
        items = state["bank"].to(device)
        self.bank = items.new_empty((self.memory, *items.shape[1:])) if len(items) else torch.empty(0, device=device)
        if len(items):
            self.bank[: len(items)] = items

    def forward(self, x: Tensor, generator: torch.Generator | None = None) -> Tensor:
        batch = x.shape[0]
        alpha = self.ratio * torch.rand(batch, generator=generator, device=x.device)
        if self.filled:
            chosen = torch.randint(self.filled, (batch,), generator=generator, device=x.device)
            background = self.contents()[chosen]
            a = alpha.view(batch, *([1] * (x.ndim - 1)))
            mixed = torch.log((1 - a) * x.exp() + a * background.exp() + torch.finfo(x.dtype).eps)
        else:
            mixed = x
        self._push(x)
        return mixed


class LabelMixup(nn.Module):
    """The reference's fine-tuning mixup (``FinetuneTargetTransform`` / ``MixupSpecLabel``): a FIFO bank
    of the last ``memory`` unmixed ``(input, target)`` pairs; once it holds any, each item is mixed
    (with probability ``ratio``; the reference: 1, and 0.5 for AudioSet) linearly with a uniformly
    drawn bank entry z: ``lam * x + (1 - lam) * z`` and ``lam * y + (1 - lam) * y_z``,
    ``lam ~ Beta(alpha, alpha)``. Clips of different lengths mix as the reference's: a shorter z over
    its own length at a random offset in x (the rest of x unmixed), a longer z by a random segment of
    x's length. Inputs ``[B, F, T]`` with valid frames ``n_frames [B]`` (the bank keeps up to
    ``frames`` of them per item) and float targets ``[B, C]``. Draws come from the
    ``numpy.random.Generator`` given.
    """

    def __init__(self, alpha: float = 0.5, memory: int = 5000, frames: int = 1201, ratio: float = 1.0) -> None:
        super().__init__()
        if memory < 1 or alpha <= 0 or not 0 <= ratio <= 1:
            raise InputError("LabelMixup needs memory >= 1, alpha > 0 and ratio in [0, 1]")
        self.alpha, self.memory, self.frames, self.ratio = alpha, memory, frames, ratio
        self.register_buffer("inputs", torch.empty(0), persistent=False)
        self.register_buffer("targets", torch.empty(0), persistent=False)
        self.lengths: list[int] = [0] * memory  # valid frames of each bank entry
        self.filled = 0
        self.position = 0

    def _push(self, x: Tensor, y: Tensor, lengths: list[int]) -> None:
        x, y, lengths = x.detach()[-self.memory :, :, : self.frames], y.detach()[-self.memory :], lengths[-self.memory :]
        if self.inputs.numel() == 0:
            self.inputs = x.new_zeros((self.memory, x.shape[1], self.frames))
            self.targets = y.new_zeros((self.memory, *y.shape[1:]))
        slots = ((self.position + torch.arange(len(x))) % self.memory).tolist()
        self.inputs[slots] = 0.0
        self.inputs[slots, :, : x.shape[-1]] = x
        self.targets[slots] = y
        for slot, length in zip(slots, lengths):
            self.lengths[slot] = min(length, self.frames)
        self.position = (self.position + len(x)) % self.memory
        self.filled = min(self.filled + len(x), self.memory)

    def clear_if_not_finite(self) -> None:
        """Empty the bank if it took in NaN or Inf (a skipped bad batch); it refills from the next batches."""
        if self.filled and not all(bool(torch.isfinite(bank[: self.filled]).all()) for bank in (self.inputs, self.targets)):
            self.filled = self.position = 0

    def bank_state(self) -> dict:
        """The bank's items, targets, lengths and ring position, for a checkpoint."""
        return {"inputs": self.inputs[: self.filled], "targets": self.targets[: self.filled],
                "lengths": self.lengths[: self.filled], "filled": self.filled, "position": self.position}

    def load_bank_state(self, state: dict, device) -> None:
        self.filled, self.position = state["filled"], state["position"]
        self.lengths = list(state["lengths"]) + [0] * (self.memory - len(state["lengths"]))
        inputs, targets = state["inputs"].to(device), state["targets"].to(device)
        if not len(inputs):
            self.inputs, self.targets = torch.empty(0, device=device), torch.empty(0, device=device)
            return
        self.inputs = inputs.new_zeros((self.memory, *inputs.shape[1:]))
        self.targets = targets.new_zeros((self.memory, *targets.shape[1:]))
        self.inputs[: len(inputs)], self.targets[: len(targets)] = inputs, targets

    def forward(self, x: Tensor, y: Tensor, rng, n_frames: Tensor | None = None) -> tuple[Tensor, Tensor]:
        lengths = [x.shape[-1]] * len(x) if n_frames is None else n_frames.clamp(1, x.shape[-1]).tolist()
        mixed_x, mixed_y = x, y
        if self.filled:
            batch = len(x)
            chosen = rng.integers(self.filled, size=batch)
            lam = rng.beta(self.alpha, self.alpha, size=batch)
            lam = np.where(rng.random(batch) < self.ratio, lam, 1.0)
            mixed_x = x.clone()
            for index, (slot, weight) in enumerate(zip(chosen.tolist(), lam.tolist())):
                if weight == 1.0:
                    continue
                own, other = lengths[index], self.lengths[slot]
                z = self.inputs[slot]
                if own > other:  # z over its own length, at a random offset in x
                    start = int(rng.integers(own - other))
                    part = x[index, :, start : start + other]
                    mixed_x[index, :, start : start + other] = weight * part + (1 - weight) * z[:, :other]
                else:  # a random segment of z as long as x (all of z when as long)
                    start = int(rng.integers(other - own)) if other > own else 0
                    mixed_x[index, :, :own] = weight * x[index, :, :own] + (1 - weight) * z[:, start : start + own]
            lam = torch.as_tensor(lam, dtype=y.dtype, device=y.device)
            chosen = torch.as_tensor(chosen, device=y.device)
            mixed_y = lam[:, None] * y + (1 - lam[:, None]) * self.targets[chosen]
        self._push(x, y, lengths)
        return mixed_x, mixed_y


class RandomResizeCrop(nn.Module):
    """BYOL-A's random resize crop: paste each ``[F, T]`` item (its valid frames: see :meth:`forward`)
    at the centre of a canvas of ``virtual_crop_scale`` times its size filled with ``canvas_value``,
    take a random crop whose height and width are ``freq_scale`` / ``time_scale`` times the item's, and resize it back
    (bicubic, corners aligned). ``virtual_crop_scale=(1, 1)`` with ``time_scale=(1, 1)`` is the
    frequency-only crop of ATST-Frame: time frames are kept exactly.

    ``canvas_value`` 0.0 is the reference's (0 in the normalised domain is -14.5 dB, not silence).
    """

    def __init__(
        self,
        virtual_crop_scale: tuple[float, float] = (1.0, 1.5),
        freq_scale: tuple[float, float] = (0.6, 1.5),
        time_scale: tuple[float, float] = (0.6, 1.5),
        canvas_value: float = 0.0,
    ) -> None:
        super().__init__()
        self.virtual_crop_scale = tuple(virtual_crop_scale)
        self.freq_scale = tuple(freq_scale)
        self.time_scale = tuple(time_scale)
        self.canvas_value = canvas_value

    def forward(self, x: Tensor, generator: torch.Generator | None = None, n_frames: Tensor | None = None) -> Tensor:
        """``x [B, F, T]`` -> cropped and resized ``[B, F, T]``. ``n_frames [B]``: each item's valid frames
        in a zero-padded batch; an item is cropped over its own frames only (the reference crops each
        clip before batching) and its padding is left as it is. None: every item fills ``T``."""
        batch, height, width = x.shape
        device = x.device
        widths = [width] * batch if n_frames is None else n_frames.clamp(1, width).tolist()
        canvas_h = int(height * self.virtual_crop_scale[0])
        canvas_ws = [int(w * self.virtual_crop_scale[1]) for w in widths]
        top = (canvas_h - height) // 2
        item_widths, canvas_widths = torch.tensor(widths, device=device), torch.tensor(canvas_ws, device=device)
        crop_h = (_uniform(batch, *self.freq_scale, generator, device) * height).long().clamp(1, canvas_h)
        crop_w = (_uniform(batch, *self.time_scale, generator, device) * item_widths).long()
        crop_w = torch.minimum(crop_w.clamp(min=1), canvas_widths)
        # inclusive upper bounds, like random.randint(0, canvas - size)
        rows = (torch.rand(batch, generator=generator, device=device) * (canvas_h - crop_h + 1)).long()
        cols = (torch.rand(batch, generator=generator, device=device) * (canvas_widths - crop_w + 1)).long()
        out = x.clone() if n_frames is not None else torch.empty_like(x)
        for index, (i, j, h, w) in enumerate(zip(rows.tolist(), cols.tolist(), crop_h.tolist(), crop_w.tolist())):
            item_w, canvas_w = widths[index], canvas_ws[index]
            item = x[index, :, :item_w]
            if (canvas_h, canvas_w) == (height, item_w):
                canvas = item
            else:
                left = (canvas_w - item_w) // 2
                canvas = x.new_full((canvas_h, canvas_w), self.canvas_value)
                canvas[top : top + height, left : left + item_w] = item
            crop = canvas[i : i + h, j : j + w][None, None]
            out[index, :, :item_w] = F.interpolate(crop, size=(height, item_w), mode="bicubic", align_corners=True)[0, 0]
        return out


def span_masks(
    batch: int,
    n_tokens: int,
    *,
    ratio: float = 0.65,
    span: int = 5,
    min_spans: int = 2,
    exact: bool = False,
    generator: torch.Generator | None = None,
    device: torch.device | str | None = None,
) -> Tensor:
    """Boolean token masks ``[batch, n_tokens]`` (True = masked) for ATST-Frame.

    Default: fairseq's ``compute_mask_indices(mask_type="static")`` as the reference calls it:
    ``max(min_spans, floor(ratio * n_tokens / span + u))`` spans (``u ~ U[0, 1)``) of ``span``
    tokens with distinct starts in ``[0, n_tokens - span - 1]``, overlaps merged: about 50 % of the
    tokens for ratio 0.65, and the last token is never masked. ``exact=True``:
    ``round(ratio * n_tokens / span)`` spans that do not overlap, anywhere, so exactly that many
    times ``span`` tokens are masked (160 of 250 for ratio 0.65).
    """
    if exact:
        count = min(round(ratio * n_tokens / span), n_tokens // span)
        slots = n_tokens - count * (span - 1)
        keys = torch.rand(batch, slots, generator=generator, device=device)
        positions = keys.argsort(dim=1)[:, :count].sort(dim=1).values
        starts = positions + torch.arange(count, device=positions.device) * (span - 1)
        mask = torch.zeros(batch, n_tokens, dtype=torch.bool, device=positions.device)
        for offset in range(span):
            mask.scatter_(1, starts + offset, True)
        return mask
    jitter = torch.rand(batch, generator=generator, device=device)
    spans = torch.clamp(torch.floor(ratio * n_tokens / span + jitter), min=min_spans).long()  # [B]
    # Distinct starts among the first `choices` positions (fairseq shrinks them for short inputs).
    choices = torch.where(n_tokens - span <= spans, spans + 1, torch.full_like(spans, n_tokens - span))
    keys = torch.rand(batch, n_tokens, generator=generator, device=device)
    keys = keys.masked_fill(torch.arange(n_tokens, device=keys.device)[None, :] >= choices[:, None], math.inf)
    ranks = keys.argsort(dim=1).argsort(dim=1)
    starts = (ranks < spans[:, None]).float()[:, None, :]  # [B, 1, P]
    covered = F.conv1d(starts, torch.ones(1, 1, span, device=starts.device), padding=span - 1)[..., :n_tokens]
    return covered[:, 0] > 0
