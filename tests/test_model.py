"""ATSTModel behaviour: inputs, batching, long and short audio, sizes, errors."""

from __future__ import annotations

import numpy as np
import pytest
import soundfile
import torch
from conftest import waveform

import atst_features
from atst_features import EmptyAudioError, get_clip_embedding, get_frame_embeddings

MODELS = ["frame_small", "clip_small", "frame_prompt"]


@pytest.fixture(params=MODELS)
def model(request):
    return request.getfixturevalue(request.param)


def test_public_api():
    for name in ["load_model", "get_clip_embedding", "get_frame_embeddings", "__version__"]:
        assert hasattr(atst_features, name)


@pytest.mark.slow
def test_list_of_lengths_equals_one_by_one(model):
    lengths = [0.7, 3.3, 10.0, 12.5, 0.03]
    items = [waveform(seconds, seed) for seed, seconds in enumerate(lengths)]
    frames, stamps = model.get_frame_embeddings(items, n_blocks=2)
    clips = model.get_clip_embedding(items, n_blocks=2)
    assert isinstance(frames, list) and len(frames) == len(items)
    assert clips.shape == (len(items), model.clip_embedding_size(2))
    for index, item in enumerate(items):
        alone, alone_stamps = model.get_frame_embeddings(item, n_blocks=2)
        torch.testing.assert_close(frames[index], alone[0], rtol=0, atol=1e-5)
        torch.testing.assert_close(stamps[index], alone_stamps[0], rtol=0, atol=0)
        assert_clip_close(model, clips[index], model.get_clip_embedding(item, n_blocks=2)[0])


def assert_clip_close(model, actual, desired):
    """Normalised parts within 1e-5. The raw prompt-token means of a prompt model are not normalised
    (about 13 in magnitude here), so padding's float reordering shows at 1e-5 absolute; they must
    agree to 1e-6 of their scale (a few float32 ulps)."""
    if not model.config.encoder.n_prompts:
        torch.testing.assert_close(actual, desired, rtol=0, atol=1e-5)
        return
    actual, desired = actual.view(-1, 2, model.embed_dim), desired.view(-1, 2, model.embed_dim)
    torch.testing.assert_close(actual[:, 0], desired[:, 0], rtol=0, atol=1e-5)
    scale = desired[:, 1].abs().max().item()
    assert (actual[:, 1] - desired[:, 1]).abs().max().item() <= 1e-6 * scale


@pytest.mark.slow
def test_batch_size_does_not_change_results(frame_small):
    items = [waveform(seconds, seed) for seed, seconds in enumerate([21.0, 4.0, 9.99])]
    big = frame_small.get_frame_embeddings(items, n_blocks=1)[0]
    small = frame_small.get_frame_embeddings(items, n_blocks=1, batch_size=1)[0]
    for a, b in zip(big, small):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-5)


def test_25_seconds_gives_625_centred_frames(frame_small):
    emb, timestamps = frame_small.get_frame_embeddings(waveform(25.0, 3), n_blocks=1)
    assert emb.shape == (1, 625, 384)
    assert timestamps.shape == (1, 625)
    assert timestamps[0, :3].tolist() == [15.0, 55.0, 95.0]
    assert timestamps[0, -1].item() == 24_975.0
    assert torch.all(timestamps[0].diff() == 40.0)


def test_30_ms_input_is_padded_to_one_token(model):
    audio = waveform(0.03, 1)
    assert audio.shape == (480,)
    emb, timestamps = model.get_frame_embeddings(audio, n_blocks=1)
    assert emb.shape == (1, 1, model.embed_dim)
    assert timestamps.tolist() == [[15.0]]
    assert torch.isfinite(model.get_clip_embedding(audio)).all()


def test_one_sample_input_works(frame_small):
    emb, _ = frame_small.get_frame_embeddings(np.array([0.5], dtype=np.float32))
    assert emb.shape[1] == 1 and torch.isfinite(emb).all()


@pytest.mark.slow
def test_silence_gives_no_nan(model):
    silence = np.zeros((2, 16_000 * 3), dtype=np.float32)
    emb, timestamps = model.get_frame_embeddings(silence)
    assert torch.isfinite(emb).all() and torch.isfinite(timestamps).all()
    assert torch.isfinite(model.get_clip_embedding(silence)).all()
    assert torch.isfinite(model.get_clip_embedding([np.zeros(100, np.float32), np.zeros(200_000, np.float32)])).all()


@pytest.mark.parametrize("n_blocks", [1, 4, 12])
def test_declared_sizes_are_true(model, n_blocks):
    audio = waveform(1.0, 2)
    emb, _ = model.get_frame_embeddings(audio, n_blocks=n_blocks)
    assert emb.shape[-1] == model.frame_embedding_size(n_blocks) == n_blocks * model.embed_dim
    assert model.get_clip_embedding(audio, n_blocks=n_blocks).shape[-1] == model.clip_embedding_size(n_blocks)
    assert model.frame_hop_ms == 40


def test_sizes_per_kind(frame_small, clip_small, frame_prompt):
    assert frame_small.clip_embedding_size(12) == 12 * 384
    assert clip_small.clip_embedding_size(12) == 2 * 12 * 384
    assert frame_prompt.clip_embedding_size(1) == 2 * 384


@pytest.mark.slow
def test_functions_equal_methods(frame_small):
    audio = waveform(1.5, 4)
    emb, stamps = get_frame_embeddings(audio, frame_small, n_blocks=3)
    same, same_stamps = frame_small.get_frame_embeddings(audio, n_blocks=3)
    assert torch.equal(emb, same) and torch.equal(stamps, same_stamps)
    assert torch.equal(get_clip_embedding(audio, frame_small), frame_small.get_clip_embedding(audio))


@pytest.mark.slow
def test_tensor_array_and_dtypes_agree(frame_small):
    audio = waveform(1.0, 5)
    from_numpy = frame_small.get_clip_embedding(audio)
    from_tensor = frame_small.get_clip_embedding(torch.from_numpy(audio))
    from_float64 = frame_small.get_clip_embedding(audio.astype(np.float64))
    from_batch = frame_small.get_clip_embedding(audio[None])
    assert from_numpy.shape == (1, 4608)
    for other in (from_tensor, from_float64, from_batch):
        torch.testing.assert_close(other, from_numpy, rtol=0, atol=1e-6)
    assert from_numpy.dtype == torch.float32 and from_numpy.device == frame_small.device


def test_other_sample_rates_are_resampled(frame_small):
    import soxr

    audio = waveform(3.0, 6)
    at_48k = soxr.resample(audio, 16000, 48000, quality="HQ")
    ref = frame_small.get_clip_embedding(audio, n_blocks=1)
    resampled = frame_small.get_clip_embedding(at_48k, sample_rate=48000, n_blocks=1)
    cosine = torch.nn.functional.cosine_similarity(ref, resampled).item()
    assert cosine > 0.999, cosine


def test_file_path_input(frame_small, tmp_path):
    stereo = np.stack([waveform(2.0, 7), waveform(2.0, 8)], axis=1)
    path = tmp_path / "stereo 44k ünï.wav"
    import soxr

    soundfile.write(path, soxr.resample(stereo, 16000, 44100), 44100, subtype="FLOAT")
    from_file = frame_small.get_clip_embedding(path)
    from_array = frame_small.get_clip_embedding(stereo.mean(axis=1))
    cosine = torch.nn.functional.cosine_similarity(from_file, from_array).item()
    assert cosine > 0.999, cosine
    same_rate = tmp_path / "mono.wav"
    soundfile.write(same_rate, stereo.mean(axis=1), 16000, subtype="FLOAT")
    torch.testing.assert_close(frame_small.get_clip_embedding(str(same_rate)), from_array, rtol=0, atol=1e-5)
    with pytest.raises(ValueError, match="contradicts the file"):
        frame_small.get_clip_embedding(same_rate, sample_rate=8000)


def test_bad_file_raises_decode_error(frame_small, tmp_path):
    bad = tmp_path / "notes.wav"
    bad.write_text("not audio")
    with pytest.raises(atst_features.AudioDecodeError, match="notes.wav"):
        frame_small.get_clip_embedding(bad)


@pytest.mark.parametrize(
    "audio, kwargs, message",
    [
        (np.zeros(0, np.float32), {}, "empty"),
        (np.zeros((0, 100), np.float32), {}, "batch of 0"),
        ([], {}, "list is empty"),
        (np.array([0.0, np.nan, 0.1], np.float32), {}, "NaN or Inf"),
        ([np.zeros(10, np.float32), np.array([np.inf], np.float32)], {}, r"audio\[1\] contains NaN or Inf"),
        (np.zeros((1, 2, 100), np.float32), {}, "3 dimensions"),
        (np.zeros((16000, 2), np.float32), {}, r"shape \(16000, 2\) would be 16000 clips of 2 samples: is it \[samples, channels\]"),
        (torch.zeros(48000, 1), {"sample_rate": 48000}, r"48000 clips of 1 samples: .*\(audio.mean\(axis=1\)\)"),
        (np.zeros(100, np.int16), {}, "dtype int16"),
        (torch.zeros(100, dtype=torch.int32), {}, "torch.int32"),
        (np.zeros(100, np.complex64), {}, "complex"),
        (torch.zeros(100, dtype=torch.complex64), {}, "complex"),
        ([np.zeros((2, 10), np.float32)], {}, r"audio\[0\] must be 1-D"),
        (np.zeros(100, np.float32), {"sample_rate": 0}, "sample_rate must be a positive integer"),
        (np.zeros(100, np.float32), {"sample_rate": -16000}, "sample_rate must be a positive integer"),
        (np.zeros(100, np.float32), {"sample_rate": 16000.5}, "sample_rate must be a positive integer"),
        (np.zeros(100, np.float32), {"n_blocks": 0}, r"n_blocks must be an integer in 1..12"),
        (np.zeros(100, np.float32), {"n_blocks": 13}, r"n_blocks must be an integer in 1..12"),
        (np.zeros(100, np.float32), {"batch_size": 0}, "batch_size must be a positive integer"),
    ],
)
def test_bad_input_raises_value_error(frame_small, audio, kwargs, message):
    for method in (frame_small.get_frame_embeddings, frame_small.get_clip_embedding):
        with pytest.raises(ValueError, match=message):
            method(audio, **kwargs)


def test_empty_audio_error_is_a_value_error(frame_small):
    with pytest.raises(EmptyAudioError):
        frame_small.get_clip_embedding(np.zeros(0, np.float32))


def test_too_short_to_resample_is_named(frame_small):
    with pytest.raises(EmptyAudioError, match="less than one sample at 16000 Hz"):
        frame_small.get_clip_embedding(np.zeros(1, np.float32), sample_rate=48000)


def test_training_mode_is_restored_and_not_used(frame_small):
    audio = waveform(2.0, 9)
    reference = frame_small.get_clip_embedding(audio)
    frame_small.train()
    try:
        again = frame_small.get_clip_embedding(audio)  # DropPath would make this random
        assert frame_small.training
    finally:
        frame_small.eval()
    torch.testing.assert_close(again, reference, rtol=0, atol=0)


def test_no_gradients(frame_small):
    audio = torch.from_numpy(waveform(1.0, 10)).requires_grad_()
    emb = frame_small.get_clip_embedding(audio)
    assert not emb.requires_grad


def test_bfloat16_model(frame_small_ckpt):
    model = atst_features.load_model(frame_small_ckpt, device="cpu", dtype=torch.bfloat16)
    reference = atst_features.load_model(frame_small_ckpt, device="cpu")
    audio = waveform(2.0, 11)
    emb = model.get_clip_embedding(audio, n_blocks=1)
    assert emb.dtype == torch.bfloat16
    ref = reference.get_clip_embedding(audio, n_blocks=1)
    assert torch.nn.functional.cosine_similarity(emb.float(), ref).item() > 0.99


def test_model_stays_where_it_is(frame_small):
    before = {name: p.data_ptr() for name, p in frame_small.named_parameters()}
    frame_small.get_frame_embeddings(torch.from_numpy(waveform(1.0, 12)).double())
    assert {name: p.data_ptr() for name, p in frame_small.named_parameters()} == before


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_matches_cpu(frame_small_ckpt):
    cpu = atst_features.load_model(frame_small_ckpt, device="cpu")
    gpu = atst_features.load_model(frame_small_ckpt, device="cuda")
    audio = waveform(12.0, 13)
    emb, stamps = gpu.get_frame_embeddings(audio)
    assert emb.device.type == "cuda" and stamps.device.type == "cuda"
    ref, _ = cpu.get_frame_embeddings(audio)
    torch.testing.assert_close(emb.cpu(), ref, rtol=0, atol=1e-3)


@pytest.mark.slow
def test_iter_frame_embeddings_equals_get_frame_embeddings(frame_small):
    audio = waveform(31.0, 14)
    whole, stamps = frame_small.get_frame_embeddings(audio, n_blocks=2)
    stream = frame_small.iter_frame_embeddings(audio, n_blocks=2, batch_size=2)
    pieces = [next(stream)]
    assert not torch.is_inference_mode_enabled()  # not leaked to the caller between pieces
    pieces += list(stream)
    assert [first for first, _, _ in pieces] == [0, 500]  # one piece per batch of 2 windows
    torch.testing.assert_close(torch.cat([p for _, p, _ in pieces]), whole[0], rtol=0, atol=1e-5)
    torch.testing.assert_close(torch.cat([t for _, _, t in pieces]), stamps[0], rtol=0, atol=0)
    with pytest.raises(ValueError, match="takes one clip"):
        next(frame_small.iter_frame_embeddings([audio, audio]))


@pytest.mark.slow
def test_core_imports_no_training_stack():
    """The inference package (API, CLI, HEAR) never imports training, Lightning, torchaudio or TensorFlow."""
    import subprocess
    import sys

    code = (
        "import sys, atst_features, atst_features.cli.embed, atst_features.cli.tag, atst_features.cli.detect, "
        "atst_features.cli.tools, atst_features.hear; "
        "bad = [m for m in ('atst_features.training', 'lightning', 'pytorch_lightning', 'torchaudio', 'tensorflow') "
        "if m in sys.modules]; print(bad)"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"


@pytest.mark.parametrize("samples", [1, 480, 513, 17_120, 31_680, 400_000])
def test_num_frame_embeddings_is_what_is_produced(frame_small, samples):
    emb, _ = frame_small.get_frame_embeddings(np.zeros(samples, np.float32) + 0.01, n_blocks=1)
    assert emb.shape[1] == frame_small.num_frame_embeddings(samples)


@pytest.mark.slow
@pytest.mark.parametrize("as_list", [False, True])
def test_get_embeddings_equals_the_separate_calls(model, as_list):
    audio = [waveform(3.3, 20), waveform(12.5, 21)] if as_list else np.stack([waveform(12.5, 20), waveform(12.5, 21)])
    clip, frames, stamps = model.get_embeddings(audio, n_blocks=2)
    frames_alone, stamps_alone = model.get_frame_embeddings(audio, n_blocks=2)
    assert torch.equal(clip, model.get_clip_embedding(audio, n_blocks=2))  # same windows, same sums
    for a, b in zip(frames, frames_alone):
        assert torch.equal(a, b)
    for a, b in zip(stamps, stamps_alone):
        assert torch.equal(a, b)


@pytest.mark.slow
def test_the_gpu_frame_writing_path_gives_the_same_frames(frame_small, monkeypatch):
    """GPUs write a batch's frames with one gather per block (model._gathers_frames); run that path
    on the CPU and compare it with the per-window copies, for a batch, a list and a stream."""
    import atst_features.model as model_module

    clips = [waveform(seconds, 20 + i) for i, seconds in enumerate([23.0, 1.3, 10.0, 4.2])]
    batch = np.stack([waveform(12.5, 30), waveform(12.5, 31)])
    copied = (frame_small.get_frame_embeddings(batch, n_blocks=3, batch_size=3)[0],
              frame_small.get_frame_embeddings(clips, n_blocks=3, batch_size=3)[0],
              list(frame_small.iter_frame_embeddings(clips[0], n_blocks=2, batch_size=2)))
    monkeypatch.setattr(model_module, "_gathers_frames", lambda device: True)
    gathered = (frame_small.get_frame_embeddings(batch, n_blocks=3, batch_size=3)[0],
                frame_small.get_frame_embeddings(clips, n_blocks=3, batch_size=3)[0],
                list(frame_small.iter_frame_embeddings(clips[0], n_blocks=2, batch_size=2)))
    torch.testing.assert_close(gathered[0], copied[0], rtol=0, atol=0)
    assert [f.shape[0] for f in gathered[1]] == [575, 32, 250, 105]
    for mine, theirs in zip(gathered[1], copied[1]):
        torch.testing.assert_close(mine, theirs, rtol=0, atol=0)
    # List items own their storage (torch.save of one item writes that item only).
    assert len({f.untyped_storage().data_ptr() for f in gathered[1]}) == 4
    assert [first for first, _, _ in gathered[2]] == [first for first, _, _ in copied[2]] == [0, 500]
    for (_, mine, stamps), (_, theirs, their_stamps) in zip(gathered[2], copied[2]):
        torch.testing.assert_close(mine, theirs, rtol=0, atol=0)
        torch.testing.assert_close(stamps, their_stamps, rtol=0, atol=0)
