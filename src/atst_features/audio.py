"""Audio in: decode files (soundfile), downmix, resample (soxr), validate -> float32 mono.

Every conversion of channels and sample rate in the package goes through this module.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import numpy as np
import soundfile
import soxr
import torch
from torch import Tensor

from .errors import AudioDecodeError, EmptyAudioError, InputError

__all__ = ["SAMPLE_RATE", "AudioInfo", "centre_crop", "load_audio", "resample", "to_waveforms"]

SAMPLE_RATE = 16000  # Hz: the rate every ATST model takes (FrontendConfig refuses others)
BLOCK_SAMPLES = 1 << 18  # samples (frames x channels) decoded at a time: bounds memory on long files
INITIAL_SAMPLES = 1 << 22  # first output buffer (16 MB); it grows as samples arrive, never from a header
RATE_LIMITS = (1000, 768_000)  # sample rates accepted, Hz: beyond them a file or call is refused
MAX_CHANNELS = 1024
# [batch, samples] with fewer samples than this per clip (4 ms at 16 kHz, a tenth of a token) and more
# clips than samples: [samples, channels] audio (as soundfile.read returns it) the wrong way round.
CHANNELS_LAST_BELOW = 64
CONVERT_HINT = "convert it to WAV/FLAC/OGG/MP3, e.g. ffmpeg -i INPUT -ac 1 -ar 16000 OUTPUT.wav"




@dataclass(frozen=True)
class AudioInfo:
    """What the file held before conversion to mono ``target_rate``."""

    path: str
    sample_rate: int
    channels: int
    frames: int
    format: str
    subtype: str

    @property
    def duration(self) -> float:
        """Seconds of audio decoded."""
        return self.frames / self.sample_rate


def resample(waveform: np.ndarray, orig_rate: int, target_rate: int) -> np.ndarray:
    """Resample ``[N]`` or ``[N, channels]`` float audio with soxr (high quality); float32 out."""
    waveform = np.asarray(waveform, dtype=np.float32)
    if orig_rate == target_rate:
        return waveform
    return soxr.resample(waveform, orig_rate, target_rate, quality="HQ").astype(np.float32, copy=False)


def _decode_error(path: Path, err: Exception) -> AudioDecodeError:
    reason = re.sub(r"^Error opening .*?: ", "", str(err)).strip().rstrip(".") or type(err).__name__
    return AudioDecodeError(f"{str(path)!r}: cannot decode ({reason}); {CONVERT_HINT}")


def load_audio(
    path: str | os.PathLike | BinaryIO,
    target_rate: int | None = SAMPLE_RATE,
    *,
    offset: float = 0.0,
    duration: float | None = None,
) -> tuple[np.ndarray, AudioInfo]:
    """Decode a file to a float32 mono waveform ``[N]``: channels averaged, resampled to ``target_rate``
    Hz with soxr (None: keep the file's rate). Reads in blocks, so memory stays near the size of the
    output even for long multichannel files. ``offset`` and ``duration`` (seconds) select a segment
    (only that segment is read). Returns ``(waveform, info)``; ``info.frames`` counts decoded frames.

    Raises :class:`AudioDecodeError` (with libsndfile's reason and a conversion hint) for missing,
    unreadable, corrupt, truncated or unsupported files, NaN or Inf samples, and declared sample
    rates or channel counts outside ``RATE_LIMITS`` / ``MAX_CHANNELS``; :class:`EmptyAudioError`
    for files without samples. Memory follows the samples actually decoded, never a header's
    declared length. Formats: whatever libsndfile reads (WAV, FLAC, OGG/Vorbis, MP3, AIFF, ...).
    ``path`` may also be a binary file object (e.g. ``io.BytesIO`` of an encoded file).
    """
    if isinstance(path, (str, os.PathLike)):
        path = Path(path)
        if path.is_dir():
            raise AudioDecodeError(f"{str(path)!r}: is a directory, not an audio file")
        if not path.exists():
            raise AudioDecodeError(f"{str(path)!r}: no such file")
        if not path.is_file():  # checked before opening: reading a FIFO would block
            raise AudioDecodeError(f"{str(path)!r}: not a regular file (a FIFO, socket or device?)")
        source = os.fsencode(path)  # bytes: names that are not valid UTF-8 (surrogate-escaped) open too
    else:
        source, path = path, Path(getattr(path, "name", "<audio bytes>"))
    try:
        with soundfile.SoundFile(source) as handle:
            info = AudioInfo(str(path), handle.samplerate, handle.channels, handle.frames, handle.format, handle.subtype)
            _check_header(info, path)
            # A header may lie (a corrupt length field) or not know (a FLAC stream of unknown
            # length declares 0): decode what is there, and never allocate from the declared length.
            known = info.frames > 0
            first = min(int(round(offset * info.sample_rate)), info.frames) if known else int(round(offset * info.sample_rate))
            wanted = info.frames - first if known else np.iinfo(np.int64).max
            if duration is not None:
                wanted = min(int(round(duration * info.sample_rate)), wanted)
            if wanted <= 0:
                raise EmptyAudioError(
                    f"{str(path)!r}: no samples from {offset} s on (the file lasts {info.duration:.3f} s)"
                )
            if first:
                handle.seek(first)
            rate = target_rate or info.sample_rate
            stream = (
                soxr.ResampleStream(info.sample_rate, rate, 1, dtype="float32", quality="HQ")
                if rate != info.sample_rate
                else None
            )
            out = np.empty(min(int(np.ceil(min(wanted, INITIAL_SAMPLES) * rate / info.sample_rate)) + 16, INITIAL_SAMPLES),
                           dtype=np.float32)
            filled = decoded = 0
            block_frames = max(1, BLOCK_SAMPLES // info.channels)
            # Not SoundFile.blocks(): it zero-fills a stream that ends before its header says.
            while decoded < wanted and len(
                block := handle.read(min(block_frames, wanted - decoded), dtype="float32", always_2d=True)
            ):
                decoded += len(block)
                mono = block.mean(axis=1, dtype=np.float32) if info.channels > 1 else block[:, 0]
                chunk = stream.resample_chunk(mono, last=False) if stream else mono
                out, filled = _append(out, filled, chunk)
            if stream:
                out, filled = _append(out, filled, stream.resample_chunk(np.zeros(0, np.float32), last=True))
    except (EmptyAudioError, AudioDecodeError):
        raise
    except (soundfile.LibsndfileError, RuntimeError, TypeError, ValueError, OSError) as err:
        raise _decode_error(path, err) from None
    if known and decoded < 0.99 * wanted:  # e.g. a cut MP3 whose header still promises the whole stream
        raise AudioDecodeError(
            f"{str(path)!r}: truncated or corrupt (the header promises {wanted} samples, "
            f"{decoded} could be decoded); {CONVERT_HINT}"
        )
    if decoded == 0:
        raise EmptyAudioError(f"{str(path)!r}: the file holds no audio samples")
    if filled == 0:
        raise EmptyAudioError(
            f"{str(path)!r}: {decoded} sample(s) at {info.sample_rate} Hz make less than one sample at {rate} Hz"
        )
    waveform = out[:filled]
    if not np.isfinite(waveform).all():
        overflow = f", or samples too large to resample to {rate} Hz (near float32's limit, 3.4e38)" if rate != info.sample_rate else ""
        raise AudioDecodeError(f"{str(path)!r}: contains NaN or Inf samples (a float file with invalid values{overflow}); "
                               "normalise it to [-1, 1]")
    info = AudioInfo(info.path, info.sample_rate, info.channels, decoded, info.format, info.subtype)
    return waveform, info


def _check_header(info: AudioInfo, path: Path) -> None:
    """Refuse declared sample rates and channel counts no real recording has (fuzzed headers)."""
    low, high = RATE_LIMITS
    if not low <= info.sample_rate <= high:
        raise AudioDecodeError(
            f"{str(path)!r}: declares {info.sample_rate} Hz, outside {low}-{high} Hz (a corrupt header?); {CONVERT_HINT}"
        )
    if not 1 <= info.channels <= MAX_CHANNELS:
        raise AudioDecodeError(f"{str(path)!r}: declares {info.channels} channels (at most {MAX_CHANNELS}); {CONVERT_HINT}")


def _append(buffer: np.ndarray, filled: int, chunk: np.ndarray) -> tuple[np.ndarray, int]:
    end = filled + len(chunk)
    if end > len(buffer):  # the header under-reported the length (possible for compressed formats)
        grown = np.empty(max(end, int(len(buffer) * 1.5)), dtype=np.float32)
        grown[:filled] = buffer[:filled]
        buffer = grown
    buffer[filled:end] = chunk
    return buffer, end


def _as_float_tensor(item, what: str) -> Tensor:
    if isinstance(item, np.ndarray):
        if not (np.issubdtype(item.dtype, np.floating)):
            kind = "complex" if np.iscomplexobj(item) else f"{item.dtype}"
            raise InputError(
                f"{what} has dtype {kind}; pass real floating-point samples in [-1, 1] "
                "(for int16 PCM divide by 32768)"
            )
        return torch.from_numpy(np.ascontiguousarray(item, dtype=np.float32))
    if isinstance(item, Tensor):
        if item.is_complex() or not item.is_floating_point():
            raise InputError(
                f"{what} has dtype {item.dtype}; pass real floating-point samples in [-1, 1] "
                "(for int16 PCM divide by 32768)"
            )
        return item.detach().to(torch.float32)
    raise InputError(f"{what} must be a torch tensor, a numpy array or a file path, got {type(item).__name__}")


def _check_finite(waveform: Tensor, what: str) -> None:
    if waveform.numel() == 0:
        raise EmptyAudioError(f"{what} is empty (0 samples)")
    if not bool(torch.isfinite(waveform).all()):
        raise InputError(f"{what} contains NaN or Inf samples")


def to_waveforms(audio, sample_rate: int | None, target_rate: int = SAMPLE_RATE) -> tuple[list[Tensor], bool]:
    """Validate any accepted audio input and return ``(waveforms, is_list)``.

    ``audio``: a tensor or array ``[N]`` or ``[B, N]`` (float, in [-1, 1]), a list of 1-D ones of
    different lengths, or a file path. ``sample_rate``: rate of the given samples (None: 16000;
    for a path, the file's own rate is used and must not be contradicted). Each returned waveform
    is float32 ``[N_i]`` at ``target_rate``, on the input's device.
    """
    if sample_rate is not None and (isinstance(sample_rate, bool) or not isinstance(sample_rate, (int, np.integer)) or sample_rate <= 0):
        raise InputError(f"sample_rate must be a positive integer (Hz), got {sample_rate!r}")
    if sample_rate is not None and not RATE_LIMITS[0] <= sample_rate <= RATE_LIMITS[1]:
        raise InputError(f"sample_rate={sample_rate} Hz is outside {RATE_LIMITS[0]}-{RATE_LIMITS[1]} Hz; pass the rate of the samples")
    if isinstance(audio, (str, os.PathLike)):
        waveform, info = load_audio(audio, target_rate=target_rate)
        if sample_rate is not None and sample_rate != info.sample_rate:
            raise InputError(
                f"sample_rate={sample_rate} contradicts the file {str(audio)!r} ({info.sample_rate} Hz); "
                "leave sample_rate unset for files"
            )
        return [torch.from_numpy(waveform)], False

    rate = target_rate if sample_rate is None else int(sample_rate)
    if isinstance(audio, (list, tuple)):
        if not audio:
            raise EmptyAudioError("the audio list is empty")
        items = []
        for index, item in enumerate(audio):
            what = f"audio[{index}]"
            waveform = _as_float_tensor(item, what)
            if waveform.ndim != 1:
                raise InputError(f"{what} must be 1-D [samples], got shape {tuple(waveform.shape)}")
            items.append(waveform)
        is_list = True
    else:
        waveform = _as_float_tensor(audio, "audio")
        if waveform.ndim == 1:
            waveform = waveform[None]
        elif waveform.ndim != 2:
            raise InputError(
                f"audio must be [samples] or [batch, samples], got {waveform.ndim} dimensions "
                f"{tuple(waveform.shape)}; downmix channels first (e.g. audio.mean(dim=1))"
            )
        if waveform.shape[0] == 0:
            raise EmptyAudioError("audio has a batch of 0 items")
        rows, columns = waveform.shape
        if 0 < columns < CHANNELS_LAST_BELOW and rows > columns:
            raise InputError(
                f"audio of shape {(rows, columns)} would be {rows} clips of {columns} samples: is it [samples, "
                "channels], as soundfile.read returns? Downmix it (audio.mean(axis=1)) or pass audio.T for one "
                "clip per channel"
            )
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
    if not np.isfinite(out).all():
        raise InputError(f"{what} has samples too large to resample to {target_rate} Hz (near float32's limit, "
                         "3.4e38); normalise it to [-1, 1]")
    return torch.from_numpy(out).to(waveform.device)


def centre_crop(waveform: np.ndarray, samples: int) -> np.ndarray:
    """The middle ``samples`` of a longer clip (from ``(N - samples) // 2``, as the reference's
    fine-tuning and linear evaluation crop); a shorter clip as it is, not padded."""
    if len(waveform) <= samples:
        return waveform
    start = (len(waveform) - samples) // 2
    return waveform[start : start + samples]
