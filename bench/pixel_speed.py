"""Seconds per distillation iteration and peak RSS: our pixel-space methods vs the references' loops.

The reference repositories cannot be fetched on this machine, so each part also runs a *reference-
equivalent* loop: the code of VICO-UoE/DatasetCondensation ``main.py`` / ``main_DM.py`` transcribed with
the same settings (per-class forward/backward, ``match_loss`` per class, fp32, float copy of the whole
train split in memory as the reference keeps it). Every implementation runs in its own child process
(own peak RSS), one after the other, in one invocation of this script; compare medians.

Parts (a registry other methods extend: add a function to PARTS):
- ``dc``: DC, MNIST, IPC 1 (outer 1, inner 1), batch_real 256 per class, ConvNet-3 instance norm.
- ``dm``: DM, MNIST, IPC 10, batch_real 256 per class, DSA color_crop_cutout_flip_scale_rotate (the
  reference default, used on both sides here), init real, lr_img 1.

"ours" runs with ``compile_real`` off and on (torch.compile of the real pass; its one-time compilation lands
in the first iteration, reported apart from the median of the others).

Usage: python bench/pixel_speed.py [--parts dc,dm] [--iterations 4] [--threads 2]
Prints a markdown table.
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import queue as queue_module
import resource
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

DM_STRATEGY = "color_crop_cutout_flip_scale_rotate"  # main_DM.py default, on both sides


def _peak_rss_gib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024**2  # Linux: KiB


def _setup(threads: int):
    import torch

    torch.set_num_threads(threads)
    from distill.data import get_dataset

    return torch, get_dataset("mnist")


# ---------------------------------------------------------------------------- reference-equivalent loops
def _reference_data(torch, ds):
    """The reference's in-memory copy: every train image as a normalised float tensor, plus class indices."""
    images_all = ds.normalize(ds.train.load(list(range(len(ds.train)))).float().div_(255.0))
    indices_class = [ds.train.class_indices(c) for c in range(ds.num_classes)]
    return images_all, indices_class


def reference_dc(iterations: int, threads: int, ipc: int = 1, batch_real: int = 256) -> list[float]:
    """DC main.py at IPC 1 (outer_loop 1): per class real grad, syn grad with create_graph, match_loss."""
    torch, ds = _setup(threads)
    import numpy as np
    from torch.nn import functional as F

    from distill.nets import build_network
    from pixelspace.gradients import match_distance

    images_all, indices_class = _reference_data(torch, ds)
    image_syn = torch.randn(ds.num_classes * ipc, 1, 28, 28, requires_grad=True)
    optimizer_img = torch.optim.SGD([image_syn], lr=0.1, momentum=0.5)
    times = []
    for it in range(iterations):
        start = time.perf_counter()
        net = build_network("convnet", 1, ds.num_classes, 28, seed=it)
        net.train()
        net_parameters = list(net.parameters())
        loss = torch.tensor(0.0)
        for c in range(ds.num_classes):
            img_real = images_all[np.random.permutation(indices_class[c])[:batch_real]]
            lab_real = torch.ones((img_real.shape[0],), dtype=torch.long) * c
            img_syn = image_syn[c * ipc : (c + 1) * ipc].reshape((ipc, 1, 28, 28))
            lab_syn = torch.ones((ipc,), dtype=torch.long) * c
            gw_real = torch.autograd.grad(F.cross_entropy(net(img_real), lab_real), net_parameters)
            gw_real = [g.detach().clone() for g in gw_real]
            gw_syn = torch.autograd.grad(F.cross_entropy(net(img_syn), lab_syn), net_parameters, create_graph=True)
            loss = loss + match_distance(gw_syn, gw_real, "ours")
        optimizer_img.zero_grad()
        loss.backward()
        optimizer_img.step()
        times.append(time.perf_counter() - start)
    return times


def reference_dm(iterations: int, threads: int, ipc: int = 10, batch_real: int = 256) -> list[float]:
    """DM main_DM.py (non-BN branch): frozen random net, per class Siamese DSA and mean-embedding loss."""
    torch, ds = _setup(threads)
    import numpy as np

    from distill.augment import diff_augment
    from distill.nets import build_network

    images_all, indices_class = _reference_data(torch, ds)
    init = [images_all[np.random.permutation(indices_class[c])[:ipc]] for c in range(ds.num_classes)]
    image_syn = torch.cat(init).detach().clone().requires_grad_(True)
    optimizer_img = torch.optim.SGD([image_syn], lr=1.0, momentum=0.5)
    times = []
    for it in range(iterations):
        start = time.perf_counter()
        net = build_network("convnet", 1, ds.num_classes, 28, seed=it)
        net.train()
        for param in net.parameters():
            param.requires_grad = False
        embed = net.embed
        loss = torch.tensor(0.0)
        for c in range(ds.num_classes):
            img_real = images_all[np.random.permutation(indices_class[c])[:batch_real]]
            img_syn = image_syn[c * ipc : (c + 1) * ipc].reshape((ipc, 1, 28, 28))
            seed = int(time.time() * 1000) % 100000
            img_real = diff_augment(img_real, DM_STRATEGY, seed=seed)
            img_syn = diff_augment(img_syn, DM_STRATEGY, seed=seed)
            output_real = embed(img_real).detach()
            output_syn = embed(img_syn)
            loss = loss + torch.sum((torch.mean(output_real, dim=0) - torch.mean(output_syn, dim=0)) ** 2)
        optimizer_img.zero_grad()
        loss.backward()
        optimizer_img.step()
        times.append(time.perf_counter() - start)
    return times


# ---------------------------------------------------------------------------- ours: the real methods
def _ours(method: str, ipc: int, params: dict, iterations: int, threads: int) -> list[float]:
    """Run the registered method for ``iterations`` and time each iteration through the progress sink."""
    torch, ds = _setup(threads)
    from distill.methods.base import RunContext
    from distill.methods.registry import get_method, parse_params

    stamps: list[float] = []

    def sink(stage: str, fraction: float, message: str | None = None) -> None:
        if stage == "distill":
            stamps.append(time.perf_counter())

    cls = get_method(method)
    ctx = RunContext(dataset=ds, ipc=ipc, seed=0, progress_sink=sink)
    cls().run(ctx, parse_params(cls, {**params, "iterations": iterations}))
    # stamps: one at start (0.0), one per iteration start (i / n, i >= 1 when every == 1), one at 1.0
    return [b - a for a, b in zip(stamps[:-1], stamps[1:], strict=True)][-iterations:]


def ours_dc(iterations: int, threads: int, precision: str, compile_real: str = "off") -> list[float]:
    params = {"batch_real": 256, "init": "noise", "real_precision": precision, "compile_real": compile_real}
    return _ours("dc", 1, params, iterations, threads)


def ours_dm(iterations: int, threads: int, precision: str, compile_real: str = "off") -> list[float]:
    params = {"batch_real": 256, "init": "real", "lr_img": 1.0, "dsa_strategy": DM_STRATEGY, "real_precision": precision,
              "compile_real": compile_real}
    return _ours("dm", 10, params, iterations, threads)


# ---------------------------------------------------------------------------- harness
def _child(fn: Callable, args: tuple, queue) -> None:
    times = fn(*args)
    queue.put((times, _peak_rss_gib()))


def measure(fn: Callable, *args) -> tuple[list[float], float]:
    """Run ``fn(*args)`` in a fresh process; return its iteration times and its peak RSS (GiB)."""
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    proc = ctx.Process(target=_child, args=(fn, args, queue))
    proc.start()
    while True:
        try:
            result = queue.get(timeout=5)
            break
        except queue_module.Empty:
            if not proc.is_alive():
                raise RuntimeError(f"{fn.__name__} exited with code {proc.exitcode}") from None
    proc.join()
    return result


def _part(setting: str, reference, ours, iterations: int, threads: int) -> list[tuple[str, str, list[float], float]]:
    """The reference-equivalent loop, then ours in each precision / compile combination, one setting."""
    rows = [(setting, "reference-equivalent loop (fp32, per class)", *measure(reference, iterations, threads))]
    for precision, compile_real in (("fp32", "off"), ("fp32", "on"), ("auto", "off"), ("auto", "on")):
        impl = f"ours, real_precision {precision}, compile_real {compile_real}"
        rows.append((setting, impl, *measure(ours, iterations, threads, precision, compile_real)))
    return rows


def part_dc(iterations: int, threads: int) -> list[tuple[str, str, list[float], float]]:
    return _part("DC, MNIST, IPC 1, batch_real 256/class, ConvNet-3 IN", reference_dc, ours_dc, iterations, threads)


def part_dm(iterations: int, threads: int) -> list[tuple[str, str, list[float], float]]:
    return _part("DM, MNIST, IPC 10, batch_real 256/class, ConvNet-3 IN, DSA", reference_dm, ours_dm, iterations,
                 threads)


PARTS: dict[str, Callable[[int, int], list[tuple[str, str, list[float], float]]]] = {"dc": part_dc, "dm": part_dm}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--parts", default=",".join(PARTS), help=f"comma-separated, from {', '.join(PARTS)}")
    parser.add_argument("--iterations", type=int, default=4,
                        help="iterations per implementation; the first is reported apart (warm-up, compilation), "
                             "the median of the others is the figure")
    parser.add_argument("--threads", type=int, default=2, help="torch threads (the reference timings used 2)")
    args = parser.parse_args()
    os.environ.setdefault("OMP_NUM_THREADS", str(args.threads))
    if args.iterations < 2:
        parser.error("--iterations must be >= 2 (the first one is warm-up)")
    import torch

    bf16 = "native bf16 kernels" if torch.ops.mkldnn._is_mkldnn_bf16_supported() else "no native bf16 kernels"
    print(f"device: CPU {os.cpu_count()} cores ({bf16}), {args.threads} torch threads; {args.iterations} iterations "
          "each, first one (warm-up incl. compilation) reported apart\n")
    print("| setting | implementation | first iteration s | s/iteration median (2nd..) | peak RSS GiB "
          "| speed-up vs reference loop |")
    print("|---|---|---|---|---|---|")
    for name in args.parts.split(","):
        rows = PARTS[name.strip()](args.iterations, args.threads)
        base = statistics.median(rows[0][2][1:])
        for setting, impl, times, rss in rows:
            med = statistics.median(times[1:])
            print(f"| {setting} | {impl} | {times[0]:.2f} | {med:.2f} | {rss:.2f} | {base / med:.2f}x |", flush=True)


if __name__ == "__main__":
    main()
