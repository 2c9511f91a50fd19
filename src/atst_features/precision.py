"""Compute precisions: the names ``set_precision`` takes, and whether this CPU runs a 16-bit type fast."""

from __future__ import annotations

import functools

import torch

__all__ = ["PRECISIONS", "cpu_multiplies_fast", "slow_precision_message"]

# Encoder compute precisions (ATSTModel.set_precision): name -> (16-bit dtype or None, autocast).
PRECISIONS = {
    "fp32": (None, False),
    "bf16": (torch.bfloat16, False),
    "fp16": (torch.float16, False),
    "bf16-mixed": (torch.bfloat16, True),
    "fp16-mixed": (torch.float16, True),
}


def slow_precision_message(what: str, dtype: torch.dtype | None, device_type: str = "cpu") -> str | None:
    """One line (without advice) when computing in ``dtype`` on ``device_type`` is slow: a 16-bit type
    on a CPU without fast kernels for it (:func:`cpu_multiplies_fast`); else
    None. ``what`` names the setting."""
    if dtype is None or device_type != "cpu" or cpu_multiplies_fast(dtype):
        return None
    name = {torch.bfloat16: "bfloat16", torch.float16: "float16"}[dtype]
    return (f"{what}: this CPU has no fast {name} matrix kernels (they need AVX512, fast with "
            f"{'AVX512-BF16 or AMX' if dtype == torch.bfloat16 else 'AVX512-FP16 or AMX-FP16'}), so it runs several "
            f"times slower than fp32 here")


@functools.lru_cache(maxsize=None)
def cpu_multiplies_fast(dtype: torch.dtype) -> bool:
    """Whether this CPU has oneDNN's kernels for matrix products in ``dtype`` (PyTorch's own
    detection): always for float32; bfloat16 needs AVX512 (fast with AVX512-BF16 or AMX), float16
    AVX512-FP16 or AMX-FP16. Without them PyTorch multiplies in plain loops: on a 2-core AVX2-only
    AMD EPYC a bf16 linear layer ran at 20 GFLOP/s against 161 in float32, a bf16-mixed pretraining
    step 38x slower than float32."""
    if dtype not in (torch.bfloat16, torch.float16):
        return True
    probe = getattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported" if dtype == torch.bfloat16 else "_is_mkldnn_fp16_supported", None)
    try:
        return bool(probe()) if probe is not None else True
    except RuntimeError:
        return True
