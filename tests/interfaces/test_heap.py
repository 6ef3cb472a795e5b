"""distill/heap.py: with freed memory kept, a 100 MB block comes from the process heap and stays there when
freed, instead of a fresh mmap handed back to the kernel on free and faulted in again on the next allocation
(the kernel time that made a CPU evaluation 1.5x slower); `distill run` / `distill eval` set it up unless
DISTILL_KEEP_HEAP=0. Measured by glibc's own accounting (mallinfo2), not page faults, whose count depends on
transparent huge pages."""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys

import pytest

PROBE = """
import ctypes, json
import numpy as np
from distill.cli import _configure_process
_configure_process()  # what `distill run` and `distill eval` do first

class MallInfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in
                ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks", "keepcost")]

libc = ctypes.CDLL("libc.so.6")
libc.mallinfo2.restype = MallInfo2
block = np.ones(100 * 2**20 // 8)
held = libc.mallinfo2()
del block
freed = libc.mallinfo2()
print(json.dumps({"mmapped_while_held": held.hblkhd, "heap_after_free": freed.arena}))
"""


def probe(keep_heap: str) -> dict[str, int]:
    env = {**os.environ, "DISTILL_KEEP_HEAP": keep_heap}
    out = subprocess.run([sys.executable, "-c", PROBE], capture_output=True, text=True, check=True, env=env).stdout
    return json.loads(out)


@pytest.mark.skipif(platform.libc_ver() < ("glibc", "2.33"), reason="mallinfo2 and the thresholds are glibc's")
def test_cli_processes_keep_freed_memory_unless_told_not_to() -> None:
    kept, plain = probe("1"), probe("0")
    block = 100 * 2**20
    assert plain["mmapped_while_held"] >= block  # glibc's default: its own mmap, unmapped on free
    assert kept["mmapped_while_held"] < block  # kept: from the heap ...
    assert kept["heap_after_free"] - plain["heap_after_free"] >= 0.9 * block  # ... and still there after free
