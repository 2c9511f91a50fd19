"""Checkpoint layouts load to the same model; anything else fails with a CheckpointError that says why."""

from __future__ import annotations

import argparse
import pickle

import pytest
import torch
from conftest import recipe_checkpoint, recipe_state_dict, waveform

from atst_features import CheckpointError, load_model
from atst_features.checkpoints import read_checkpoint

AUDIO = waveform(2.0, 21)


@pytest.fixture(scope="module")
def frame_encoder_state():
    """The ATST-Frame small teacher encoder, official key names, no prefix."""
    prefix = "model.teacher.encoder."
    return {k[len(prefix) :]: v for k, v in recipe_state_dict("atst_frame_small", prefix).items()}


@pytest.fixture(scope="module")
def frame_reference(frame_small):
    return frame_small.get_frame_embeddings(AUDIO, n_blocks=3)[0]


def save(tmp_path, obj, name="model.ckpt"):
    path = tmp_path / name
    torch.save(obj, path)
    return path


def assert_same_model(path, reference, kind="frame"):
    model = load_model(path, device="cpu")
    assert model.kind == kind
    torch.testing.assert_close(model.get_frame_embeddings(AUDIO, n_blocks=3)[0], reference, rtol=0, atol=0)
    return model


def test_official_frame_checkpoint(frame_small_ckpt):
    contents = read_checkpoint(frame_small_ckpt)
    enc = contents.config.encoder
    assert contents.config.kind == "frame"
    assert (enc.embed_dim, enc.depth, enc.num_heads, enc.mlp_hidden_dim) == (384, 12, 6, 1536)
    assert (enc.max_tokens, enc.n_prompts, enc.cls_token) == (250, 0, False)
    assert contents.hyper_parameters["arch"] == "small"
    assert "model.teacher.encoder." in contents.layout


def test_official_clip_checkpoint(clip_small_ckpt):
    contents = read_checkpoint(clip_small_ckpt)
    assert contents.config.kind == "clip" and contents.config.encoder.cls_token


@pytest.mark.parametrize(
    "prefix",
    ["", "module.", "module.backbone.", "encoder.encoder.", "encoder.encoder.frame_encoder.", "atst_frame.atst."],
)
@pytest.mark.slow
def test_encoder_layouts(tmp_path, frame_encoder_state, frame_reference, prefix):
    state = {prefix + k: v for k, v in frame_encoder_state.items()}
    if prefix == "atst_frame.atst.":  # ATST-SED: the encoder sits inside a larger model
        state["sed_head.weight"] = torch.zeros(10, 384)
    assert_same_model(save(tmp_path, state), frame_reference)
    assert_same_model(save(tmp_path, {"state_dict": state, "hyper_parameters": {"arch": "small"}}), frame_reference)


def test_legacy_teacher_and_args_format(tmp_path, frame_encoder_state, frame_reference):
    teacher = {"module.encoder." + k: v for k, v in frame_encoder_state.items()}
    teacher["module.projector.0.weight"] = torch.zeros(4096, 384)
    legacy = {"teacher": teacher, "args": argparse.Namespace(arch="ast", anchor_len=[6.0])}
    assert_same_model(save(tmp_path, legacy), frame_reference)


def test_cnn_patch_embedding(tmp_path, frame_encoder_state, frame_reference):
    state = dict(frame_encoder_state)
    state["patch_embed.proj.weight"] = state.pop("patch_embed.patch_embed.weight").reshape(384, 1, 64, 4)
    state["patch_embed.proj.bias"] = state.pop("patch_embed.patch_embed.bias")
    assert_same_model(save(tmp_path, state), frame_reference)


def test_c2f_distillation_checkpoint(tmp_path, frame_encoder_state, frame_reference):
    state = {"model.student." + k: v for k, v in frame_encoder_state.items()}
    # The ATST-Clip teacher is in the same file and must not be picked.
    state.update(recipe_state_dict("atst_clip_small", "model.teacher.encoder."))
    head = {
        "model.linear.norm.running_mean": torch.randn(384, generator=torch.Generator().manual_seed(0)),
        "model.linear.norm.running_var": torch.rand(384, generator=torch.Generator().manual_seed(1)) + 0.5,
        "model.linear.norm.num_batches_tracked": torch.tensor(100),
        "model.linear.linear.weight": torch.randn(527, 384, generator=torch.Generator().manual_seed(2)),
        "model.linear.linear.bias": torch.zeros(527),
    }
    state.update(head)
    path = save(tmp_path, {"epoch": 3, "global_step": 10, "state_dict": state})  # no hyper_parameters
    model = assert_same_model(path, frame_reference, kind="c2f")
    assert model.config.num_classes == 527
    logits = model.get_tag_logits(AUDIO)
    clip = model.get_clip_embedding(AUDIO, n_blocks=1)
    bn = (clip - head["model.linear.norm.running_mean"]) / torch.sqrt(head["model.linear.norm.running_var"] + 1e-5)
    torch.testing.assert_close(logits, bn @ head["model.linear.linear.weight"].T, rtol=0, atol=1e-4)


def test_tag_logits_need_a_head(frame_small):
    with pytest.raises(ValueError, match="no tagging head"):
        frame_small.get_tag_logits(AUDIO)


def test_half_precision_checkpoint_loads_as_float32(tmp_path, frame_encoder_state, frame_reference):
    half = {k: v.half() for k, v in frame_encoder_state.items()}
    model = load_model(save(tmp_path, half), device="cpu")
    assert model.dtype == torch.float32
    emb = model.get_frame_embeddings(AUDIO, n_blocks=3)[0]
    assert torch.nn.functional.cosine_similarity(emb.flatten(), frame_reference.flatten(), dim=0) > 0.999


# ------------------------------------------------------------------ refusals
def test_missing_file():
    with pytest.raises(FileNotFoundError, match="no such checkpoint"):
        load_model("/nonexistent/model.ckpt", device="cpu")


@pytest.mark.parametrize("name, content", [
    ("notes.ckpt", b"hello, I am not a checkpoint\n"),
    ("set.csv", b"path,label\na.wav,dog\n"),  # 'p' is a pickle opcode: the unpickler spoke of "objects beyond tensors"
    ("clip.wav", b"RIFF\x24\x00\x00\x00WAVEfmt " + bytes(32)),
    ("empty.ckpt", b""),
], ids=["text", "csv", "wav", "empty"])
def test_files_that_are_not_checkpoints(tmp_path, name, content):
    path = tmp_path / name
    path.write_bytes(content)
    with pytest.raises(CheckpointError, match=rf"{name.replace('.', '[.]')}': not a readable PyTorch checkpoint: "
                                              "neither a zip archive nor a pickle"):
        load_model(path, device="cpu")


def test_truncated_file(tmp_path, frame_small_ckpt):
    data = frame_small_ckpt.read_bytes()
    path = tmp_path / "truncated.ckpt"
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match=r"truncated\.ckpt.*truncated or corrupted"):
        load_model(path, device="cpu")


class Exploit:
    def __reduce__(self):
        import os

        return (os.system, ("touch EXPLOITED",))


@pytest.mark.filterwarnings("ignore:Detected pickle protocol")
@pytest.mark.parametrize("writer", ["torch.save", "pickle protocol 4"])
def test_pickled_code_is_never_run(tmp_path, monkeypatch, frame_encoder_state, writer):
    monkeypatch.chdir(tmp_path)
    path = tmp_path / "evil.ckpt"
    payload = {"state_dict": frame_encoder_state, "payload": Exploit()}
    if writer == "torch.save":
        torch.save(payload, path)
        named = r"the Python object posix\.system"
    else:
        path.write_bytes(pickle.dumps(payload, protocol=4))
        named = "Python objects beyond tensors"
    with pytest.raises(CheckpointError, match=rf"evil\.ckpt.*refusing to unpickle {named}"):
        load_model(path, device="cpu")
    assert not (tmp_path / "EXPLOITED").exists()


def test_unknown_object_is_refused_by_name(tmp_path, frame_encoder_state):
    path = save(tmp_path, {"state_dict": frame_encoder_state, "extra": torch.nn.Identity()})
    with pytest.raises(CheckpointError, match=r"refusing to unpickle .*Identity"):
        load_model(path, device="cpu")


def test_no_encoder(tmp_path):
    path = save(tmp_path, {"state_dict": {"classifier.weight": torch.zeros(3, 3)}}, "resnet.ckpt")
    with pytest.raises(CheckpointError, match=r"resnet\.ckpt.*no ATST encoder found.*classifier\.weight.*model\.teacher\.encoder"):
        load_model(path, device="cpu")


def test_no_tensors(tmp_path):
    path = save(tmp_path, {"epoch": 3})
    with pytest.raises(CheckpointError, match="holds no tensors"):
        load_model(path, device="cpu")


def test_missing_key_is_named(tmp_path, frame_encoder_state):
    state = dict(frame_encoder_state)
    del state["blocks.3.attn.proj.bias"]
    with pytest.raises(CheckpointError, match=r"missing \['blocks\.3\.attn\.proj\.bias'\]"):
        load_model(save(tmp_path, state), device="cpu")


def test_unexpected_key_is_named(tmp_path, frame_encoder_state):
    state = dict(frame_encoder_state, **{"projector.0.weight": torch.zeros(4096, 384)})
    with pytest.raises(CheckpointError, match=r"unexpected \['projector\.0\.weight'\]"):
        load_model(save(tmp_path, state), device="cpu")


def test_wrong_shape_is_named(tmp_path, frame_encoder_state):
    state = dict(frame_encoder_state)
    state["blocks.0.mlp.fc2.weight"] = torch.zeros(384, 100)
    with pytest.raises(CheckpointError, match=r"wrong shapes.*blocks\.0\.mlp\.fc2\.weight"):
        load_model(save(tmp_path, state), device="cpu")


def test_interpolated_positions_are_refused(tmp_path):
    checkpoint = recipe_checkpoint("atst_frame_small", "model.teacher.encoder.")
    checkpoint["hyper_parameters"]["pos_type"] = "interpolate"
    with pytest.raises(CheckpointError, match="'interpolate' is not supported"):
        load_model(save(tmp_path, checkpoint), device="cpu")


def test_other_patch_sizes_are_refused(tmp_path, frame_encoder_state):
    state = dict(frame_encoder_state)
    state["patch_embed.patch_embed.weight"] = torch.zeros(384, 256 * 2)
    with pytest.raises(CheckpointError, match="64 x 4 patches"):
        load_model(save(tmp_path, state), device="cpu")


def test_loaded_weights_own_aligned_memory(tmp_path):
    """Safetensors tensors are views at any offset of one buffer; CPU kernels round differently at
    other alignments, so a folder's model must hold aligned copies to give its source's outputs."""
    from atst_features import save_pretrained
    from atst_features.checkpoints import build_model
    from atst_features.convert import same_outputs
    from atst_features.encoder import EncoderConfig
    from atst_features.config import ModelConfig
    from atst_features.model import ATSTModel
    from atst_features.pretrained import read_pretrained

    encoder = EncoderConfig(cls_token=False, embed_dim=64, depth=2, num_heads=2, mlp_hidden_dim=256)
    config = ModelConfig(kind="frame", encoder=encoder, num_classes=7, labels=tuple("abcdefg"), multi_label=False)
    torch.manual_seed(0)
    model = ATSTModel(config).eval()
    save_pretrained(model, tmp_path / "folder")
    loaded = build_model(read_pretrained(tmp_path / "folder"))
    for name, tensor in [*loaded.named_parameters(), *loaded.named_buffers()]:
        assert not tensor.is_floating_point() or tensor.data_ptr() % 64 == 0, name
    assert same_outputs(model, loaded)
