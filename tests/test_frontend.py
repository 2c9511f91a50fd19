"""The torch-only front end equals the reference's torchaudio chain, batched and per item."""

from __future__ import annotations

import sys

import numpy as np
import pytest
import torch
from conftest import waveform

from atst_features.frontend import FrontendConfig, LogMelFrontend


def torchaudio_reference(audio: torch.Tensor) -> torch.Tensor:
    """The official chain: MelSpectrogram -> AmplitudeToDB(top_db=80) -> MinMax, one item at a time
    as ``[1, N]`` (the rank the reference's transforms see), so the dB floor is per item."""
    torchaudio = pytest.importorskip("torchaudio")
    mel = torchaudio.transforms.MelSpectrogram(
        16000, f_min=60, f_max=7800, hop_length=160, win_length=1024, n_fft=1024, n_mels=64
    )
    to_db = torchaudio.transforms.AmplitudeToDB(stype="power", top_db=80)
    out = [(to_db(mel(item[None])) - -79.6482) / (50.6842 - -79.6482) * 2.0 - 1.0 for item in audio]
    return torch.cat(out)


@pytest.fixture(scope="module")
def frontend():
    return LogMelFrontend()


def test_no_torchaudio_in_the_library():
    import atst_features  # noqa: F401
    import atst_features.model  # noqa: F401

    src = [m for m in sys.modules if m.startswith("atst_features")]
    for name in src:
        module = sys.modules[name]
        text = open(module.__file__, encoding="utf-8").read() if getattr(module, "__file__", None) else ""
        assert "import torchaudio" not in text, name


@pytest.mark.parametrize(
    "name, audio",
    [
        ("batch of speech-like", torch.from_numpy(np.stack([waveform(2.0, s) for s in range(4)]))),
        ("odd length", torch.from_numpy(waveform(1.2345, 7))[None]),
        ("513 samples", torch.from_numpy(waveform(0.05, 8)[:513])[None]),
        ("silence", torch.zeros(2, 16000)),
        ("full-scale noise", torch.rand(2, 24_001, generator=torch.Generator().manual_seed(0)) * 2 - 1),
        ("square wave at full scale", torch.sign(torch.sin(torch.arange(20_000) * 0.05))[None]),
    ],
)
def test_equals_torchaudio(frontend, name, audio):
    ours, n_frames = frontend(audio)
    ref = torchaudio_reference(audio)
    assert ours.shape == ref.shape, name
    assert n_frames.tolist() == [1 + audio.shape[1] // 160] * audio.shape[0]
    torch.testing.assert_close(ours, ref, rtol=0, atol=1e-5)


def test_floor_is_per_item(frontend):
    """A loud item must not raise the 80 dB floor of a quiet one in the same batch."""
    quiet = torch.from_numpy(waveform(1.0, 1)) * 1e-4
    loud = torch.from_numpy(waveform(1.0, 2))
    together, _ = frontend(torch.stack([quiet, loud]))
    alone, _ = frontend(quiet[None])
    torch.testing.assert_close(together[:1], alone, rtol=0, atol=1e-6)


def test_padded_batch_equals_items(frontend):
    lengths = [16_000, 9_999, 513, 24_321]
    items = [torch.from_numpy(waveform(n / 16000, i)) for i, n in enumerate(lengths)]
    padded = torch.nn.utils.rnn.pad_sequence(items, batch_first=True)
    batched, n_frames = frontend(padded, torch.tensor(lengths))
    assert n_frames.tolist() == [1 + n // 160 for n in lengths]
    for row, item in enumerate(items):
        alone, _ = frontend(item[None])
        valid = int(n_frames[row])
        torch.testing.assert_close(batched[row, :, :valid], alone[0], rtol=0, atol=1e-5)
        # Frames past an item's end hold what digital silence becomes in that item.
        tail = batched[row, :, valid:]
        if tail.numel():
            assert torch.all(tail == alone.min())


def test_silence_has_no_nan(frontend):
    out, _ = frontend(torch.zeros(1, 8000))
    assert torch.isfinite(out).all()
    # An all-zero input sits at -100 dB -> MinMax(-100) = -1.3123 everywhere.
    torch.testing.assert_close(out, torch.full_like(out, -1.3123), rtol=0, atol=1e-4)


def test_too_short_input_is_refused(frontend):
    with pytest.raises(ValueError, match="at least 513 samples"):
        frontend(torch.zeros(1, 512))


def test_float32_whatever_the_module_dtype():
    frontend = LogMelFrontend().to(torch.bfloat16)
    audio = torch.from_numpy(waveform(1.0, 3))[None]
    out, _ = frontend(audio)
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, LogMelFrontend()(audio)[0], rtol=0, atol=0)


def test_long_input_is_computed_in_blocks():
    """Inputs longer than one STFT block give the same spectrogram as a single pass."""
    audio = torch.from_numpy(waveform(3.0, 4))[None]
    blocked = LogMelFrontend()
    blocked.frames_per_block = 37
    torch.testing.assert_close(blocked(audio)[0], LogMelFrontend()(audio)[0], rtol=0, atol=1e-6)


def test_mel_filterbank_matches_torchaudio():
    torchaudio = pytest.importorskip("torchaudio")
    from atst_features.frontend import mel_filterbank

    ref = torchaudio.functional.melscale_fbanks(513, 60.0, 7800.0, 64, 16000, norm=None, mel_scale="htk")
    # torchaudio builds the filters in float32, we in float64: weights in [0, 1] agree to float32 rounding.
    torch.testing.assert_close(mel_filterbank(FrontendConfig()), ref, rtol=0, atol=1e-5)


@pytest.mark.parametrize("samples", [513, 1000, 1024, 1025, 160_000, 960_000, 960_037, 960_511, 1_920_005])
def test_unpadded_batches_take_the_slice_path_with_the_same_result(samples):
    """Batches whose items all fill the tensor are sliced and mirrored at the edges only; the
    per-item gather path (used when items are padded) gives the same spectrogram, bit for bit."""
    frontend = LogMelFrontend()
    waves = torch.randn(2, samples, generator=torch.Generator().manual_seed(samples)) * 0.1
    fast, _ = frontend(waves)
    padded = torch.nn.functional.pad(waves, (0, 1))  # one padded column forces the gather path
    general, _ = frontend(padded, torch.tensor([samples, samples]))
    assert torch.equal(fast, general[:, :, : fast.shape[2]])


def test_loud_audio_goes_through_a_gain_with_the_same_spectrogram(frontend, monkeypatch):
    """Beyond loud_samples an item is divided by its peak and its dB shifted back: the spectrogram is
    the one plain arithmetic gives while it does not overflow, within float32 rounding."""
    audio = torch.from_numpy(waveform(2.0)) * 1e8
    through_gain, _ = frontend(audio[None])
    monkeypatch.setattr(LogMelFrontend, "loud_samples", float("inf"))
    plain, _ = frontend(audio[None])
    assert torch.isfinite(plain).all() and (through_gain - plain).abs().max() < 1e-5


@pytest.mark.parametrize("peak", [1e20, 3.0e38])
def test_any_finite_audio_gives_a_finite_spectrogram(frontend, peak):
    """float32 powers overflow from peaks of about 1e16: before the gain, 1e20 gave NaN embeddings."""
    quiet = torch.from_numpy(waveform(1.0, seed=1))
    loud = torch.from_numpy(waveform(1.5))
    loud = loud / loud.abs().max() * peak
    mel, _ = frontend(torch.nn.utils.rnn.pad_sequence([loud, quiet], batch_first=True), torch.tensor([len(loud), len(quiet)]))
    assert torch.isfinite(mel).all()
    assert torch.equal(mel[1, :, :101], frontend(quiet[None])[0][0])  # the quiet item of the batch is untouched
    assert torch.equal(mel[0], frontend(loud[None])[0][0])
