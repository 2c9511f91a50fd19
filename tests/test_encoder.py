"""The transformer: official sizes, patch order, padding masks, limits."""

from __future__ import annotations

import pytest
import torch

from atst_features.encoder import ATSTEncoder, EncoderConfig


def n_params(config: EncoderConfig) -> int:
    with torch.device("meta"):
        return sum(p.numel() for p in ATSTEncoder(config).parameters())


@pytest.mark.parametrize(
    "size, cls_token, count",
    [  # parameter counts of the official FrameAST / AST factories (reference section 2.1)
        ("small", False, 21_475_968),
        ("small", True, 21_476_352),
        ("base", False, 85_419_264),
        ("base", True, 85_420_032),
    ],
)
def test_official_sizes(size, cls_token, count):
    assert n_params(EncoderConfig.of_size(size, cls_token=cls_token)) == count


def test_any_size_from_a_config():
    config = EncoderConfig(cls_token=False, embed_dim=64, depth=3, num_heads=2, mlp_hidden_dim=128)
    encoder = ATSTEncoder(config).eval()
    out = encoder(torch.randn(2, 64, 40), n_blocks=3)
    assert len(out.tokens) == 3 and out.tokens[0].shape == (2, 10, 64)
    assert out.cls is None and out.prompts is None


def test_patch_order_is_mel_major():
    encoder = ATSTEncoder(EncoderConfig(cls_token=False, embed_dim=64, depth=1, num_heads=2, mlp_hidden_dim=64))
    mel = torch.arange(64 * 9, dtype=torch.float32).view(1, 64, 9)  # value = 9 * bin + frame
    patches = encoder.patchify(mel)
    assert patches.shape == (1, 2, 256)  # the 9th frame is dropped
    # token 1, element 4 * bin + offset holds frame 4 + offset of that bin
    assert patches[0, 1, 4 * 10 + 3].item() == 9 * 10 + 4 + 3


@pytest.mark.parametrize("cls_token, n_prompts", [(False, 0), (True, 0), (False, 2)])
def test_padding_does_not_leak_into_valid_tokens(cls_token, n_prompts):
    torch.manual_seed(0)
    config = EncoderConfig(cls_token=cls_token, embed_dim=64, depth=2, num_heads=4, mlp_hidden_dim=128, n_prompts=n_prompts)
    encoder = ATSTEncoder(config).eval()
    short = torch.randn(1, 64, 20)  # 5 tokens
    padded = torch.cat([short, torch.randn(1, 64, 20) * 100], dim=-1)  # 10 tokens, garbage after 5
    with torch.no_grad():
        alone = encoder(short, n_blocks=2)
        masked = encoder(padded, torch.tensor([5]), n_blocks=2)
    for a, b in zip(alone.tokens, masked.tokens):
        torch.testing.assert_close(b[:, :5], a, rtol=0, atol=1e-5)
    for name in ("cls", "prompts"):
        if getattr(alone, name) is not None:
            for a, b in zip(getattr(alone, name), getattr(masked, name)):
                torch.testing.assert_close(b, a, rtol=0, atol=1e-5)


def test_too_many_tokens_is_refused():
    encoder = ATSTEncoder(EncoderConfig(cls_token=False, embed_dim=64, depth=1, num_heads=2, mlp_hidden_dim=64))
    with pytest.raises(ValueError, match="251 tokens exceed the positional table"):
        encoder(torch.zeros(1, 64, 1004))


def test_token_mask_replaces_embeddings_before_positions():
    torch.manual_seed(1)
    config = EncoderConfig(cls_token=False, embed_dim=64, depth=1, num_heads=2, mlp_hidden_dim=64)
    encoder = ATSTEncoder(config).eval()
    mel_a, mel_b = torch.randn(1, 64, 16), torch.randn(1, 64, 16)
    mask = torch.tensor([[False, True, False, False]])
    with torch.no_grad():
        out_a = encoder(mel_a, token_mask=mask).tokens[0]
        mel_b[..., :4], mel_b[..., 8:] = mel_a[..., :4], mel_a[..., 8:]  # differ only under the mask
        out_b = encoder(mel_b, token_mask=mask).tokens[0]
    torch.testing.assert_close(out_a, out_b, rtol=0, atol=1e-6)


def test_drop_path_only_in_training():
    torch.manual_seed(2)
    encoder = ATSTEncoder(EncoderConfig.of_size("small", cls_token=False, depth=2, drop_path_rate=0.5))
    mel = torch.randn(8, 64, 40)
    encoder.eval()
    with torch.no_grad():
        first, second = encoder(mel).tokens[0], encoder(mel).tokens[0]
    assert torch.equal(first, second)
    encoder.train()
    with torch.no_grad():
        assert not torch.equal(encoder(mel).tokens[0], encoder(mel).tokens[0])


def test_bad_configs():
    with pytest.raises(ValueError, match="not divisible"):
        EncoderConfig(cls_token=False, embed_dim=100, num_heads=3)
    with pytest.raises(ValueError, match="prompt tokens exist only"):
        EncoderConfig(cls_token=True, n_prompts=1)
    with pytest.raises(ValueError, match="unknown encoder size"):
        EncoderConfig.of_size("huge", cls_token=False)
