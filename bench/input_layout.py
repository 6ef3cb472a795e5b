"""What a batch in channels-last strides costs a ConvNet training step, eager and compiled.

DSA's crop (one batch in six under the default strategy) hands the network such a batch; ``FastPath.input`` brings
it back to plain NCHW strides off the reference path. This times one SGD step (forward under bf16 autocast where
the CPU runs it natively, else fp32; fp32 loss; backward; step) on the same batch in both layouts, calling the
network directly so that the layout reaches it, the two layouts interleaved within each repeat (minimum kept).

Usage: python bench/input_layout.py [--sizes 32,64] [--batch 128] [--repeats 8] [--no-compile] [--quick]
Prints one markdown table; one torch thread.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
from torch.nn import functional as F  # noqa: E402

from distill.fastpath import prepare  # noqa: E402
from distill.nets import build_network  # noqa: E402
from distill.precision import bf16_fast_on  # noqa: E402

CPU = torch.device("cpu")


def channels_last_strided(x: torch.Tensor) -> torch.Tensor:
    """``x`` with the strides DSA's crop leaves (an NHWC gather permuted back to NCHW)."""
    return x.permute(0, 2, 3, 1).contiguous().permute(0, 3, 1, 2)


def step_seconds(size: int, batch: int, compiled: bool, repeats: int) -> tuple[float, float]:
    """Minimum seconds of one training step on an NCHW batch and on the same batch in channels-last strides."""
    precision = "bf16" if bf16_fast_on(CPU) else "fp32"
    fast = prepare(build_network("convnet", 3, 10, size, seed=0), CPU, precision, compiled, "off")
    optimizer = torch.optim.SGD(fast.model.parameters(), lr=0.01, momentum=0.9)
    gen = torch.Generator().manual_seed(0)
    plain = torch.randn(batch, 3, size, size, generator=gen)
    labels = torch.randint(0, 10, (batch,), generator=gen)
    batches = {"nchw": plain, "channels-last": channels_last_strided(plain)}

    def step(x: torch.Tensor) -> None:
        optimizer.zero_grad(set_to_none=True)
        with fast.autocast():
            logits = fast.call(x)  # the network as it is called, without FastPath.input's normalisation
        F.cross_entropy(logits.float(), labels).backward()
        optimizer.step()

    for x in batches.values():  # warm-up (and compilation)
        step(x)
    best = dict.fromkeys(batches, float("inf"))
    for _ in range(repeats):
        for name, x in batches.items():
            start = time.perf_counter()
            step(x)
            best[name] = min(best[name], time.perf_counter() - start)
    return best["nchw"], best["channels-last"]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", default="32,64")
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=8)
    parser.add_argument("--no-compile", action="store_true", help="eager rows only")
    parser.add_argument("--quick", action="store_true", help="8 px, batch 8, 1 repeat, eager (tests)")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    sizes = [8] if args.quick else [int(s) for s in args.sizes.split(",")]
    batch, repeats = (8, 1) if args.quick else (args.batch, args.repeats)
    modes = [False] if args.quick or args.no_compile else [False, True]
    arithmetic = "bf16" if bf16_fast_on(CPU) else "fp32"
    print(f"ConvNet training step, batch {batch}, {arithmetic}, one thread, minimum of {repeats}")
    print("| px | path | NCHW batch ms | channels-last batch ms | channels-last / NCHW |")
    print("|---|---|---|---|---|")
    for size in sizes:
        for compiled in modes:
            plain, strided = step_seconds(size, batch, compiled, repeats)
            path = f"{arithmetic} + compile" if compiled else f"{arithmetic}, eager"
            print(f"| {size} | {path} | {plain * 1000:.0f} | {strided * 1000:.0f} | {strided / plain:.2f}x |")


if __name__ == "__main__":
    main()
