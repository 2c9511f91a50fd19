"""Pretraining pieces against the reference's formulas (docs/reference-notes.md#pretraining-recipes and #span-masking)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

pytest.importorskip("lightning")

from atst_features.encoder import EncoderConfig  # noqa: E402
from atst_features.training.augment import Mixup, RandomResizeCrop, span_masks  # noqa: E402
from atst_features.training.objective import (  # noqa: E402
    Branch,
    byol_loss,
    cosine_schedule,
    cross_view_loss,
    ema_update,
    output_std,
    parameter_groups,
)


def reference_schedule(base, final, total, warmup=0, start=0.0) -> np.ndarray:
    """The reference's cosine_scheduler_step as the reference document states it: an array of
    ``total`` values, linspace warmup then cosine."""
    warm = np.linspace(start, base, warmup) if warmup > 0 else np.array([])
    iters = np.arange(total - warmup)
    cosine = final + 0.5 * (base - final) * (1 + np.cos(np.pi * iters / len(iters)))
    return np.concatenate((warm, cosine))


# ------------------------------------------------------------------ schedules
@pytest.mark.parametrize(
    "name, base, final, total, warmup",
    [
        ("lr, ATST-Frame small", 1.6e-3, 1e-6, 58_500, 1950),
        ("lr, ATST-Clip base", 1.2e-3, 1e-6, 318_000, 15_860),
        ("weight decay", 0.04, 0.4, 58_500, 0),
        ("EMA, ATST-Frame base", 0.9996, 1.0, 398_000, 0),
    ],
)
def test_schedules_equal_the_reference(name, base, final, total, warmup):
    ref = reference_schedule(base, final, total, warmup)
    steps = {0, max(warmup - 1, 0), warmup, total // 2, total - 1, 123, total - 1000}
    for step in sorted(steps):
        assert cosine_schedule(step, base, final, total, warmup) == pytest.approx(ref[step], rel=1e-12, abs=1e-15), step


def test_schedule_landmarks():
    assert cosine_schedule(0, 1.6e-3, 1e-6, 58_500, 1950) == 0.0  # warmup starts at 0
    assert cosine_schedule(1949, 1.6e-3, 1e-6, 58_500, 1950) == pytest.approx(1.6e-3)  # peak at the end of warmup
    assert cosine_schedule(1950, 1.6e-3, 1e-6, 58_500, 1950) == pytest.approx(1.6e-3)
    assert cosine_schedule(0, 0.04, 0.4, 100) == pytest.approx(0.04)
    assert cosine_schedule(50, 0.04, 0.4, 100) == pytest.approx(0.22)
    assert cosine_schedule(0, 0.99, 1.0, 100) == pytest.approx(0.99)
    # the reference indexes one past its array after the last step; we keep the last value
    assert cosine_schedule(100, 0.99, 1.0, 100) == cosine_schedule(99, 0.99, 1.0, 100)


# ------------------------------------------------------------------ parameter groups
def test_parameter_groups():
    branch = Branch(EncoderConfig(cls_token=True, embed_dim=64, depth=2, num_heads=2, mlp_hidden_dim=128), 256, 32, True)
    branch.encoder.mask_embed.requires_grad_(False)
    regularised, plain = parameter_groups(branch)
    names = {id(p): n for n, p in branch.named_parameters()}
    decayed = {names[id(p)] for p in regularised["params"]}
    not_decayed = {names[id(p)] for p in plain["params"]}
    assert plain["weight_decay"] == 0.0 and "weight_decay" not in regularised
    for name in ["encoder.pos_embed", "encoder.cls_token", "encoder.patch_embed.weight", "encoder.blocks.0.attn.qkv.weight",
                 "encoder.blocks.1.mlp.fc2.weight", "projector.0.weight", "projector.3.weight", "predictor.0.weight"]:
        assert name in decayed, name
    for name in ["encoder.patch_embed.bias", "encoder.blocks.0.norm1.weight", "encoder.blocks.0.norm1.bias",
                 "encoder.norm.weight", "encoder.blocks.0.attn.proj.bias", "projector.1.weight", "projector.1.bias"]:
        assert name in not_decayed, name
    assert "encoder.mask_embed" not in decayed | not_decayed  # frozen: in no group
    assert len(decayed) + len(not_decayed) == sum(1 for p in branch.parameters() if p.requires_grad)


# ------------------------------------------------------------------ span masks
def runs_of(mask_row: np.ndarray) -> list[int]:
    edges = np.diff(np.concatenate([[0], mask_row.astype(int), [0]]))
    return list(np.flatnonzero(edges == -1) - np.flatnonzero(edges == 1))


def test_span_mask_statistics():
    masks = span_masks(5000, 250, generator=torch.Generator().manual_seed(0)).numpy()
    ratios = masks.mean(axis=1)
    assert abs(ratios.mean() - 0.50) < 0.02, ratios.mean()
    assert 0.38 < ratios.min() and ratios.max() < 0.62
    assert not masks[:, 249].any()  # the last token is never masked
    assert masks[:, 248].mean() == pytest.approx(0.13, abs=0.03)  # only when 244 starts a span
    for row in masks[:200]:
        assert min(runs_of(row)) >= 5  # spans of 5, merged where they overlap


def test_span_mask_counts_and_minimum():
    generator = torch.Generator().manual_seed(1)
    # 32 or 33 spans for 250 tokens: at most 5 * 33 masked
    masks = span_masks(2000, 250, generator=generator)
    assert masks.sum(dim=1).max() <= 165
    # at least 2 spans, whatever the ratio
    few = span_masks(500, 250, ratio=0.001, generator=generator).numpy()
    counts = few.sum(axis=1)
    assert counts.min() >= 6 and counts.max() <= 10  # two distinct starts: 6 to 10 tokens
    # short inputs (fewer tokens than spans allow): starts come from {0..n}, as fairseq does
    short = span_masks(200, 12, ratio=0.65, generator=generator)
    assert short.shape == (200, 12) and short.any(dim=1).all()


def test_exact_mask_ratio_option():
    masks = span_masks(300, 250, exact=True, generator=torch.Generator().manual_seed(2)).numpy()
    assert (masks.sum(axis=1) == 160).all()  # round(0.65 * 250 / 5) = 32 spans of 5, no overlap
    assert masks[:, 249].any()  # any token can be masked
    for row in masks[:50]:
        assert all(run % 5 == 0 for run in runs_of(row))


# ------------------------------------------------------------------ Mixup
def test_mixup_is_identity_with_an_empty_bank():
    x = torch.randn(3, 8, 20)
    assert torch.equal(Mixup()(x, torch.Generator().manual_seed(0)), x)


def test_mixup_bank_size_and_fifo_order():
    mixup = Mixup(memory=10)
    items = torch.arange(17, dtype=torch.float32).view(17, 1, 1).expand(17, 2, 3).clone()
    for start in range(0, 17, 3):
        mixup(items[start : start + 3])
    assert mixup.filled == 10
    assert mixup.contents()[:, 0, 0].tolist() == list(range(7, 17))  # the last 10, oldest first
    big = Mixup(memory=4)
    big(items[:9])  # more items than the bank holds at once
    assert big.contents()[:, 0, 0].tolist() == [5, 6, 7, 8]


def test_log_mixup_exp_value():
    """x = 0 dB-domain zeros and a background z = log 3: log((1 - a) e^0 + a e^log3 + eps) = log(1 + 2a + eps)."""
    mixup = Mixup(ratio=0.4, memory=5)
    mixup(torch.full((1, 4, 6), math.log(3.0)))  # fills the bank; passes unchanged
    generator = torch.Generator().manual_seed(7)
    mixed = mixup(torch.zeros(2, 4, 6), generator)
    alpha = 0.4 * torch.rand(2, generator=torch.Generator().manual_seed(7))  # the same draws
    expected = torch.log(1 + 2 * alpha + torch.finfo(torch.float32).eps)
    torch.testing.assert_close(mixed, expected.view(2, 1, 1).expand(2, 4, 6), rtol=0, atol=1e-6)
    assert mixup.filled == 3  # the unmixed inputs joined the bank


# ------------------------------------------------------------------ RandomResizeCrop
def test_random_resize_crop_shape():
    crop = RandomResizeCrop()  # ATST-Clip: virtual crop (1, 1.5), scales (0.6, 1.5)
    x = torch.randn(6, 64, 101)
    out = crop(x, torch.Generator().manual_seed(3))
    assert out.shape == x.shape and torch.isfinite(out).all()
    assert not torch.equal(out, x)


def test_random_resize_crop_crops_each_item_over_its_own_frames():
    """In a zero-padded batch, as the reference crops each clip before batching: a short clip's
    output comes from its own frames only, its padding stays, and it equals cropping it alone."""
    crop = RandomResizeCrop()
    x = torch.full((4, 64, 301), 1000.0)  # the padding: a value no crop of the clips comes near
    lengths = torch.tensor([40, 101, 301, 7])
    for index, length in enumerate(lengths.tolist()):
        x[index, :, :length] = torch.randn(64, length)
    out = crop(x, torch.Generator().manual_seed(1), lengths)
    for index, length in enumerate(lengths.tolist()):
        assert out[index, :, :length].abs().max() < 20, index  # bicubic overshoot at most, no padding
        assert bool((out[index, :, length:] == 1000.0).all())
    alone = crop(x[1:2, :, :101], torch.Generator().manual_seed(2))
    in_batch = crop(x[1:2], torch.Generator().manual_seed(2), lengths[1:2])
    torch.testing.assert_close(in_batch[0, :, :101], alone[0], rtol=0, atol=1e-6)


def test_frequency_only_crop_keeps_time_frames():
    crop = RandomResizeCrop((1.0, 1.0), time_scale=(1.0, 1.0))  # ATST-Frame's student view
    over_time = torch.randn(5, 1, 120).expand(5, 64, 120).contiguous()  # every frame constant over mel bins
    torch.testing.assert_close(crop(over_time, torch.Generator().manual_seed(4)), over_time, rtol=0, atol=1e-5)
    x = torch.randn(5, 64, 120)
    out = crop(x, torch.Generator().manual_seed(4))
    assert out.shape == x.shape and not torch.equal(out, x)


def test_full_size_crop_is_identity():
    crop = RandomResizeCrop((1.0, 1.0), freq_scale=(1.0, 1.0), time_scale=(1.0, 1.0))
    x = torch.randn(2, 64, 50)
    torch.testing.assert_close(crop(x), x, rtol=0, atol=1e-5)


def test_frame_freq_scale_option():
    from atst_features.training.module import FramePretraining

    small = dict(embed_dim=64, depth=1, num_heads=2, projector_hidden_dim=32, projector_out_dim=16)
    assert FramePretraining(**small).crop.freq_scale == (0.6, 1.5)  # the reference's student view
    module = FramePretraining(**small, freq_scale=[1.0, 1.0])  # frame-mini: no spectral zoom
    assert module.crop.freq_scale == (1.0, 1.0) and list(module.hparams.freq_scale) == [1.0, 1.0]


@pytest.mark.parametrize("positions", [False, True])
def test_frame_centred_targets(positions):
    from atst_features.training.module import FramePretraining

    small = dict(embed_dim=32, depth=1, num_heads=2, projector_hidden_dim=32, projector_out_dim=16)
    torch.manual_seed(0)
    module = FramePretraining(**small, center_targets=True, center_positions=positions)
    plain = FramePretraining(**small)
    plain.model.load_state_dict(module.model.state_dict())
    views, mask = torch.randn(6, 64, 40), torch.ones(6, 10, dtype=torch.bool)  # every token a target
    teacher = module.features(module.model.teacher, views, None, mask, student=False).view(6, 10, 32)
    raw = plain.features(plain.model.teacher, views, None, mask, student=False).view(6, 10, 32)
    expected = raw - raw.mean(dim=1, keepdim=True)  # each clip's mean token removed
    if positions:
        expected = expected - expected.mean(dim=0, keepdim=True)  # and each position's batch mean
    torch.testing.assert_close(teacher, expected)
    assert teacher.mean(dim=1).abs().max() < 1e-5 and teacher.abs().mean() > 0.1
    # the student's tokens stay as they are
    student = module.features(module.model.student, views, None, mask, student=True)
    torch.testing.assert_close(student, plain.features(plain.model.student, views, None, mask, student=True))


# ------------------------------------------------------------------ BYOL loss, EMA, diagnostics
def test_byol_loss_values():
    z = torch.randn(10, 16)
    assert byol_loss(2.5 * z, z).item() == pytest.approx(0.0, abs=1e-6)
    assert byol_loss(-z, z).item() == pytest.approx(4.0, abs=1e-6)
    orthogonal = torch.tensor([[1.0, 0.0]]), torch.tensor([[0.0, 1.0]])
    assert byol_loss(*orthogonal).item() == pytest.approx(2.0)


def test_cross_view_pairing():
    a, b = torch.randn(4, 8), torch.randn(4, 8)
    student, teacher = torch.cat([a, b]), torch.cat([b, a])  # each student view equals the other teacher view
    assert cross_view_loss(student, teacher).item() == pytest.approx(0.0, abs=1e-6)
    assert cross_view_loss(student, student).item() > 0.5


def test_ema_update():
    torch.manual_seed(0)
    student, teacher = torch.nn.BatchNorm1d(3), torch.nn.BatchNorm1d(3)
    student.weight.data.fill_(2.0)
    teacher.weight.data.fill_(1.0)
    student.running_mean.fill_(4.0)
    ema_update(teacher, student, 0.9)
    torch.testing.assert_close(teacher.weight.data, torch.full((3,), 1.1))
    assert teacher.running_mean.tolist() == [0.0, 0.0, 0.0]  # buffers untouched (the reference)
    ema_update(teacher, student, 0.5, buffers=True)
    torch.testing.assert_close(teacher.running_mean, torch.full((3,), 2.0))


def test_output_std_diagnostic():
    healthy = output_std(torch.randn(4000, 64)).item()
    assert healthy == pytest.approx(1 / math.sqrt(64), rel=0.05)
    collapsed = output_std(torch.ones(4000, 64) + 1e-4 * torch.randn(4000, 64)).item()
    assert collapsed < 0.01
