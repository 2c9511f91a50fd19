"""The ATST transformer: one class for ATST-Frame (and the C2F student) and ATST-Clip.

Both official encoders (``FrameAST`` and ``AST`` in github Audio-WestlakeU/audiossl) are a ViT over
64 x 4 patches of the log-mel spectrogram (all mel bins x 4 frames = one token per 40 ms) with a
learned "cut" positional table of 250 rows, pre-norm blocks and a final LayerNorm applied to every
returned block. ATST-Clip prepends a CLS token (position row 0); ATST-Frame may prepend prompt
tokens, which carry no position. Attention uses ``scaled_dot_product_attention`` with a boolean
key-padding mask built from the number of valid tokens per item.
"""

from __future__ import annotations

import functools
from dataclasses import asdict, dataclass
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .errors import InputError, check_fields

__all__ = ["ENCODER_SIZES", "EncoderConfig", "EncoderOutput", "ATSTEncoder"]

# width, depth, heads of the official factories (head dimension 64, MLP ratio 4), and "mini", the size
# of atst-features' own packaged atst-frame-mini.
ENCODER_SIZES = {
    "mini": dict(embed_dim=256, depth=6, num_heads=4),
    "small": dict(embed_dim=384, depth=12, num_heads=6),
    "base": dict(embed_dim=768, depth=12, num_heads=12),
    "large": dict(embed_dim=1024, depth=24, num_heads=16),
}


@dataclass(frozen=True)
class EncoderConfig:
    """Architecture of one ATST encoder.

    ``cls_token=True`` is ATST-Clip (``AST``); ``False`` is ATST-Frame / C2F (``FrameAST``).
    ``max_tokens`` is the length of the positional table without its row 0 (250 = 10 s).
    """

    cls_token: bool
    embed_dim: int = 768
    depth: int = 12
    num_heads: int = 12
    mlp_hidden_dim: int = 3072
    n_mels: int = 64
    patch_frames: int = 4
    max_tokens: int = 250
    n_prompts: int = 0
    layer_norm_eps: float = 1e-6
    drop_path_rate: float = 0.1

    # (field, type, lowest, highest): values from untrusted files size memory, so they are bounded.
    # A LayerNorm epsilon of 0 divides by zero on a constant token: it must be positive.
    RULES = (
        ("cls_token", bool, None, None), ("embed_dim", int, 1, 8192), ("depth", int, 1, 64),
        ("num_heads", int, 1, 256), ("mlp_hidden_dim", int, 1, 65536), ("n_mels", int, 1, 512),
        ("patch_frames", int, 1, 64), ("max_tokens", int, 1, 10_000), ("n_prompts", int, 0, 64),
        ("layer_norm_eps", (float, int), 1e-12, 1), ("drop_path_rate", (float, int), 0, 1),
    )

    def __post_init__(self) -> None:
        check_fields("EncoderConfig", self, self.RULES)
        if self.embed_dim % self.num_heads:
            raise InputError(f"embed_dim {self.embed_dim} is not divisible by num_heads {self.num_heads}")
        if self.cls_token and self.n_prompts:
            raise InputError("prompt tokens exist only in ATST-Frame encoders (cls_token=False)")

    @classmethod
    def of_size(cls, size: str, *, cls_token: bool, **overrides) -> "EncoderConfig":
        """A named architecture of :data:`ENCODER_SIZES` (the official ``small`` / ``base`` / ``large``, our
        ``mini``), e.g. ``of_size("base", cls_token=False)``."""
        if size not in ENCODER_SIZES:
            raise InputError(f"unknown encoder size {size!r}; expected one of {sorted(ENCODER_SIZES)}")
        dims = dict(ENCODER_SIZES[size])
        dims["mlp_hidden_dim"] = 4 * dims["embed_dim"]
        dims.update(overrides)
        return cls(cls_token=cls_token, **dims)

    @property
    def n_special(self) -> int:
        """Tokens in front of the patch tokens (the CLS token or the prompts)."""
        return 1 if self.cls_token else self.n_prompts

    @property
    def patch_dim(self) -> int:
        return self.n_mels * self.patch_frames

    def frame_embedding_size(self, n_blocks: int) -> int:
        """Size of one frame embedding of the last ``n_blocks`` blocks: ``n_blocks * embed_dim``."""
        return n_blocks * self.embed_dim

    def clip_embedding_size(self, n_blocks: int) -> int:
        """Size of the clip embedding of the last ``n_blocks`` blocks: ``2 * n_blocks * embed_dim`` for
        ATST-Clip (CLS and token mean) and for ATST-Frame with prompt tokens (token mean and prompt
        mean), else ``n_blocks * embed_dim``."""
        return (2 if self.cls_token or self.n_prompts else 1) * self.frame_embedding_size(n_blocks)

    def to_dict(self) -> dict:
        return asdict(self)


class EncoderOutput(NamedTuple):
    """Outputs of the last ``n`` blocks, shallow to deep (lists of length ``n``).

    ``tokens``: final-norm patch tokens ``[B, P, D]``; ``cls``: final-norm CLS ``[B, D]`` (ATST-Clip)
    or None; ``prompts``: raw (un-normalised) prompt outputs ``[B, n_prompts, D]``, as the
    reference uses them, or None.
    """

    tokens: list[Tensor]
    cls: list[Tensor] | None
    prompts: list[Tensor] | None


class Attention(nn.Module):
    def __init__(self, dim: int, num_heads: int) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, 3 * dim, bias=False)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: Tensor, key_mask: Tensor | None) -> Tensor:
        return self.proj(self.mix(x, key_mask))

    def mix(self, x: Tensor, key_mask: Tensor | None) -> Tensor:
        """The heads' attention outputs side by side, before the output projection."""
        batch, length, dim = x.shape
        qkv = self.qkv(x).view(batch, length, 3, self.num_heads, dim // self.num_heads)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)
        if _matmul_attention_ready(q):
            out = _matmul_attention(q, k, v, key_mask)
        else:
            mask = None if key_mask is None else key_mask[:, None, None, :]
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        return out.transpose(1, 2).reshape(batch, length, dim)


# bfloat16 inference on CPUs without AMX: PyTorch's CPU attention kernel reaches about a sixth of
# the bf16 matrix-product rate on 256 tokens (20 ms for 8 x 12 heads x 256 x 64 on one core of an
# AMD EPYC with AVX512-BF16, against 8.6 ms here): two batched bf16 products and a softmax that
# accumulates in float32 are faster. With AMX tiles (Intel Sapphire Rapids and later) the kernel is
# the faster one by 4x (3.1 ms against 13 ms for the same shapes on 2 threads of such a Xeon), so
# it stays. The scores are rounded to bfloat16 before the softmax (the kernel keeps them in
# float32); the frames' cosine to float32 stays above 0.999 (benchmarks/embed_speed.py).
def _matmul_attention_ready(q: Tensor) -> bool:
    return (q.device.type == "cpu" and q.dtype == torch.bfloat16 and not (torch.is_grad_enabled() and q.requires_grad)
            and not _cpu_has_amx())


@functools.lru_cache(maxsize=None)
def _cpu_has_amx() -> bool:
    """Whether this CPU multiplies bfloat16 on AMX tiles (PyTorch's own detection; False if unknown)."""
    probe = getattr(torch.cpu, "_is_amx_tile_supported", None)
    return bool(probe()) if probe is not None else False


def _matmul_attention(q: Tensor, k: Tensor, v: Tensor, key_mask: Tensor | None) -> Tensor:
    """``softmax(q k^T / sqrt(d) + mask) v`` for ``[B, H, L, d]`` bfloat16 inputs; ``key_mask [B, L]``
    True for the keys to attend to (None: all)."""
    with torch.autocast("cpu", enabled=False):
        scores = torch.matmul(q * q.shape[-1] ** -0.5, k.transpose(-1, -2))
        if key_mask is not None:
            scores.masked_fill_(~key_mask[:, None, None, :], float("-inf"))
        return torch.matmul(torch.softmax(scores, dim=-1), v)


class Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: Tensor) -> Tensor:
        hidden = self.fc1(x)
        # Without autograd, GELU in place: one [tokens, hidden] buffer fewer to allocate and fill per block.
        return self.fc2(self.act(hidden) if torch.is_grad_enabled() else torch.ops.aten.gelu_(hidden))


# bfloat16 inference on CPU: oneDNN applies fc1's GELU and adds the residual after proj and fc2
# inside the matrix-product calls, on the float32 accumulator, instead of three more passes over
# the activations: about 15 % of a base forward. PyTorch's compiler uses the same operators; any
# failure falls back to the plain path for good.
_ONEDNN = {"available": hasattr(torch.ops.mkldnn, "_linear_pointwise") and torch.backends.mkldnn.is_available()}


def _onednn_ready(x: Tensor, weight: Tensor) -> bool:
    return (_ONEDNN["available"] and x.device.type == "cpu" and x.dtype == torch.bfloat16
            and weight.dtype == torch.bfloat16 and not (torch.is_grad_enabled() and weight.requires_grad))


def _packed(linear: nn.Linear) -> Tensor:
    """``linear``'s weight in oneDNN's layout, repacked whenever the weight changes."""
    weight = linear.weight
    key = (weight.data_ptr(), weight._version, weight.dtype)
    cached = getattr(linear, "_onednn_weight", None)
    if cached is None or cached[0] != key:
        cached = (key, torch.ops.mkldnn._reorder_linear_weight(weight.detach(), 2048))
        linear._onednn_weight = cached
    return cached[1]


def _linear_gelu(x: Tensor, linear: nn.Linear) -> Tensor:
    return torch.ops.mkldnn._linear_pointwise(x, _packed(linear), linear.bias, "gelu", [], "none")


def _linear_add(x: Tensor, linear: nn.Linear, residual: Tensor) -> Tensor:
    """``residual + linear(x)`` in one call."""
    return torch.ops.mkldnn._linear_pointwise.binary(x, residual, _packed(linear), linear.bias, "add")


class Block(nn.Module):
    """Pre-norm block: ``x + drop_path(attn(norm1(x)))``, then ``+ drop_path(mlp(norm2(x)))``."""

    def __init__(self, config: EncoderConfig, drop_path: float) -> None:
        super().__init__()
        dim = config.embed_dim
        self.norm1 = nn.LayerNorm(dim, eps=config.layer_norm_eps)
        self.attn = Attention(dim, config.num_heads)
        self.norm2 = nn.LayerNorm(dim, eps=config.layer_norm_eps)
        self.mlp = Mlp(dim, config.mlp_hidden_dim)
        self.drop_path = drop_path

    def _drop(self, x: Tensor) -> Tensor:
        """Stochastic depth (training only): drop the branch per sample, rescale the kept ones."""
        if not self.training or self.drop_path == 0.0:
            return x
        keep = 1.0 - self.drop_path
        shape = (x.shape[0],) + (1,) * (x.ndim - 1)
        return x * torch.bernoulli(x.new_full(shape, keep)) / keep

    def forward(self, x: Tensor, key_mask: Tensor | None) -> Tensor:
        if not self.training and _onednn_ready(x, self.mlp.fc1.weight):
            fused = self._forward_onednn(x, key_mask)
            if fused is not None:
                return fused
        x = x + self._drop(self.attn(self.norm1(x), key_mask))
        return x + self._drop(self.mlp(self.norm2(x)))

    def _forward_onednn(self, x: Tensor, key_mask: Tensor | None) -> Tensor | None:
        """The inference forward with GELU and the residual adds fused into oneDNN calls (see _ONEDNN)."""
        try:
            x = _linear_add(self.attn.mix(self.norm1(x), key_mask), self.attn.proj, x)
            return _linear_add(_linear_gelu(self.norm2(x), self.mlp.fc1), self.mlp.fc2, x)
        except (RuntimeError, TypeError, AttributeError):
            _ONEDNN["available"] = False
            return None


# CPU attention in bfloat16 / float16 runs on matrix tiles: on 250 tokens (a 10 s window) it is about
# twice as slow as on 256, so reduced-precision CPU runs pad the sequence to a multiple of this
# (masked keys; the extra 2 % of linear work is repaid many times). float32 and CUDA gain nothing.
ATTENTION_ALIGN = 64


def _aligned_length(length: int, x: Tensor) -> int:
    """The token count attention should run on for ``x``: ``length`` or the next multiple of
    :data:`ATTENTION_ALIGN` (CPU, 16-bit activations or autocast)."""
    if x.device.type != "cpu":
        return length
    half = x.dtype in (torch.bfloat16, torch.float16) or torch.is_autocast_enabled("cpu")
    return -(-length // ATTENTION_ALIGN) * ATTENTION_ALIGN if half else length


class ATSTEncoder(nn.Module):
    """ATST transformer over normalised log-mel spectrograms.

    ``forward(mel [B, n_mels, T], n_tokens [B] | None, n_blocks, token_mask [B, P] | None)``:
    ``P = T // 4`` patch tokens (trailing ``T % 4`` frames are dropped), at most ``max_tokens``.
    ``n_tokens`` marks how many leading tokens of each item are valid (None: all); padded keys are
    masked out of attention. ``token_mask`` (pretraining) replaces the marked patch embeddings by
    ``mask_embed`` before positions are added.
    """

    def __init__(self, config: EncoderConfig) -> None:
        super().__init__()
        self.config = config
        dim = config.embed_dim
        self.patch_embed = nn.Linear(config.patch_dim, dim)
        self.pos_embed = nn.Parameter(torch.zeros(1, config.max_tokens + 1, dim))
        self.mask_embed = nn.Parameter(torch.zeros(1, 1, dim))
        if config.cls_token:
            self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
        if config.n_prompts:
            self.prompt_embed = nn.Parameter(torch.zeros(1, config.n_prompts, dim))
        step = config.drop_path_rate / max(config.depth - 1, 1)
        rates = [index * step for index in range(config.depth)]  # linspace(0, rate, depth)
        self.blocks = nn.ModuleList(Block(config, rate) for rate in rates)
        self.norm = nn.LayerNorm(dim, eps=config.layer_norm_eps)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """The reference initialisation: truncated normal (std 0.02) weights and embeddings, zero biases."""
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.trunc_normal_(module.weight, std=0.02, a=-2.0, b=2.0)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
            elif isinstance(module, nn.LayerNorm):
                nn.init.ones_(module.weight)
                nn.init.zeros_(module.bias)
        for name in ("pos_embed", "mask_embed", "cls_token", "prompt_embed"):
            if hasattr(self, name):
                nn.init.trunc_normal_(getattr(self, name), std=0.02, a=-2.0, b=2.0)

    def patchify(self, mel: Tensor) -> Tensor:
        """``[B, n_mels, T]`` -> ``[B, T // 4, n_mels * 4]``, element ``4 * mel_bin + frame_offset``."""
        batch, n_mels, frames = mel.shape
        if n_mels != self.config.n_mels:
            raise InputError(f"expected {self.config.n_mels} mel bins, got {n_mels}")
        width = self.config.patch_frames
        n_patches = frames // width
        patches = mel[:, :, : n_patches * width].reshape(batch, n_mels, n_patches, width)
        return patches.permute(0, 2, 1, 3).reshape(batch, n_patches, n_mels * width)

    def forward(
        self,
        mel: Tensor,
        n_tokens: Tensor | None = None,
        n_blocks: int = 1,
        token_mask: Tensor | None = None,
    ) -> EncoderOutput:
        cfg = self.config
        if not 1 <= n_blocks <= cfg.depth:
            raise InputError(f"n_blocks must be in 1..{cfg.depth}, got {n_blocks}")
        x = self.patch_embed(self.patchify(mel))
        batch, n_patches, _ = x.shape
        if n_patches > cfg.max_tokens:
            raise InputError(
                f"{n_patches} tokens exceed the positional table ({cfg.max_tokens}); cut the input into windows"
            )
        if token_mask is not None:
            x = torch.where(token_mask[..., None], self.mask_embed.to(x.dtype), x)
        x = x + self.pos_embed[:, 1 : n_patches + 1]
        if cfg.cls_token:
            cls = (self.cls_token + self.pos_embed[:, :1]).expand(batch, -1, -1)
            x = torch.cat([cls, x], dim=1)
        elif cfg.n_prompts:
            x = torch.cat([self.prompt_embed.expand(batch, -1, -1), x], dim=1)

        length = x.shape[1]
        aligned = _aligned_length(length, x) if not self.training else length
        key_mask = None
        if n_tokens is not None or aligned != length:
            valid = torch.full((batch,), n_patches, device=x.device) if n_tokens is None else n_tokens.to(x.device)
            key_mask = torch.arange(aligned, device=x.device)[None, :] < (valid + cfg.n_special)[:, None]
            if aligned != length:
                x = F.pad(x, (0, 0, 0, aligned - length))  # padded tokens: masked keys, outputs dropped

        special = cfg.n_special
        tokens, cls_out, prompts = [], [], []
        for index, block in enumerate(self.blocks):
            x = block(x, key_mask)
            if index < cfg.depth - n_blocks:
                continue
            if cfg.cls_token:
                normed = self.norm(x[:, :length])
                cls_out.append(normed[:, 0])
                tokens.append(normed[:, 1:])
            else:
                tokens.append(self.norm(x[:, special:length]))
                if special:
                    prompts.append(x[:, :special])
        return EncoderOutput(
            tokens=tokens,
            cls=cls_out if cfg.cls_token else None,
            prompts=prompts if cfg.n_prompts else None,
        )
