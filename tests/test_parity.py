"""Embeddings equal the official ATST code's outputs (tests/data/expected_*.npz, see shared/fixtures/parity)."""

from __future__ import annotations

import numpy as np
import pytest
from conftest import expected, recipe_state_dict

from atst_features.checkpoints import parse_state_dict
from atst_features.checkpoints import build_model

ATOL = 1e-4  # float32 CPU agreement promised by the fixtures
UP_TO_10S = ["a_2s", "b_hear_batch", "c_10s", "e_10s_plus"]


def close(actual, desired, atol=ATOL):
    actual = actual.detach().cpu().numpy() if hasattr(actual, "detach") else np.asarray(actual)
    np.testing.assert_allclose(actual, desired, rtol=0, atol=atol)


# ------------------------------------------------------------------ ATST-Frame small
@pytest.mark.parametrize("case", UP_TO_10S)
def test_frame_embeddings_last_block(frame_small, expected_frame_small, case):
    ref = expected_frame_small
    emb, timestamps = frame_small.get_frame_embeddings(ref[f"{case}/input"], n_blocks=1)
    close(emb, ref[f"{case}/frame_n1"])
    # The reference reports token starts (40 i); we report token centres (40 i + 15).
    close(timestamps, ref[f"{case}/timestamps"] + 15.0, atol=0)


def test_frame_embeddings_all_blocks(frame_small, expected_frame_small):
    emb, _ = frame_small.get_frame_embeddings(expected_frame_small["a_2s/input"], n_blocks=12)
    assert emb.shape == (1, 50, 4608)
    close(emb, expected_frame_small["a_2s/frame_n12"])


@pytest.mark.parametrize("case", ["a_2s", "b_hear_batch", "c_10s"])
def test_frame_scene_embedding(frame_small, expected_frame_small, case):
    ref = expected_frame_small
    close(frame_small.get_clip_embedding(ref[f"{case}/input"], n_blocks=12), ref[f"{case}/scene"])


def test_frame_mel_input(frame_small, expected_frame_small):
    import torch

    mel, n_frames = frame_small.frontend(torch.from_numpy(expected_frame_small["b_hear_batch/input"]))
    close(mel, expected_frame_small["b_hear_batch/mel"][:, 0], atol=1e-5)
    assert n_frames.tolist() == [375, 375, 375]


def test_long_input_first_window_equals_reference(frame_small, expected_frame_small):
    """23.3 s: our windows are 1000 frames, the reference's 1001; the first 250 tokens agree."""
    ref = expected_frame_small
    emb, timestamps = frame_small.get_frame_embeddings(ref["d_23s/input"], n_blocks=1)
    assert emb.shape == (1, 23_300 // 40, 384)  # 582 tokens, as the reference
    close(emb[:, :250], ref["d_23s/frame_n1"][:, :250])
    close(timestamps[0, -1], 581 * 40 + 15, atol=0)


@pytest.mark.slow
def test_long_input_scene_is_token_weighted_mean(frame_small, expected_frame_small):
    audio = expected_frame_small["d_23s/input"]
    tokens, _ = frame_small.get_frame_embeddings(audio, n_blocks=12)
    scene = frame_small.get_clip_embedding(audio, n_blocks=12)
    close(scene, tokens.mean(dim=1), atol=1e-5)
    # The reference averages its three chunks unweighted (10 s, 10 s, 3.3 s): a different vector.
    assert np.abs(scene.numpy() - expected_frame_small["d_23s/scene"]).max() > 1e-2


@pytest.mark.slow
def test_zero_token_chunk_bug_is_fixed(frame_small, expected_frame_small):
    """10.02 s: the reference's 3-frame second chunk adds a zero vector and halves its scene embedding.
    Ours is the token-weighted mean over the clip: exactly twice the reference here."""
    ref = expected_frame_small
    audio = ref["e_10s_plus/input"]
    scene = frame_small.get_clip_embedding(audio, n_blocks=12)
    tokens, _ = frame_small.get_frame_embeddings(audio, n_blocks=12)
    close(scene, tokens.mean(dim=1), atol=1e-5)
    close(scene, 2.0 * ref["e_10s_plus/scene"])
    assert np.abs(scene.numpy() - ref["e_10s_plus/scene"]).max() > 0.1


# ------------------------------------------------------------------ ATST-Frame small with a prompt token
@pytest.mark.parametrize("case", ["a_2s", "b_hear_batch"])
def test_prompt_model(frame_prompt, expected_frame_small, case):
    ref = expected("atst_frame_small_nprompt1")
    audio = expected_frame_small[f"{case}/input"]
    emb, _ = frame_prompt.get_frame_embeddings(audio, n_blocks=1)
    close(emb, ref[f"{case}/frame_n1"])
    scene = frame_prompt.get_clip_embedding(audio, n_blocks=12)
    assert scene.shape[-1] == frame_prompt.clip_embedding_size(12) == 9216
    close(scene, ref[f"{case}/scene"])


def test_prompt_model_long_input(frame_prompt, expected_frame_small):
    ref = expected("atst_frame_small_nprompt1")
    emb, _ = frame_prompt.get_frame_embeddings(expected_frame_small["d_23s/input"], n_blocks=1)
    close(emb[:, :250], ref["d_23s/frame_n1"][:, :250])


# ------------------------------------------------------------------ ATST-Clip small
@pytest.mark.parametrize("n_blocks", [1, 12])
@pytest.mark.parametrize("case", ["a_2s", "b_hear_batch", "c_10s", "d_23s"])
def test_clip_embedding_fixed_chunk_means(clip_small, expected_frame_small, case, n_blocks):
    ref = expected("atst_clip_small")
    emb = clip_small.get_clip_embedding(expected_frame_small[f"{case}/input"], n_blocks=n_blocks)
    close(emb, ref[f"{case}/clip_fixed_n{n_blocks}"])


@pytest.mark.parametrize("n_blocks", [1, 12])
@pytest.mark.parametrize("case", ["a_2s", "b_hear_batch"])
def test_clip_embedding_equals_reference_up_to_6s(clip_small, expected_frame_small, case, n_blocks):
    ref = expected("atst_clip_small")
    emb = clip_small.get_clip_embedding(expected_frame_small[f"{case}/input"], n_blocks=n_blocks)
    close(emb, ref[f"{case}/clip_n{n_blocks}"])


@pytest.mark.parametrize("case", ["c_10s", "d_23s"])
def test_clip_chunk_mean_scaling_bug_is_fixed(clip_small, expected_frame_small, case):
    """Beyond 6 s the reference shrinks every chunk's token mean but the last; its CLS parts are right."""
    ref = expected("atst_clip_small")[f"{case}/clip_n12"]
    emb = clip_small.get_clip_embedding(expected_frame_small[f"{case}/input"], n_blocks=12).numpy()
    half = emb.shape[-1] // 2  # [CLS of 12 blocks, token means of 12 blocks]
    close(emb[:, :half], ref[:, :half])
    assert np.abs(emb[:, half:] - ref[:, half:]).max() > 0.1


# ------------------------------------------------------------------ base size
def _base_model(fmt: str):
    import json

    from conftest import DATA

    hyper = json.loads((DATA / "formats" / f"{fmt}.json").read_text())["hyper_parameters"]
    state = recipe_state_dict(fmt, only_prefix="model.teacher.encoder.")
    return build_model(parse_state_dict(state, hyper, name=fmt))


@pytest.mark.slow
def test_frame_base_parity(expected_frame_small):
    model = _base_model("atst_frame_base")
    assert model.embed_dim == 768 and model.config.encoder.num_heads == 12
    ref = expected("atst_frame_base")
    for case in ["a_2s", "b_hear_batch"]:
        audio = expected_frame_small[f"{case}/input"]
        emb, _ = model.get_frame_embeddings(audio, n_blocks=1)
        close(emb, ref[f"{case}/frame_n1"])
        close(model.get_clip_embedding(audio, n_blocks=12), ref[f"{case}/scene"])


@pytest.mark.slow
def test_clip_base_parity(expected_frame_small):
    model = _base_model("atst_clip_base")
    assert model.kind == "clip" and model.clip_embedding_size(12) == 18432
    ref = expected("atst_clip_base")
    for case in ["a_2s", "b_hear_batch"]:
        audio = expected_frame_small[f"{case}/input"]
        for n_blocks in (1, 12):
            close(model.get_clip_embedding(audio, n_blocks=n_blocks), ref[f"{case}/clip_n{n_blocks}"])
