"""Arithmetic precision of the expensive side of a method (real batches, MTT students): fp32 or bf16 autocast.

bf16 is only worth it on CPUs whose oneDNN has native bfloat16 kernels; 'auto' picks it there and fp32
elsewhere. Measured costs and gains: docs/BENCHMARKS.md.
"""

from __future__ import annotations

import contextlib

import torch

from distill.errors import DistillError

REAL_PRECISION_HELP = (
    "Arithmetic of the real-batch side only (real gradients / real embeddings, the matching targets): "
    "'fp32' as the reference; 'bf16' autocasts its convolutions to bfloat16 (about 1.7x faster on CPUs with "
    "AVX512-BF16; measured error 20x below the sampling noise of a 256-image batch); 'auto' = bf16 on such "
    "CPUs, fp32 elsewhere. The synthetic side and the image update always stay fp32."
)


def bf16_fast_on(device: torch.device) -> bool:
    """True on CPUs whose oneDNN has native bfloat16 kernels (AVX512-BF16 / AMX)."""
    if device.type != "cpu":
        return False
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


def precision_dtype(precision: str, device: torch.device, parameter: str = "real_precision") -> torch.dtype | None:
    """A precision setting ('fp32', 'bf16', or 'auto' = bf16 where native) as None (fp32) or torch.bfloat16."""
    if precision == "fp32":
        return None
    if precision == "bf16":
        return torch.bfloat16
    if precision == "auto":
        return torch.bfloat16 if bf16_fast_on(device) else None
    raise DistillError(f"unknown {parameter} '{precision}' (use auto, fp32 or bf16)")


def real_autocast_dtype(precision: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype for the real side (``real_precision``): None (fp32) or torch.bfloat16."""
    return precision_dtype(precision, device, "real_precision")


def autocast_context(device: torch.device, dtype: torch.dtype | None):
    """torch.autocast for ``dtype`` on ``device``, or a no-op context for fp32."""
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=dtype)
