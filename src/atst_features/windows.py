"""Windows of the spectrogram, and the clip embeddings pooled over them.

The encoder's positional table bounds its input (250 tokens, 1000 frames, 10 s, for the official
models), so :class:`~atst_features.model.ATSTModel` cuts each item's spectrogram into windows
(:func:`plan_windows`), runs the windows of many items in padded batches of similar lengths
(:func:`encoder_passes`, :func:`stack_windows`) and pools each item's clip embedding over its
windows' outputs (:class:`FramePooling` for ATST-Frame / C2F, :class:`ChunkPooling` for ATST-Clip's
6 s chunks). :class:`FiniteCheck` notes which items' outputs held a NaN or Inf, so that none is ever
returned.
"""

from __future__ import annotations

from typing import Callable, Iterator, NamedTuple

import torch
from torch import Tensor

from .encoder import EncoderOutput
from .errors import NonFiniteError

__all__ = [
    "ChunkPooling", "FiniteCheck", "FramePooling", "Window", "encoder_passes", "masked_token_sums", "plan_windows",
    "stack_windows",
]


class Window(NamedTuple):
    item: int  # index of the waveform in the call
    first_frame: int  # first spectrogram frame of the window in its item
    n_frames: int  # valid frames in the window


def plan_windows(total: int, width: int, hop: int, patch: int, later_min_frames: int = 0) -> list[tuple[int, int]]:
    """``(first frame, frames)`` of the windows of ``width`` frames, one every ``hop``, over ``total``
    frames: a window after the first one is kept when it holds at least one token (``patch``
    frames) and more than ``later_min_frames`` frames; with overlap, windows stop at the first that
    reaches the last token."""
    planned = []
    for first in range(0, total, hop):
        frames = min(width, total - first)
        if frames >= patch and (first == 0 or frames > later_min_frames):
            planned.append((first, frames))
        if first + width >= total - total % patch:  # this window holds the last token
            break
    return planned


# A CPU computes every padded token, and every encoder pass also streams all the weights through it
# (base on 2 cores of an AMD EPYC: about 40 ms a pass plus 1.05 ms a token, so a pass costs as much as
# 40 tokens, a sixth of a 10 s window): a window joins a pass when it holds at least PASS_FILL of the
# frames of the pass's first, longest window, so padding costs a pass at most an eighth. Padding every
# window of a batch to the longest ran 12 s clips (a 250- and a 50-token window each, which the official
# code runs apart) at 0.66-0.73x the official code, and 32 clips of 1-5 s (which it runs one by one) at
# 0.83x; with passes, 1.03-1.04x and 1.4x. GPUs keep whole batches (a pass there costs kernel launches;
# this rule was measured on a CPU only).
PASS_FILL = 7 / 8


def runs(count: int, breaks: Callable[[int, int], bool]) -> Iterator[tuple[int, int]]:
    """``(start, end)`` of consecutive runs of ``range(count)``; a run ends before ``end`` when
    ``breaks(start, end)``."""
    start = 0
    for end in range(1, count + 1):
        if end == count or breaks(start, end):
            yield start, end
            start = end


def encoder_passes(windows: list[tuple[int, Window]], batch_size: int, pad: bool) -> Iterator[list[tuple[int, Window]]]:
    """``windows`` (longest first) in consecutive passes of at most ``batch_size``; unless ``pad``, a
    pass also ends before a window with less than :data:`PASS_FILL` of the frames of its first."""

    def breaks(start: int, end: int) -> bool:
        return end - start == batch_size or not pad and windows[end][1].n_frames < PASS_FILL * windows[start][1].n_frames

    return (windows[start:end] for start, end in runs(len(windows), breaks))


def stack_windows(mel: Tensor, batch: list[tuple[int, Window]]) -> Tensor:
    """``[W, n_mels, frames]``: each ``(row, window)``'s frames of ``mel [rows, n_mels, T]``, zeros
    after its end, ``frames`` the longest window. One gather for the whole batch (a per-window copy
    costs a GPU two kernel launches per window)."""
    frames = max(window.n_frames for _, window in batch)
    rows, firsts, counts = torch.tensor([(row, w.first_frame, w.n_frames) for row, w in batch]).to(mel.device).T
    steps = torch.arange(frames, device=mel.device)
    columns = (firsts[:, None] + steps).clamp_(max=mel.shape[-1] - 1)
    bins = torch.arange(mel.shape[1], device=mel.device)
    stacked = mel[rows[:, None, None], bins[None, :, None], columns[:, None, :]]
    return stacked.masked_fill_((steps >= counts[:, None])[:, None, :], 0.0)


def masked_token_sums(output: EncoderOutput, n_tokens: list[int]) -> Tensor:
    """Per window and block, the sum of valid tokens: ``[W, n_blocks, D]`` float32 (also under autocast)."""
    tokens = torch.stack(output.tokens, dim=1).float()  # [W, n, P, D]
    valid = torch.arange(tokens.shape[2], device=tokens.device)[None, :] < torch.tensor(
        n_tokens, device=tokens.device
    )[:, None]
    with torch.autocast(tokens.device.type, enabled=False):
        return torch.einsum("wnpd,wp->wnd", tokens, valid.float())


class FramePooling:
    """Running sums for the ATST-Frame / C2F clip embedding of ``items`` clips: per item and block, the
    valid frame tokens (and, with ``prompts``, the raw prompt means weighted by token counts) over all
    windows seen; :meth:`result` is the token-weighted mean ``[items, blocks * parts * dim]``."""

    def __init__(self, items: int, n_blocks: int, dim: int, prompts: bool, device: torch.device) -> None:
        self.sums = torch.zeros(items, n_blocks, dim, device=device)
        self.prompt_sums = torch.zeros_like(self.sums) if prompts else None
        self.totals = torch.zeros(items, device=device)

    def add(self, windows: list[Window], n_tokens: list[int], out: EncoderOutput) -> None:
        device = self.sums.device
        items = torch.tensor([w.item for w in windows], device=device)
        weights = torch.tensor(n_tokens, device=device, dtype=torch.float32)
        self.sums.index_add_(0, items, masked_token_sums(out, n_tokens))
        self.totals.index_add_(0, items, weights)
        if self.prompt_sums is not None:
            prompts = torch.stack(out.prompts, dim=1).float().mean(dim=2)  # [W, n, D]
            self.prompt_sums.index_add_(0, items, prompts * weights[:, None, None])

    def result(self) -> Tensor:
        scale = self.totals[:, None, None]
        parts = [self.sums / scale]
        if self.prompt_sums is not None:
            parts.append(self.prompt_sums / scale)
        return torch.stack(parts, dim=2).reshape(len(self.sums), -1)  # per block: [tokens, prompts]


class ChunkPooling:
    """Running sums for the ATST-Clip clip embedding of ``items`` clips: per chunk, the CLS outputs and
    the chunk's own token mean; :meth:`result` averages them over each item's chunks, all CLS parts
    first, then all token means: ``[items, 2 * blocks * dim]``."""

    def __init__(self, items: int, n_blocks: int, dim: int, device: torch.device) -> None:
        self.cls_sums = torch.zeros(items, n_blocks, dim, device=device)
        self.mean_sums = torch.zeros_like(self.cls_sums)
        self.chunks = torch.zeros(items, device=device)

    def add(self, windows: list[Window], n_tokens: list[int], out: EncoderOutput) -> None:
        device = self.chunks.device
        items = torch.tensor([w.item for w in windows], device=device)
        own_tokens = torch.tensor(n_tokens, device=device, dtype=torch.float32)
        self.cls_sums.index_add_(0, items, torch.stack(out.cls, dim=1).float())
        self.mean_sums.index_add_(0, items, masked_token_sums(out, n_tokens) / own_tokens[:, None, None])
        self.chunks.index_add_(0, items, torch.ones_like(own_tokens))

    def result(self) -> Tensor:
        count, scale = len(self.chunks), self.chunks[:, None, None]
        return torch.cat([(self.cls_sums / scale).reshape(count, -1), (self.mean_sums / scale).reshape(count, -1)], dim=1)


class FiniteCheck:
    """Which clips got a NaN or Inf from the encoder. A non-finite value anywhere in the residual
    stream stays non-finite in every later block (and attention spreads it over the window), so the
    last block's outputs tell for all returned blocks. Each batch's flags stay on the device (no
    copy to or from it per batch); :meth:`bad_items` reads them all at once: one synchronisation
    per call."""

    def __init__(self) -> None:
        self.items: list[int] = []
        self.finite: list[Tensor] = []

    def add(self, windows: list[Window], out: EncoderOutput) -> None:
        last = [out.tokens[-1]] + [parts[-1] for parts in (out.cls, out.prompts) if parts]
        self.finite.append(torch.stack([torch.isfinite(t).flatten(1).all(dim=1) for t in last]).all(dim=0))  # [W]
        self.items.extend(w.item for w in windows)

    def bad_items(self) -> tuple[int, ...]:
        if not self.finite:
            return ()
        finite = torch.cat(self.finite).tolist()
        return tuple(sorted({item for item, ok in zip(self.items, finite) if not ok}))

    def refuse(self, count: int, float16: bool) -> None:
        """:class:`NonFiniteError` naming the items (of ``count`` in the call) whose outputs were NaN or
        Inf, if any; ``float16``: the model computes in float16, the likely cause."""
        bad = self.bad_items()
        if not bad:
            return
        which = "this audio" if count == 1 else (
            f"audio[{bad[0]}]" + (f" and {len(bad) - 1} more" if len(bad) > 1 else "") + f" (of {count})")
        cause = "float16 overflowed: use bf16 or fp32" if float16 else "the weights are damaged or too large to compute with"
        raise NonFiniteError(f"the model computes NaN or Inf for {which}: {cause}; no embedding is returned", bad, cause)
