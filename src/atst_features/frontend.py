"""Waveform -> normalised log-mel spectrogram, exactly as the ATST reference computes it.

The reference chains torchaudio's ``MelSpectrogram`` -> ``AmplitudeToDB(top_db=80)`` -> ``MinMax``.
This module reproduces that chain with plain torch (no torchaudio), batched, with per-item lengths:
each item is reflect-padded at its own end, and its 80 dB floor is measured over its own frames only,
so a padded batch gives the same spectrogram as one item at a time.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch
from torch import Tensor

from .audio import SAMPLE_RATE
from .errors import InputError, check_fields

__all__ = ["FrontendConfig", "LogMelFrontend", "mel_filterbank"]


@dataclass(frozen=True)
class FrontendConfig:
    """Parameters of the log-mel front end (defaults: every official ATST model). ``clamp_db``: a
    ``(low, high)`` range the dB values are clamped to after the ``top_db`` floor and before
    min-max scaling, as ATST-SED's and PretrainedSED's front ends do (``(-50, 80)``); None: none."""

    sample_rate: int = SAMPLE_RATE
    n_fft: int = 1024
    win_length: int = 1024
    hop_length: int = 160
    n_mels: int = 64
    f_min: float = 60.0
    f_max: float = 7800.0
    top_db: float = 80.0
    db_min: float = -79.6482
    db_max: float = 50.6842
    clamp_db: tuple[float, float] | None = None

    # (field, type, lowest, highest), as EncoderConfig.RULES.
    RULES = (
        ("sample_rate", int, SAMPLE_RATE, SAMPLE_RATE), ("n_fft", int, 16, 65536), ("win_length", int, 16, 65536),
        ("hop_length", int, 1, 65536), ("n_mels", int, 1, 512), ("f_min", (float, int), 0, 384_000),
        ("f_max", (float, int), 0, 384_000), ("top_db", (float, int), 0, 1000), ("db_min", (float, int), -1e4, 1e4),
        ("db_max", (float, int), -1e4, 1e4),
    )

    def __post_init__(self) -> None:
        check_fields("FrontendConfig", self, self.RULES)
        if self.win_length > self.n_fft or self.f_min >= self.f_max or self.db_min >= self.db_max:
            raise InputError("FrontendConfig needs win_length <= n_fft, f_min < f_max and db_min < db_max")
        if self.clamp_db is not None:
            low_high = tuple(self.clamp_db) if isinstance(self.clamp_db, (list, tuple)) else ()
            if len(low_high) != 2 or not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in low_high) \
                    or not -1e4 <= low_high[0] < low_high[1] <= 1e4:
                raise InputError(f"FrontendConfig.clamp_db must be [low, high] in dB with low < high, got {self.clamp_db!r:.60}")
            object.__setattr__(self, "clamp_db", (float(low_high[0]), float(low_high[1])))
        if self.hop_length * 1000 % self.sample_rate:  # frames and tokens are timed in whole milliseconds
            raise InputError(f"FrontendConfig.hop_length must be a whole number of milliseconds (a multiple of "
                             f"{self.sample_rate // 1000} samples), got {self.hop_length}")

    def to_dict(self) -> dict:
        return asdict(self)


def _hz_to_mel(hz: Tensor) -> Tensor:
    return 2595.0 * torch.log10(1.0 + hz / 700.0)


def _mel_to_hz(mel: Tensor) -> Tensor:
    return 700.0 * (10.0 ** (mel / 2595.0) - 1.0)


def mel_filterbank(config: FrontendConfig) -> Tensor:
    """HTK triangular filters without area normalisation, float32 ``[n_fft // 2 + 1, n_mels]``."""
    n_freqs = config.n_fft // 2 + 1
    freqs = torch.linspace(0.0, config.sample_rate // 2, n_freqs, dtype=torch.float64)
    mel_edges = torch.linspace(
        _hz_to_mel(torch.tensor(config.f_min, dtype=torch.float64)).item(),
        _hz_to_mel(torch.tensor(config.f_max, dtype=torch.float64)).item(),
        config.n_mels + 2,
        dtype=torch.float64,
    )
    hz_edges = _mel_to_hz(mel_edges)
    widths = hz_edges[1:] - hz_edges[:-1]
    slopes = hz_edges[None, :] - freqs[:, None]  # [n_freqs, n_mels + 2]
    rising = -slopes[:, :-2] / widths[:-1]
    falling = slopes[:, 2:] / widths[1:]
    return torch.clamp(torch.minimum(rising, falling), min=0.0).to(torch.float32)


class LogMelFrontend(torch.nn.Module):
    """Batched log-mel front end.

    ``forward(waveforms [B, N] float, n_samples [B] int | None) -> (mel [B, n_mels, T], n_frames [B])``
    with ``T = 1 + N // hop_length`` frames, frame ``j`` centred on sample ``hop_length * j``.
    Values are MinMax-normalised dB (roughly -1.3 for silence to +1); frames past an item's own
    length hold the value digital silence has in that item. Computation is always float32,
    whatever the module's dtype.
    """

    # Frames computed per STFT call: bounds the complex intermediate on hour-long inputs.
    frames_per_block = 6000
    # An item whose samples reach beyond this is divided by its peak before the power spectrum, and
    # 20 log10(peak) added back to its dB: float32 powers overflow from about 1e16 (a clip of 1e20
    # gave NaN embeddings). Far above any real recording (120 dB above full scale), so real audio
    # takes the same arithmetic as ever.
    loud_samples = 1e6

    def __init__(self, config: FrontendConfig | None = None) -> None:
        super().__init__()
        self.config = config or FrontendConfig()
        # Kept out of the state dict (they follow from the config) and out of .to(dtype):
        # a bfloat16 Hann window would change the spectrogram.
        self._constants: dict[torch.device, tuple[Tensor, Tensor]] = {}

    @property
    def min_samples(self) -> int:
        """Shortest input the reflect padding of a centred STFT accepts (513 samples at defaults)."""
        return self.config.n_fft // 2 + 1

    def n_frames(self, n_samples: Tensor | int) -> Tensor | int:
        """Number of spectrogram frames for a waveform of ``n_samples`` samples."""
        return 1 + n_samples // self.config.hop_length

    def _window_and_filters(self, device: torch.device) -> tuple[Tensor, Tensor]:
        if device not in self._constants:
            cfg = self.config
            window = torch.hann_window(cfg.win_length, periodic=True, dtype=torch.float64)
            left = (cfg.n_fft - cfg.win_length) // 2  # torch.stft centres a short window
            window = torch.nn.functional.pad(window, (left, cfg.n_fft - cfg.win_length - left))
            self._constants[device] = (
                window.to(device=device, dtype=torch.float32),
                mel_filterbank(cfg).to(device),
            )
        return self._constants[device]

    def _padded_segment(self, waveforms: Tensor, n_samples: Tensor, start: int, stop: int, unpadded: bool) -> Tensor:
        """Samples ``start:stop`` of every item reflect-padded by ``n_fft // 2`` at its start and at its
        own end (what ``torch.stft(center=True)`` pads), built per segment: no padded copy of a long input.
        ``unpadded``: every item fills the tensor (``n_samples == width``)."""
        pad = self.config.n_fft // 2
        first, last_sample, width = start - pad, stop - pad, waveforms.shape[1]
        segment = waveforms[:, max(first, 0) : min(last_sample, width)]
        edges = (max(0, -first), max(0, last_sample - width))
        if unpadded and segment.shape[1] > max(edges):
            # No item is padded: a slice, mirrored at the signal's edges only (a fast path).
            return torch.nn.functional.pad(segment[:, None], edges, mode="reflect")[:, 0] if any(edges) else segment
        index = torch.arange(first, last_sample, device=waveforms.device)[None, :].expand(len(waveforms), -1)
        last = (n_samples - 1)[:, None]
        index = torch.where(index < 0, -index, index)  # left edge: x[1], x[2], ... mirrored
        index = torch.where(index > last, 2 * last - index, index)  # right edge: x[N-2], x[N-3], ...
        inside = (index >= 0) & (index <= last)
        return torch.where(inside, torch.gather(waveforms, 1, index.clamp(0, waveforms.shape[1] - 1)), 0.0)

    def _gain(self, waveforms: Tensor) -> Tensor | None:
        """Per item, its peak where it exceeds :attr:`loud_samples`, else 1 (``[B]``); None on a CPU
        when no item is that loud (checking costs no device synchronisation there)."""
        peak = torch.linalg.vector_norm(waveforms, ord=math.inf, dim=1)
        loud = peak > self.loud_samples
        if waveforms.device.type == "cpu" and not bool(loud.any()):
            return None
        return torch.where(loud, peak, torch.ones_like(peak))

    def forward(self, waveforms: Tensor, n_samples: Tensor | None = None) -> tuple[Tensor, Tensor]:
        # Never under autocast (e.g. bf16-mixed training): a bf16 power spectrum loses the 80 dB range.
        with torch.autocast(device_type=waveforms.device.type, enabled=False):
            return self._log_mel(waveforms, n_samples)

    def _log_mel(self, waveforms: Tensor, n_samples: Tensor | None) -> tuple[Tensor, Tensor]:
        if waveforms.ndim != 2:
            raise InputError(f"expected waveforms [batch, samples], got shape {tuple(waveforms.shape)}")
        cfg = self.config
        batch, width = waveforms.shape
        device = waveforms.device
        if n_samples is None:
            n_samples = torch.full((batch,), width, dtype=torch.long, device=device)
        shortest = int(n_samples.min())  # a CPU tensor of lengths costs no device synchronisation here
        n_samples = n_samples.to(device=device, dtype=torch.long)
        if shortest < self.min_samples:
            raise InputError(
                f"every waveform needs at least {self.min_samples} samples for the centred STFT; got {shortest}"
            )
        window, filters = self._window_and_filters(device)
        waveforms = waveforms.to(torch.float32)
        gain = self._gain(waveforms)  # applied per block below: no scaled copy of a long input

        total_frames = self.n_frames(width)
        mel = torch.empty(batch, cfg.n_mels, total_frames, dtype=torch.float32, device=device)
        for first in range(0, total_frames, self.frames_per_block):
            last = min(first + self.frames_per_block, total_frames)
            segment = self._padded_segment(
                waveforms, n_samples, first * cfg.hop_length, (last - 1) * cfg.hop_length + cfg.n_fft, shortest == width
            )
            if gain is not None:
                segment = segment / gain[:, None]
            spec = torch.stft(
                segment,
                n_fft=cfg.n_fft,
                hop_length=cfg.hop_length,
                window=window,
                center=False,
                return_complex=True,
            )
            power = spec.real.square().addcmul_(spec.imag, spec.imag)  # |X|^2 [B, n_freqs, frames], one temporary
            torch.matmul(filters.T, power, out=mel[:, :, first:last])

        # In place from here on: for an hour of audio each copy of `mel` would be about 90 MB.
        amin = 1e-10
        db = mel.clamp_(min=amin).log10_().mul_(10.0)
        if gain is not None:
            db.add_(20.0 * torch.log10(gain)[:, None, None])
        n_frames = self.n_frames(n_samples)
        silence = 10.0 * math.log10(amin)  # what digital silence becomes, unless the floor is higher
        # Per item: floor = its loudest valid bin - top_db; frames past its end hold max(floor, silence).
        # Vectorised over the batch (no per-item loop: a GPU would launch kernels per item).
        valid = torch.arange(total_frames, device=device)[None, :] < n_frames[:, None]  # [B, frames]
        floor = db.amax(dim=1).masked_fill_(~valid, -math.inf).amax(dim=1)[:, None, None] - cfg.top_db
        torch.maximum(db, floor, out=db)
        if shortest < width:  # some item is padded
            torch.where(valid[:, None, :], db, floor.clamp(min=silence), out=db)
        if cfg.clamp_db is not None:
            db.clamp_(*cfg.clamp_db)
        normalised = db.sub_(cfg.db_min).div_(cfg.db_max - cfg.db_min).mul_(2.0).sub_(1.0)
        return normalised, n_frames
