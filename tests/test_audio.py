"""Decoding real files written with soundfile: formats, rates, channels, lengths, broken files."""

from __future__ import annotations

import numpy as np
import pytest
import soundfile
import soxr
import torch
from conftest import waveform

from atst_features.audio import load_audio
from atst_features.errors import AudioDecodeError, EmptyAudioError

FORMATS = [  # (suffix, soundfile format, subtype, tolerance of the decoded samples)
    (".wav", "WAV", "PCM_U8", 1e-2),
    (".wav", "WAV", "PCM_16", 1e-4),
    (".wav", "WAV", "PCM_24", 1e-6),
    (".wav", "WAV", "PCM_32", 1e-6),
    (".wav", "WAV", "FLOAT", 0),
    (".wav", "WAV", "DOUBLE", 1e-7),
    (".flac", "FLAC", "PCM_16", 1e-4),
    (".flac", "FLAC", "PCM_24", 1e-6),
    (".aiff", "AIFF", "PCM_16", 1e-4),
    (".ogg", "OGG", "VORBIS", None),
    (".mp3", "MP3", "MPEG_LAYER_III", None),
]


def signal(seconds: float, rate: int, channels: int, seed: int = 0) -> np.ndarray:
    """[frames, channels] test audio at ``rate``: the recipe's signal, different per channel."""
    columns = [soxr.resample(waveform(seconds, seed + c), 16000, rate) if rate != 16000 else waveform(seconds, seed + c)
               for c in range(channels)]
    return np.stack(columns, axis=1).astype(np.float32)


@pytest.mark.parametrize("suffix, fmt, subtype, tolerance", FORMATS, ids=[f"{f[1]}-{f[2]}" for f in FORMATS])
def test_formats(tmp_path, suffix, fmt, subtype, tolerance):
    audio = signal(1.5, 16000, 1)
    path = tmp_path / f"clip {subtype} ü{suffix}"
    soundfile.write(path, audio, 16000, format=fmt, subtype=subtype)
    decoded, info = load_audio(path)
    assert decoded.dtype == np.float32 and decoded.ndim == 1
    assert info.sample_rate == 16000 and info.channels == 1 and info.format == fmt
    if tolerance is None:  # lossy: same length (up to codec padding) and strongly correlated
        n = min(len(decoded), len(audio))
        assert abs(len(decoded) - len(audio)) < 1200
        lag = np.argmax(np.correlate(decoded[:4000], audio[:4000, 0], mode="full")) - 3999
        shifted = decoded[lag:] if lag >= 0 else decoded
        n = min(len(shifted), len(audio))
        assert np.corrcoef(shifted[:n], audio[:n, 0])[0, 1] > 0.95
    else:
        assert len(decoded) == len(audio)
        np.testing.assert_allclose(decoded, audio[:, 0], atol=tolerance + 1e-7, rtol=0)


@pytest.mark.parametrize("rate", [8000, 22050, 44100, 48000, 96000])
@pytest.mark.parametrize("channels", [1, 2, 6])
def test_rates_and_channels(tmp_path, rate, channels):
    audio = signal(0.8, rate, channels, seed=3)
    path = tmp_path / f"x_{rate}_{channels}.flac"
    soundfile.write(path, audio, rate, subtype="PCM_24")
    decoded, info = load_audio(path, target_rate=16000)
    assert (info.sample_rate, info.channels, info.frames) == (rate, channels, len(audio))
    expected = soxr.resample(audio.mean(axis=1), rate, 16000, quality="HQ")
    assert len(decoded) == len(expected) == round(len(audio) * 16000 / rate)
    np.testing.assert_allclose(decoded, expected, atol=2e-6, rtol=0)


def test_native_rate_is_kept(tmp_path):
    path = tmp_path / "a.wav"
    soundfile.write(path, signal(0.5, 44100, 2), 44100)
    decoded, info = load_audio(path, target_rate=None)
    assert len(decoded) == 22050 and info.duration == pytest.approx(0.5)


@pytest.mark.parametrize("seconds", [0.05, 0.5, 200.0])
def test_lengths(tmp_path, seconds):
    rate = 48000
    n = int(seconds * rate)
    rng = np.random.default_rng(1)
    audio = (0.1 * rng.standard_normal((n, 2))).astype(np.float32)
    path = tmp_path / "long.wav"
    soundfile.write(path, audio, rate, subtype="FLOAT")
    decoded, info = load_audio(path)
    assert info.frames == n
    assert len(decoded) == round(n / 3)
    if seconds <= 1:
        np.testing.assert_allclose(decoded, soxr.resample(audio.mean(1), rate, 16000, "HQ"), atol=2e-6, rtol=0)


def test_long_file_reads_in_blocks(tmp_path, monkeypatch):
    """Block-wise decoding and streaming resampling give what decoding the whole file gives."""
    import atst_features.audio as audio_module

    audio = signal(3.0, 44100, 2, seed=5)
    path = tmp_path / "blocks.wav"
    soundfile.write(path, audio, 44100, subtype="FLOAT")
    whole, _ = load_audio(path)
    monkeypatch.setattr(audio_module, "BLOCK_SAMPLES", 2000)  # 1000 frames of 2 channels
    monkeypatch.setattr(audio_module, "INITIAL_SAMPLES", 5000)  # and a buffer that has to grow
    blocked, _ = load_audio(path)
    np.testing.assert_allclose(blocked, whole, atol=1e-6, rtol=0)


# ------------------------------------------------------------------ broken inputs
def broken(tmp_path, kind: str):
    if kind == "zero-byte file":
        path = tmp_path / "empty.wav"
        path.write_bytes(b"")
    elif kind == "header-only WAV":
        path = tmp_path / "header.wav"
        soundfile.write(path, np.zeros(0, np.float32), 16000)
    elif kind == "truncated FLAC":
        full = tmp_path / "full.flac"
        soundfile.write(full, signal(3.0, 16000, 1), 16000)
        path = tmp_path / "cut.flac"
        path.write_bytes(full.read_bytes()[: full.stat().st_size // 2])
    elif kind == "truncated MP3":
        full = tmp_path / "full.mp3"
        soundfile.write(full, signal(3.0, 16000, 1), 16000)
        path = tmp_path / "cut.mp3"
        path.write_bytes(full.read_bytes()[: full.stat().st_size // 2])
    elif kind == "text file named .wav":
        path = tmp_path / "notes.wav"
        path.write_text("this is not audio\n")
    elif kind == "directory named x.wav":
        path = tmp_path / "x.wav"
        path.mkdir()
    elif kind == "missing file":
        path = tmp_path / "gone.wav"
    return path


BROKEN = [
    ("zero-byte file", AudioDecodeError, r"empty\.wav'?: cannot decode \(Format not recognised\); convert it"),
    ("header-only WAV", EmptyAudioError, r"header\.wav'?: the file holds no audio samples"),
    ("truncated FLAC", AudioDecodeError, r"cut\.flac'?: cannot decode \(.+\); convert it"),
    ("truncated MP3", AudioDecodeError, r"cut\.mp3'?: truncated or corrupt \(the header promises"),
    ("text file named .wav", AudioDecodeError, r"notes\.wav'?: cannot decode \(Format not recognised\)"),
    ("directory named x.wav", AudioDecodeError, r"x\.wav'?: is a directory, not an audio file"),
    ("missing file", AudioDecodeError, r"gone\.wav'?: no such file"),
]


@pytest.mark.filterwarnings("ignore")
@pytest.mark.parametrize("kind, error, message", BROKEN, ids=[b[0] for b in BROKEN])
def test_broken_files(tmp_path, kind, error, message):
    path = broken(tmp_path, kind)
    with pytest.raises(error, match=message) as info:
        load_audio(path)
    assert "\n" not in str(info.value)


def test_unicode_and_spaces(tmp_path):
    path = tmp_path / "dossier été" / "chanson n°1 — 東京.ogg"
    path.parent.mkdir()
    soundfile.write(path, signal(1.0, 22050, 2), 22050)
    decoded, info = load_audio(path)
    assert info.channels == 2 and abs(len(decoded) - 16000) < 100


# ------------------------------------------------------------------ resampled input embeds like 16 kHz
@pytest.mark.slow
@pytest.mark.parametrize("rate, floor", [(22050, 0.9999), (44100, 0.9999), (48000, 0.9999), (96000, 0.9999), (8000, 0.999)])
def test_resampled_files_embed_like_16k(frame_small, tmp_path, rate, floor):
    """The same audio stored at another rate embeds (almost) as at 16 kHz. At 8 kHz everything above
    4 kHz is gone, so it is compared with the 16 kHz audio band-limited the same way."""
    at_16k = waveform(4.0, 51)
    if rate == 8000:
        at_16k = soxr.resample(soxr.resample(at_16k, 16000, 8000, "HQ"), 8000, 16000, "HQ")
    path = tmp_path / f"a{rate}.wav"
    soundfile.write(path, soxr.resample(waveform(4.0, 51), 16000, rate, "HQ"), rate, subtype="FLOAT")
    from_file = frame_small.get_clip_embedding(path, n_blocks=12)
    reference = frame_small.get_clip_embedding(at_16k, n_blocks=12)
    cosine = torch.nn.functional.cosine_similarity(from_file, reference).item()
    print(f"{rate} Hz: cosine {cosine:.6f}")
    assert cosine > floor, cosine


def test_offset_and_duration(tmp_path):
    audio = signal(3.0, 44100, 2, seed=7)
    path = tmp_path / "seg.flac"
    soundfile.write(path, audio, 44100, subtype="PCM_24")
    whole, _ = load_audio(path)
    part, info = load_audio(path, offset=1.0, duration=0.5)
    assert info.frames == 22050 and len(part) == 8000
    # the segment equals the same stretch of the whole file, away from the resampler's edges
    np.testing.assert_allclose(part[200:-200], whole[16200:23800], atol=1e-3, rtol=0)
    tail, _ = load_audio(path, offset=2.75)
    assert len(tail) == 4000
    with pytest.raises(EmptyAudioError, match="no samples from 5.0 s on"):
        load_audio(path, offset=5.0)


# ------------------------------------------------------------------ hostile headers
def flac_with_total_samples(tmp_path, total: int):
    """A 1 s FLAC whose STREAMINFO declares ``total`` samples (36-bit field; 0 means unknown)."""
    path = tmp_path / f"total-{total}.flac"
    soundfile.write(path, signal(1.0, 16000, 1), 16000, format="FLAC")
    data = bytearray(path.read_bytes())
    assert data[:4] == b"fLaC" and data[4] & 0x7F == 0  # STREAMINFO first; its fields start at byte 8
    data[21] = (data[21] & 0xF0) | ((total >> 32) & 0x0F)  # total samples: bits 108..143 of STREAMINFO
    data[22:26] = (total & 0xFFFFFFFF).to_bytes(4, "big")
    path.write_bytes(bytes(data))
    return path


def test_a_header_declaring_billions_of_samples_allocates_nothing_of_it(tmp_path):
    import tracemalloc

    path = flac_with_total_samples(tmp_path, 2**36 - 1)  # 68.7 G samples: 275 GB of float32
    assert soundfile.info(str(path)).frames == 2**36 - 1
    tracemalloc.start()
    try:
        with pytest.raises(AudioDecodeError, match=r"total-68719476735.flac': (cannot decode|truncated or corrupt)"):
            load_audio(path)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 64 * 2**20


def test_a_flac_of_unknown_length_fails_in_one_line(tmp_path):
    # Spec-valid (0 = unknown), but libsndfile reports 2**63 - 1 frames and stops with a seek error
    # after 12 288 of the 16 000 samples: a clear error naming the file, nothing allocated from it.
    path = flac_with_total_samples(tmp_path, 0)
    with pytest.raises(AudioDecodeError, match=r"total-0.flac': cannot decode .*; convert it to WAV"):
        load_audio(path)


@pytest.mark.parametrize("rate", [1, 999, 800_000])
def test_declared_rates_outside_the_limits_are_refused(tmp_path, rate):
    path = tmp_path / "odd.wav"
    soundfile.write(path, np.zeros(32, dtype=np.float32), rate)
    with pytest.raises(AudioDecodeError, match=f"odd.wav.*declares {rate} Hz, outside 1000-768000 Hz"):
        load_audio(path)
    from atst_features.audio import to_waveforms

    with pytest.raises(ValueError, match=f"sample_rate={rate} Hz is outside"):
        to_waveforms(np.zeros(32, dtype=np.float32), rate)


def test_non_finite_samples_in_a_file_are_refused(tmp_path):
    path = tmp_path / "nan.wav"
    audio = signal(0.5, 16000, 1)
    audio[100] = np.nan
    soundfile.write(path, audio, 16000, subtype="FLOAT")
    with pytest.raises(AudioDecodeError, match="nan.wav.*NaN or Inf"):
        load_audio(path)


def test_one_sample_at_44k_is_reported_as_too_short_not_empty(tmp_path):
    path = tmp_path / "one.wav"
    soundfile.write(path, np.full(1, 0.1, dtype=np.float32), 44100)
    with pytest.raises(EmptyAudioError, match="1 sample.*at 44100 Hz make less than one sample at 16000 Hz"):
        load_audio(path)


def test_a_binary_manifest_is_a_usage_error(tmp_path):
    from click.testing import CliRunner

    from atst_features.cli.embed import embed

    manifest = tmp_path / "list.txt"
    manifest.write_bytes(b"\xff\xfe\x00\x01binary\x80\x81")
    result = CliRunner().invoke(embed, ["--manifest", str(manifest)])
    assert result.exit_code == 2 and "not a text manifest (not UTF-8)" in result.output and "Traceback" not in result.output
