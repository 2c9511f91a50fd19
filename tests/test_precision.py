"""Compute precisions (fp32, bf16, fp16, *-mixed) and the token alignment of 16-bit CPU attention."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from conftest import waveform, write_audio

import atst_features
from atst_features import InputError, SlowPrecisionWarning
from atst_features import encoder as encoder_module
from atst_features import precision as precision_module
from atst_features.cli.embed import embed
from atst_features.precision import PRECISIONS

AUDIO = [waveform(12.3, 1), waveform(3.7, 2)]  # two windows and a padded batch


def min_frame_cosine(a: list[torch.Tensor], b: list[torch.Tensor]) -> float:
    return min(torch.nn.functional.cosine_similarity(x.float(), y, dim=-1).min().item() for x, y in zip(a, b))


@pytest.mark.slow
@pytest.mark.parametrize("precision", [p for p in PRECISIONS if p != "fp32"])
@pytest.mark.parametrize("fixture", ["frame_small_ckpt", "clip_small_ckpt"])
def test_16_bit_precisions_stay_close_to_fp32(precision, fixture, request):
    path = request.getfixturevalue(fixture)
    reference = atst_features.load_model(path, device="cpu")
    model = atst_features.load_model(path, device="cpu", precision=precision)
    half, mixed = PRECISIONS[precision]
    assert model.precision == precision and model.encoder.blocks[0].mlp.fc1.weight.dtype == half
    assert model.encoder.norm.weight.dtype == (torch.float32 if mixed else half)  # mixed: norms stay float32
    frames, stamps = model.get_frame_embeddings(AUDIO)
    expected, expected_stamps = reference.get_frame_embeddings(AUDIO)
    assert all(f.dtype == torch.float32 and f.shape == e.shape for f, e in zip(frames, expected))
    assert all(torch.equal(s, e) for s, e in zip(stamps, expected_stamps))
    assert min_frame_cosine(frames, expected) >= 0.999
    clip = model.get_clip_embedding(AUDIO)
    assert clip.dtype == torch.float32
    assert torch.nn.functional.cosine_similarity(clip, reference.get_clip_embedding(AUDIO)).min().item() >= 0.999


@pytest.mark.slow
def test_fp32_precision_is_the_default_computation(frame_small_ckpt, frame_small):
    model = atst_features.load_model(frame_small_ckpt, device="cpu", precision="fp32")
    assert torch.equal(model.get_frame_embeddings(AUDIO[0])[0], frame_small.get_frame_embeddings(AUDIO[0])[0])


@pytest.mark.slow
def test_precision_errors(frame_small_ckpt):
    with pytest.raises(InputError, match="precision must be one of fp32, bf16, fp16, bf16-mixed, fp16-mixed, got 'int8'"):
        atst_features.load_model(frame_small_ckpt, device="cpu", precision="int8")
    with pytest.raises(InputError, match="dtype .* or precision .*, not both"):
        atst_features.load_model(frame_small_ckpt, device="cpu", dtype=torch.bfloat16, precision="bf16")
    model = atst_features.load_model(frame_small_ckpt, device="cpu", precision="bf16-mixed")
    with pytest.raises(InputError, match="already runs in bf16-mixed; load it again for fp32"):
        model.set_precision("fp32")
    bf16_weights = atst_features.load_model(frame_small_ckpt, device="cpu", dtype=torch.bfloat16)
    assert bf16_weights.get_frame_embeddings(AUDIO[0])[0].dtype == torch.bfloat16  # dtype keeps its meaning
    with pytest.raises(InputError, match="needs float32 weights"):
        bf16_weights.set_precision("bf16")


@pytest.mark.slow
@pytest.mark.parametrize("fixture", ["frame_small", "clip_small", "frame_prompt"])
def test_aligned_attention_equals_unaligned(fixture, request, monkeypatch):
    """Padding the tokens to a multiple of 64 (done for 16-bit CPU attention) changes nothing but
    rounding: checked in float32, where it is not done by default."""
    model = request.getfixturevalue(fixture)
    expected = model.get_embeddings(AUDIO, n_blocks=3)
    lengths = []

    def aligned(length, x):
        lengths.append(length)
        return -(-length // 64) * 64

    monkeypatch.setattr(encoder_module, "_aligned_length", aligned)
    clip, frames, _ = model.get_embeddings(AUDIO, n_blocks=3)
    assert lengths and any(length % 64 for length in lengths)  # padding really happened
    torch.testing.assert_close(clip, expected[0], rtol=0, atol=2e-5)
    for got, want in zip(frames, expected[1]):
        torch.testing.assert_close(got, want, rtol=0, atol=2e-5)


def test_alignment_rule():
    cpu_bf16 = torch.zeros(1, 250, 8, dtype=torch.bfloat16)
    assert encoder_module._aligned_length(250, cpu_bf16) == 256
    assert encoder_module._aligned_length(251, cpu_bf16.half()) == 256
    assert encoder_module._aligned_length(250, cpu_bf16.float()) == 250  # float32: no gain, no padding
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert encoder_module._aligned_length(250, cpu_bf16.float()) == 256


@pytest.mark.slow
def test_cli_precision(tmp_path, frame_small_ckpt, frame_small):
    path = write_audio(tmp_path / "a.wav", seconds=3.0)
    result = CliRunner().invoke(embed, [str(path), "--level", "frame", "--model", str(frame_small_ckpt),
                                        "--precision", "bf16", "-q", "--device", "cpu"])
    assert result.exit_code == 0, result.output
    with np.load(tmp_path / "a.npz") as saved:
        frames = torch.from_numpy(saved["frame"])
    assert frames.dtype == torch.float32
    assert min_frame_cosine([frames], [frame_small.get_frame_embeddings(path)[0][0]]) >= 0.999


def test_hear_precision_option(frame_small_ckpt):
    from atst_features import hear

    model = hear.load_model(str(frame_small_ckpt), n_blocks=2, precision="bf16")
    scene = hear.get_scene_embeddings(torch.from_numpy(np.stack([waveform(2.0, 5)])), model)
    assert scene.dtype == torch.float32 and scene.shape == (1, model.scene_embedding_size)


def test_fused_inference_equals_the_plain_path_and_follows_weight_changes(frame_small_ckpt, monkeypatch):
    model = atst_features.load_model(frame_small_ckpt, device="cpu", precision="bf16")
    if not encoder_module._ONEDNN["available"]:
        pytest.skip("this torch build has no oneDNN linear-pointwise operator")
    fused = model.get_frame_embeddings(AUDIO[1])[0][0]
    mlp = model.encoder.blocks[-1].mlp
    assert hasattr(mlp.fc1, "_onednn_weight")  # the fused path ran
    monkeypatch.setitem(encoder_module._ONEDNN, "available", False)
    plain = model.get_frame_embeddings(AUDIO[1])[0][0]
    assert min_frame_cosine([fused], [plain]) >= 0.9999
    monkeypatch.setitem(encoder_module._ONEDNN, "available", True)
    with torch.no_grad():
        mlp.fc1.weight.mul_(0.5)  # in place: the packed copy must follow
    changed = model.get_frame_embeddings(AUDIO[1])[0][0]
    monkeypatch.setitem(encoder_module._ONEDNN, "available", False)
    assert min_frame_cosine([changed], [model.get_frame_embeddings(AUDIO[1])[0][0]]) >= 0.9999
    assert min_frame_cosine([changed], [plain]) < 0.9999


def test_fused_failure_falls_back_for_good(monkeypatch):
    monkeypatch.setitem(encoder_module._ONEDNN, "available", True)
    config = encoder_module.EncoderConfig(cls_token=False, embed_dim=64, depth=1, num_heads=2, mlp_hidden_dim=128)
    block = encoder_module.Block(config, 0.0).eval().to(torch.bfloat16)
    block.mlp.fc2 = torch.nn.Linear(3, 3).to(torch.bfloat16)  # wrong width: the oneDNN call fails
    with torch.inference_mode():
        assert block._forward_onednn(torch.zeros(1, 4, 64, dtype=torch.bfloat16), None) is None
    assert encoder_module._ONEDNN["available"] is False


def test_matmul_attention_matches_the_attention_kernel_and_ignores_masked_keys(monkeypatch):
    generator = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 3, 70, 16, generator=generator).bfloat16() for _ in range(3))
    key_mask = torch.arange(70)[None, :] < torch.tensor([70, 41])[:, None]
    monkeypatch.setattr(encoder_module, "_cpu_has_amx", lambda: True)
    assert not encoder_module._matmul_attention_ready(q)  # AMX: PyTorch's kernel is the faster one
    monkeypatch.setattr(encoder_module, "_cpu_has_amx", lambda: False)
    assert encoder_module._matmul_attention_ready(q)
    assert not encoder_module._matmul_attention_ready(q.float())  # float32 keeps PyTorch's kernel
    assert not encoder_module._matmul_attention_ready(q.clone().requires_grad_())  # so does training
    got = encoder_module._matmul_attention(q, k, v, key_mask)
    want = torch.nn.functional.scaled_dot_product_attention(q.float(), k.float(), v.float(), attn_mask=key_mask[:, None, None, :])
    assert got.dtype == torch.bfloat16
    torch.testing.assert_close(got.float(), want, rtol=0, atol=0.01)  # the kernel in bf16: 0.0026
    assert torch.nn.functional.cosine_similarity(got.float(), want, dim=-1).min() > 0.999
    k[1, :, 41:], v[1, :, 41:] = 100.0, -100.0  # masked keys: no influence at all
    assert torch.equal(encoder_module._matmul_attention(q, k, v, key_mask), got)


# ------------------------------------------------------------------ CPUs without fast 16-bit kernels
@pytest.fixture
def slow_16_bit_cpu(monkeypatch):
    """This CPU seen as one without oneDNN's 16-bit kernels (AVX2 only), whatever it really has."""
    monkeypatch.setattr(precision_module, "cpu_multiplies_fast", lambda dtype: dtype not in (torch.bfloat16, torch.float16))


@pytest.mark.slow
def test_16_bit_on_a_cpu_without_fast_kernels_warns_and_still_runs(frame_small_ckpt, slow_16_bit_cpu):
    with pytest.warns(SlowPrecisionWarning, match=r"^precision='bf16-mixed': this CPU has no fast bfloat16 matrix "
                                                   r"kernels \(they need AVX512, fast with AVX512-BF16 or AMX\).*; use fp32$"):
        model = atst_features.load_model(frame_small_ckpt, device="cpu", precision="bf16-mixed")
    assert model.precision == "bf16-mixed"  # what was asked, only slower
    with pytest.warns(SlowPrecisionWarning, match=r"^dtype=torch.float16: .* no fast float16 .*AVX512-FP16 or AMX-FP16"):
        atst_features.load_model(frame_small_ckpt, device="cpu", dtype=torch.float16)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        atst_features.load_model(frame_small_ckpt, device="cpu", precision="fp32")


def test_16_bit_on_a_cpu_with_fast_kernels_is_silent(frame_small_ckpt, monkeypatch):
    monkeypatch.setattr(precision_module, "cpu_multiplies_fast", lambda dtype: True)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert atst_features.load_model(frame_small_ckpt, device="cpu", precision="bf16").precision == "bf16"


def test_cpu_detection_follows_pytorch():
    assert precision_module.cpu_multiplies_fast(torch.float32)
    assert precision_module.cpu_multiplies_fast(torch.bfloat16) == torch.ops.mkldnn._is_mkldnn_bf16_supported()
    assert precision_module.cpu_multiplies_fast(torch.float16) == torch.ops.mkldnn._is_mkldnn_fp16_supported()


def test_cli_shows_the_slow_precision_warning_as_one_line(tmp_path, frame_small_ckpt, slow_16_bit_cpu):
    path = write_audio(tmp_path / "a.wav", seconds=1.0)
    result = CliRunner().invoke(embed, [str(path), "--model", str(frame_small_ckpt), "--precision", "bf16", "-q",
                                        "--device", "cpu"])
    assert result.exit_code == 0, result.output
    assert result.stderr.splitlines() == [
        "warning: precision='bf16': this CPU has no fast bfloat16 matrix kernels (they need AVX512, fast with "
        "AVX512-BF16 or AMX), so it runs several times slower than fp32 here; use fp32"]
    assert (tmp_path / "a.npz").exists()
