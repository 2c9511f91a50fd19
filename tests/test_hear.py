"""The HEAR API: our own implementation of the hear-validator checks, and more."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from atst_features import hear

LENGTHS = [1.07, 1.98, 2.74, 4.0]  # the validator's lengths (s)


CHECKPOINTS = {"frame": "frame_small_ckpt", "clip": "clip_small_ckpt", "frame_prompt": "frame_prompt_ckpt"}


@pytest.fixture(scope="module", params=list(CHECKPOINTS))
def hear_model(request):
    return hear.load_model(str(request.getfixturevalue(CHECKPOINTS[request.param])))


@pytest.fixture(scope="module", params=["frame", "clip"])
def frame_or_clip(request):
    return hear.load_model(str(request.getfixturevalue(CHECKPOINTS[request.param])))


def noise(batch: int, seconds: float, seed: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.rand(batch, int(seconds * 16000), generator=generator) * 2 - 1


def test_model_attributes(hear_model):
    assert hear_model.sample_rate == 16000
    for name in ("scene_embedding_size", "timestamp_embedding_size"):
        assert type(getattr(hear_model, name)) is int  # the HEAR API wants plain ints, not numpy or float
    kind, prompts = hear_model.model.kind, hear_model.model.config.encoder.n_prompts
    expected_scene = 2 * 12 * 384 if kind == "clip" or prompts else 12 * 384  # the paper's 12-block setting
    assert hear_model.scene_embedding_size == expected_scene
    assert hear_model.timestamp_embedding_size == 12 * 384


@pytest.mark.slow
@pytest.mark.parametrize("batch", range(1, 17))
def test_validator_checks_over_batch_sizes(frame_or_clip, batch):
    seconds = LENGTHS[batch % len(LENGTHS)]
    check_timestamp_embeddings(frame_or_clip, noise(batch, seconds, batch), seconds)
    check_scene_embeddings(frame_or_clip, noise(batch, seconds, batch))


@pytest.mark.parametrize("seconds", LENGTHS)
def test_validator_checks_over_lengths(hear_model, seconds):
    check_timestamp_embeddings(hear_model, noise(2, seconds), seconds)
    check_scene_embeddings(hear_model, noise(4, seconds))


def check_timestamp_embeddings(model, audio: torch.Tensor, seconds: float) -> None:
    embeddings, timestamps = hear.get_timestamp_embeddings(audio, model)
    assert embeddings.dtype == torch.float32 and timestamps.dtype == torch.float32
    assert embeddings.ndim == 3 and timestamps.ndim == 2
    assert embeddings.shape[0] == audio.shape[0]
    assert embeddings.shape[:2] == timestamps.shape
    assert embeddings.shape[2] == model.timestamp_embedding_size
    assert embeddings.device == audio.device and timestamps.device == audio.device
    stamps = timestamps.numpy()
    assert (stamps == stamps[:1]).all()  # the same for every sound of the batch
    differences = np.diff(stamps, axis=1)
    assert np.abs(differences - differences.mean()).max() <= 1.0  # regular spacing, within 1 ms
    assert differences.mean() == pytest.approx(40.0)
    assert stamps.min() == 15.0  # centre of the first token: frames 0-3 at 0, 10, 20, 30 ms
    assert stamps.max() <= 1000 * seconds  # none beyond the end
    assert stamps.max() >= 1000 * seconds - 40 - 15  # and no missing tail beyond one token
    assert torch.isfinite(embeddings).all()


def check_scene_embeddings(model, audio: torch.Tensor) -> None:
    embeddings = hear.get_scene_embeddings(audio, model)
    assert embeddings.dtype == torch.float32 and embeddings.ndim == 2
    assert embeddings.shape == (audio.shape[0], model.scene_embedding_size)
    assert embeddings.device == audio.device
    assert torch.isfinite(embeddings).all()


def test_timestamps_are_token_centres(clip_small_ckpt):
    """A click at time t lands in the token whose timestamp is nearest to t."""
    model = hear.load_model(str(clip_small_ckpt))
    for click_ms in (500.0, 1234.0, 2001.0):
        audio = torch.zeros(1, 3 * 16000)
        audio[0, int(click_ms * 16)] = 1.0
        mel, _ = model.model.frontend(audio)
        patches = model.model.encoder.patchify(mel)  # [1, T, 64 * 4]
        loudest = int(patches[0].mean(dim=1).argmax())
        _, timestamps = hear.get_timestamp_embeddings(audio, model)
        assert abs(timestamps[0, loudest].item() - click_ms) <= 20.0


@pytest.mark.slow
def test_model_options(frame_small_ckpt):
    model = hear.load_model(str(frame_small_ckpt), n_blocks=1)
    assert model.scene_embedding_size == model.timestamp_embedding_size == 384
    embeddings, _ = hear.get_timestamp_embeddings(noise(2, 1.0), model)
    assert embeddings.shape[-1] == 384
    with pytest.raises(ValueError, match="n_blocks must be an integer in 1..12"):
        hear.load_model(str(frame_small_ckpt), n_blocks=13)
    with pytest.raises(TypeError):
        hear.load_model(str(frame_small_ckpt), n_block=3)  # a typo is not silently ignored


def test_no_gradients_and_device_moves(frame_small_ckpt):
    model = hear.load_model(str(frame_small_ckpt))
    assert next(model.parameters()).device.type == "cpu"
    model.to("cpu")
    audio = noise(1, 1.0).requires_grad_()
    embeddings, timestamps = hear.get_timestamp_embeddings(audio, model)
    assert not embeddings.requires_grad and not timestamps.requires_grad
    assert not hear.get_scene_embeddings(audio, model).requires_grad


@pytest.mark.slow
def test_equal_to_the_library(frame_small_ckpt, frame_small):
    model = hear.load_model(str(frame_small_ckpt))
    audio = noise(3, 2.0)
    embeddings, timestamps = hear.get_timestamp_embeddings(audio, model)
    expected, expected_timestamps = frame_small.get_frame_embeddings(audio)
    assert torch.equal(embeddings, expected) and torch.equal(timestamps, expected_timestamps)
    assert torch.equal(hear.get_scene_embeddings(audio, model), frame_small.get_clip_embedding(audio))


def test_very_short_audio_keeps_timestamps_inside(frame_small_ckpt):
    model = hear.load_model(str(frame_small_ckpt))
    embeddings, timestamps = hear.get_timestamp_embeddings(noise(2, 0.01), model)  # 160 samples
    assert embeddings.shape[:2] == (2, 1) and timestamps.max().item() <= 10.0


def test_bad_audio(frame_small_ckpt):
    model = hear.load_model(str(frame_small_ckpt))
    with pytest.raises(ValueError, match=r"\[n_sounds, n_samples\]"):
        hear.get_scene_embeddings(torch.zeros(16000), model)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_outputs_on_the_audio_device(frame_small_ckpt):
    model = hear.load_model(str(frame_small_ckpt)).to("cuda")
    audio = noise(2, 1.5).cuda()
    embeddings, timestamps = hear.get_timestamp_embeddings(audio, model)
    assert embeddings.is_cuda and timestamps.is_cuda and hear.get_scene_embeddings(audio, model).is_cuda
