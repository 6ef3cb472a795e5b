"""Keep freed memory inside a one-shot CPU process.

glibc serves every block above its mmap threshold (128 KiB to 32 MiB, adjusted as blocks are freed) with a fresh
``mmap`` and returns it on ``free``; it also trims the top of the heap back to the kernel. A CPU training loop
allocates and frees the same activation tensors (tens to hundreds of MB) every step, so each step faults every
page in again: on this project's CPU host a third (alone) to two thirds (two processes) of an evaluation's CPU
time was kernel time, and `distill eval` took 0.65x the wall time with both thresholds raised, at a 1.5x higher
peak RSS (docs/BENCHMARKS.md, latent part 5i). A one-shot command wants that trade; a long-lived worker that
would then keep its peak heap between jobs does not, so only `distill run` and `distill eval` call this
(``DISTILL_KEEP_HEAP=0`` turns it off).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import sys

M_TRIM_THRESHOLD = -1  # glibc's mallopt parameter numbers (malloc.h)
M_MMAP_THRESHOLD = -3
THRESHOLD_BYTES = 2**30  # blocks up to 1 GiB come from the heap and stay there when freed


def keep_freed_memory() -> bool:
    """Raise glibc's trim and mmap thresholds to 1 GiB; True when applied (False off glibc, e.g. macOS, musl)."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
    except OSError:
        return False
    if not hasattr(libc, "gnu_get_libc_version"):  # not glibc (musl's mallopt is a stub)
        return False
    mallopt = libc.mallopt
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    return bool(mallopt(M_TRIM_THRESHOLD, THRESHOLD_BYTES)) and bool(mallopt(M_MMAP_THRESHOLD, THRESHOLD_BYTES))
