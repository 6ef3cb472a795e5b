"""distill/heap.py: with freed memory kept, a loop that allocates and frees 100 MB arrays stops faulting their
pages in on every pass (the kernel time that made a CPU evaluation 1.5x slower); `distill run` / `distill eval`
set it up unless DISTILL_KEEP_HEAP=0."""

from __future__ import annotations

import os
import platform
import subprocess
import sys

import pytest

LOOP = """
import resource
import numpy as np
from distill.cli import _configure_process
_configure_process()  # what `distill run` and `distill eval` do first
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(30):
    block = np.ones(100 * 2**20 // 8)
    del block
print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


def page_faults(keep_heap: str) -> int:
    env = {**os.environ, "DISTILL_KEEP_HEAP": keep_heap}
    return int(subprocess.run([sys.executable, "-c", LOOP], capture_output=True, text=True, check=True, env=env).stdout)


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="mallopt thresholds are glibc's")
def test_cli_processes_keep_freed_memory_unless_told_not_to() -> None:
    kept, plain = page_faults("1"), page_faults("0")
    # plain: each of the 30 passes faults its block in again; kept: the first pass only (measured 16860 vs 557)
    assert plain > 10 * kept
