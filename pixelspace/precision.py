"""Arithmetic precision of the expensive side of a method (real batches, MTT students): fp32 or bf16 autocast.

bf16 is only worth it where it is native: CPUs whose oneDNN has bfloat16 kernels and CUDA GPUs with bf16;
'auto' picks it there and fp32 elsewhere (:mod:`distill.precision`). Measured costs and gains: docs/BENCHMARKS.md.
"""

from __future__ import annotations

import torch

from distill.precision import autocast_context, bf16_fast_on, precision_dtype

__all__ = ["REAL_PRECISION_HELP", "arithmetic_name", "autocast_context", "bf16_fast_on", "precision_dtype",
           "real_autocast_dtype"]

REAL_PRECISION_HELP = (
    "Arithmetic of the real-batch side only (real gradients / real embeddings, the matching targets): "
    "'fp32' as the reference; 'bf16' autocasts its convolutions to bfloat16 (about 1.7x faster on CPUs with "
    "AVX512-BF16; measured error 20x below the sampling noise of a 256-image batch); 'auto' = bf16 on such "
    "CPUs and on CUDA GPUs with bf16, fp32 elsewhere. The image update always stays fp32 (DM's synthetic side has "
    "its own switch, syn_precision)."
)


def real_autocast_dtype(precision: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype for the real side (``real_precision``): None (fp32) or torch.bfloat16."""
    return precision_dtype(precision, device, "real_precision")


def arithmetic_name(dtype: torch.dtype | None) -> str:
    """What a method records for an autocast dtype: 'float32' (None: no autocast) or 'bfloat16'."""
    return str(dtype or torch.float32).replace("torch.", "")
