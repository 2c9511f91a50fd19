"""Audio in: decode files (soundfile), downmix, resample (soxr), validate -> float32 mono.

Every conversion of channels and sample rate in the package goes through this module.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import soundfile
import soxr
import torch
from torch import Tensor

__all__ = ["AudioDecodeError", "EmptyAudioError", "load_audio", "resample", "to_waveforms"]


class AudioDecodeError(ValueError):
    """A file that libsndfile cannot read: missing, unreadable, corrupt or an unsupported format."""


class EmptyAudioError(ValueError):
    """Audio with no samples."""


def resample(waveform: np.ndarray, orig_rate: int, target_rate: int) -> np.ndarray:
    """Resample ``[N]`` or ``[N, channels]`` float audio with soxr (high quality); float32 out."""
    waveform = np.asarray(waveform, dtype=np.float32)
    if orig_rate == target_rate:
        return waveform
    return soxr.resample(waveform, orig_rate, target_rate, quality="HQ").astype(np.float32, copy=False)


def load_audio(path: str | os.PathLike, target_rate: int | None = 16000) -> tuple[np.ndarray, int]:
    """Decode a file to a float32 mono waveform ``[N]`` (channels averaged).

    Resampled to ``target_rate`` Hz unless it is None. Returns ``(waveform, rate)``.
    Raises :class:`AudioDecodeError` (with libsndfile's reason) or :class:`EmptyAudioError`.
    """
    path = Path(path)
    if path.is_dir():
        raise AudioDecodeError(f"{str(path)!r}: is a directory, not an audio file")
    if not path.exists():
        raise AudioDecodeError(f"{str(path)!r}: no such file")
    try:
        data, rate = soundfile.read(str(path), dtype="float32", always_2d=True)
    except (soundfile.LibsndfileError, RuntimeError, TypeError) as err:
        reason = str(err).replace(f"Error opening {str(path)!r}: ", "")
        raise AudioDecodeError(
            f"{str(path)!r}: cannot decode ({reason}); convert it to WAV, FLAC, OGG or MP3, "
            "e.g. ffmpeg -i INPUT -ar 16000 -ac 1 OUTPUT.wav"
        ) from None
    if data.shape[0] == 0:
        raise EmptyAudioError(f"{str(path)!r}: the file holds no audio samples")
    mono = data.mean(axis=1, dtype=np.float32)
    if target_rate is not None and rate != target_rate:
        mono, rate = resample(mono, rate, target_rate), target_rate
    return mono, rate


def _as_float_tensor(item, what: str) -> Tensor:
    if isinstance(item, np.ndarray):
        if not (np.issubdtype(item.dtype, np.floating)):
            kind = "complex" if np.iscomplexobj(item) else f"{item.dtype}"
            raise ValueError(
                f"{what} has dtype {kind}; pass real floating-point samples in [-1, 1] "
                "(for int16 PCM divide by 32768)"
            )
        return torch.from_numpy(np.ascontiguousarray(item, dtype=np.float32))
    if isinstance(item, Tensor):
        if item.is_complex() or not item.is_floating_point():
            raise ValueError(
                f"{what} has dtype {item.dtype}; pass real floating-point samples in [-1, 1] "
                "(for int16 PCM divide by 32768)"
            )
        return item.detach().to(torch.float32)
    raise TypeError(f"{what} must be a torch tensor, a numpy array or a file path, got {type(item).__name__}")


def _check_finite(waveform: Tensor, what: str) -> None:
    if waveform.numel() == 0:
        raise EmptyAudioError(f"{what} is empty (0 samples)")
    if not bool(torch.isfinite(waveform).all()):
        raise ValueError(f"{what} contains NaN or Inf samples")


def to_waveforms(audio, sample_rate: int | None, target_rate: int = 16000) -> tuple[list[Tensor], bool]:
    """Validate any accepted audio input and return ``(waveforms, is_list)``.

    ``audio``: a tensor or array ``[N]`` or ``[B, N]`` (float, in [-1, 1]), a list of 1-D ones of
    different lengths, or a file path. ``sample_rate``: rate of the given samples (None: 16000;
    for a path, the file's own rate is used and must not be contradicted). Each returned waveform
    is float32 ``[N_i]`` at ``target_rate``, on the input's device.
    """
    if sample_rate is not None and (isinstance(sample_rate, bool) or not isinstance(sample_rate, (int, np.integer)) or sample_rate <= 0):
        raise ValueError(f"sample_rate must be a positive integer (Hz), got {sample_rate!r}")
    if isinstance(audio, (str, os.PathLike)):
        waveform, file_rate = load_audio(audio, target_rate=None)
        if sample_rate is not None and sample_rate != file_rate:
            raise ValueError(
                f"sample_rate={sample_rate} contradicts the file {str(audio)!r} ({file_rate} Hz); "
                "leave sample_rate unset for files"
            )
        return [torch.from_numpy(resample(waveform, file_rate, target_rate))], False

    rate = target_rate if sample_rate is None else int(sample_rate)
    if isinstance(audio, (list, tuple)):
        if not audio:
            raise EmptyAudioError("the audio list is empty")
        items = []
        for index, item in enumerate(audio):
            what = f"audio[{index}]"
            waveform = _as_float_tensor(item, what)
            if waveform.ndim != 1:
                raise ValueError(f"{what} must be 1-D [samples], got shape {tuple(waveform.shape)}")
            items.append(waveform)
        is_list = True
    else:
        waveform = _as_float_tensor(audio, "audio")
        if waveform.ndim == 1:
            waveform = waveform[None]
        elif waveform.ndim != 2:
            raise ValueError(
                f"audio must be [samples] or [batch, samples], got {waveform.ndim} dimensions "
                f"{tuple(waveform.shape)}; downmix channels first (e.g. audio.mean(dim=1))"
            )
        if waveform.shape[0] == 0:
            raise EmptyAudioError("audio has a batch of 0 items")
        items = list(waveform)
        is_list = False

    for index, waveform in enumerate(items):
        _check_finite(waveform, "audio" if len(items) == 1 and not is_list else f"audio[{index}]")
    if rate != target_rate:
        items = [_resample_tensor(w, rate, target_rate, f"audio[{i}]") for i, w in enumerate(items)]
    return items, is_list


def _resample_tensor(waveform: Tensor, orig_rate: int, target_rate: int, what: str) -> Tensor:
    out = resample(waveform.cpu().numpy(), orig_rate, target_rate)
    if out.size == 0:
        raise EmptyAudioError(
            f"{what} has {waveform.numel()} sample(s) at {orig_rate} Hz: less than one sample at {target_rate} Hz"
        )
    return torch.from_numpy(out).to(waveform.device)
