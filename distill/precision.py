"""One home for arithmetic precision: fp32, or bf16 autocast where the hardware runs it natively.

Every setting that uses it keeps 'fp32' as the reference-exact choice. 'auto' means bf16 where it is native:
CPUs whose oneDNN has bfloat16 kernels (AVX512-BF16 / AMX) and CUDA GPUs with bf16 (Ampere and newer), fp32
elsewhere.
"""

from __future__ import annotations

import contextlib

import torch

from distill.errors import DistillError

PRECISIONS = ("auto", "fp32", "bf16")


def bf16_fast_on(device: torch.device) -> bool:
    """True on CPUs with native bfloat16 kernels and on CUDA devices that support bf16."""
    if device.type == "cuda":
        return torch.cuda.is_available() and torch.cuda.is_bf16_supported()
    if device.type != "cpu":
        return False
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


def precision_dtype(precision: str, device: torch.device, parameter: str = "precision") -> torch.dtype | None:
    """A precision setting ('fp32', 'bf16', or 'auto') as None (fp32) or torch.bfloat16."""
    if precision == "fp32":
        return None
    if precision == "bf16":
        return torch.bfloat16
    if precision == "auto":
        return torch.bfloat16 if bf16_fast_on(device) else None
    raise DistillError(f"unknown {parameter} '{precision}' (use auto, fp32 or bf16)")


def autocast_context(device: torch.device, dtype: torch.dtype | None):
    """torch.autocast for ``dtype`` on ``device``, or a no-op context for fp32."""
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=dtype)
