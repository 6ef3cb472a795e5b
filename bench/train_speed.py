"""Seconds of the training workloads on the reference-exact path and on each fast path, side by side.

Workloads (rows), for ConvNet at 28, 32, 64 and 128 px and ResNet-18 at 128 and 224 px, 10 classes:
- ``epoch-ipc10`` / ``epoch-ipc50``: one evaluation epoch of :func:`distill.evaluate.train_student_dc` (batch 256,
  micro-batches from the 2 GiB activation budget, DSA augmentation, SGD momentum 0.9) on 100 / 500 images;
- ``test-2000``: one test pass over 2,000 images in the test batch evaluation sizes from the same budget;
- ``dm-iter``: one DM iteration (:mod:`pixelspace.dm`: fresh frozen ConvNet, Siamese DSA per class, the real
  side graph-free in ``matching_loss``, the synthetic side with a graph, image step), IPC 10; ConvNet only;
- ``teacher-epoch``: one epoch of teacher training (batch 256, DSA) over 5,000 images.

Paths (columns): ``ref`` is eager fp32 on a contiguous NCHW model, the reference-exact path; the others are
:func:`distill.fastpath.prepare` settings (bf16 autocast, channels_last, torch.compile). For DM, precision and
compile are dm.py's own ``real_precision`` / ``compile_real`` (bf16 and compile of the real side); DM has no
channels_last path. Each cell is the minimum over ``--repeats`` timed calls, the paths interleaved within each
repeat so that a change in host load hits them alike; the first call of each path is a warm-up (for a compiled
path it includes the compilation, reported as ``compile s`` with the number of row units after which it pays back
against the same path without compile, or against ref when that path is not in the run). A call times at most a
size-dependent number of images (the ``timed`` column); a row's seconds are that call's seconds times images /
timed images (one step's cost is linear in the images on one thread). The ``accuracy`` row trains one ConvNet per
path on MNIST (10 real images per class, the evaluation protocol, ``--acc-epochs``) and tests it (eager, under the
path's precision and layout) on 1,000 test images, so a path that loses accuracy shows.

With ``--device cuda`` the same rows run on the GPU (the GPU kit's call, bench/gpu_run.sh): every call times the
row's whole workload (no cap), micro-batches and test batches come from the device's free memory, and each
timed call ends with a device synchronisation.

Usage: python bench/train_speed.py [--quick] [--sizes convnet:28,resnet18:128] [--rows epoch-ipc10,test-2000]
       [--paths ref,bf16,...] [--repeats 3] [--device cpu|cuda] [--out bench/results/train_speed-NAME.md]
Prints one markdown table; one torch thread.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", tempfile.mkdtemp(prefix="train-speed-inductor-"))  # cold compiles
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
from torch.nn import functional as F  # noqa: E402

from distill.augment import augment_for_training, strategy_for  # noqa: E402
from distill.evaluate import activation_bytes, batch_for  # noqa: E402
from distill.fastpath import FastPath, prepare  # noqa: E402
from distill.nets import build_network  # noqa: E402
from distill.precision import bf16_fast_on  # noqa: E402
from distill.training import memory_budget_gb  # noqa: E402

CLASSES = 10
MEMORY_GB = 2.0  # evaluation's default activation budget (micro-batches and test batch)
TRAIN_BATCH = 256  # evaluation's and teacher training's batch


@dataclass(frozen=True)
class Path_:
    precision: str
    channels_last: bool
    compile: bool


PATHS = {
    "ref": Path_("fp32", False, False),
    "bf16": Path_("bf16", False, False),
    "bf16+cl": Path_("bf16", True, False),
    "bf16+compile": Path_("bf16", False, True),
    "fp32+cl": Path_("fp32", True, False),
    "fp32+compile": Path_("fp32", False, True),
    "bf16+cl+compile": Path_("bf16", True, True),
}
DEFAULT_PATHS = ["ref", "bf16", "bf16+cl", "bf16+compile"]
CONFIGS = [("convnet", 28), ("convnet", 32), ("convnet", 64), ("convnet", 128), ("resnet18", 128), ("resnet18", 224)]
ROWS = ["epoch-ipc10", "epoch-ipc50", "test-2000", "dm-iter", "teacher-epoch"]
# Images one timed training call runs at most (about a second or two of fp32 on one core); tests run 3x as many.
TIMED_CAP = {("convnet", 28): 256, ("convnet", 32): 256, ("convnet", 64): 100, ("convnet", 128): 32,
             ("resnet18", 128): 32, ("resnet18", 224): 16}
DM_BATCH_REAL = {28: 256, 32: 256, 64: 64, 128: 16}  # real images per class of one DM iteration (dm.py: 256)
QUICK = {"sizes": "convnet:28", "rows": "epoch-ipc10,test-2000", "repeats": 1, "cap": 16, "acc_epochs": 1,
         "acc_test": 100}


DEVICE = torch.device("cpu")  # --device


def synchronize() -> None:
    if DEVICE.type == "cuda":
        torch.cuda.synchronize(DEVICE)


def memory_gb() -> float:
    """The activation budget the evaluation uses on DEVICE (2 GiB on a CPU, from free memory on CUDA)."""
    return MEMORY_GB if DEVICE.type == "cpu" else memory_budget_gb(DEVICE)


def channels_of(size: int) -> int:
    return 1 if size == 28 else 3


def normalize(x: torch.Tensor) -> torch.Tensor:
    return (x - 0.5) / 0.25


# ---------------------------------------------------------------------------- one timed unit per workload
@dataclass
class Unit:
    """What one row times: ``setup(path) -> state`` once per path, ``run(state)`` per timed call, and how the
    timed call scales to the row's workload (``images`` / ``timed`` images)."""

    images: int
    timed: int
    setup: Callable[[Path_], object]
    run: Callable[[object], None]
    supports: Callable[[Path_], bool] = lambda path: True


def _student(net: str, size: int, path: Path_, seed: int = 0) -> tuple[FastPath, torch.optim.Optimizer]:
    model = build_network(net, channels_of(size), CLASSES, size, seed=seed).to(DEVICE)
    fast = prepare(model, DEVICE, path.precision, path.compile, path.channels_last)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, weight_decay=0.0005)
    return fast, optimizer


def train_unit(net: str, size: int, images: int, micro: int, augment: str, cap: int) -> Unit:
    """One optimiser step on ``timed`` images as train_student_dc / train_on_split take it: per micro-batch
    normalise, augment, forward under the path, fp32 loss, backward; then the step."""
    timed = min(images, TRAIN_BATCH, cap)
    gen = torch.Generator().manual_seed(1)
    x_all = torch.rand(timed, channels_of(size), size, size, generator=gen).to(DEVICE)
    y_all = torch.randint(0, CLASSES, (timed,), generator=gen).to(DEVICE)

    def setup(path: Path_) -> object:
        fast, optimizer = _student(net, size, path)
        fast.model.train()
        return fast, optimizer, torch.Generator().manual_seed(0)

    def run(state: object) -> None:
        fast, optimizer, generator = state  # type: ignore[misc]
        optimizer.zero_grad(set_to_none=True)
        for part in torch.arange(timed).split(micro):
            x = augment_for_training(normalize(x_all[part]), augment, generator)
            loss = F.cross_entropy(fast.logits(x), y_all[part]) * (len(part) / timed)
            loss.backward()
        optimizer.step()

    return Unit(images, timed, setup, run)


def test_unit(net: str, size: int, images: int, cap: int) -> Unit:
    batch = batch_for(memory_gb(), activation_bytes(net, channels_of(size), size, False), 500)
    timed = min(batch, 3 * cap)
    x = torch.rand(timed, channels_of(size), size, size, generator=torch.Generator().manual_seed(2)).to(DEVICE)

    def setup(path: Path_) -> object:
        fast, _ = _student(net, size, path)
        fast.model.eval()
        return fast

    def run(state: object) -> None:
        fast: FastPath = state  # type: ignore[assignment]
        with torch.no_grad():
            fast.logits(normalize(x)).argmax(1)

    return Unit(images, timed, setup, run)


def dm_unit(size: int, ipc: int = 10) -> Unit:
    """One iteration of pixelspace.dm's loop body (non-BN branch) on random "real" images."""
    from pixelspace.dm import augment_classes, matching_loss
    from pixelspace.realpass import RealPass, real_embed_pass
    from pixelspace.synthetic import image_optimizer

    batch_real = DM_BATCH_REAL[size]
    ch = channels_of(size)
    gen = torch.Generator().manual_seed(3)
    pool = normalize(torch.rand(CLASSES, 2 * batch_real, ch, size, size, generator=gen)).to(DEVICE)
    strategy = strategy_for(size == 28)

    def setup(path: Path_) -> object:
        dtype = torch.bfloat16 if path.precision == "bf16" else None
        embed = None
        if path.compile:
            template = build_network("convnet", ch, CLASSES, size, seed=0).to(DEVICE)
            embed = RealPass(real_embed_pass(template, dtype), compile=True)
        syn = pool[:, :ipc].reshape(-1, ch, size, size).clone().requires_grad_(True)
        return dtype, embed, syn, image_optimizer(syn, 1.0), torch.Generator().manual_seed(4), [0]

    def run(state: object) -> None:
        dtype, embed, syn_all, optimizer, generator, counter = state  # type: ignore[misc]
        counter[0] += 1
        net = build_network("convnet", ch, CLASSES, size, seed=counter[0]).to(DEVICE)
        net.train()
        for p in net.parameters():
            p.requires_grad_(False)
        picks = torch.stack([torch.randperm(2 * batch_real, generator=generator)[:batch_real] for _ in range(CLASSES)])
        real = torch.stack([pool[c, picks[c]] for c in range(CLASSES)])
        syn = syn_all.view(CLASSES, ipc, ch, size, size)
        seeds = [int(torch.randint(0, 2**31 - 1, (1,), generator=generator)) for _ in range(CLASSES)]
        real, syn = augment_classes(real, syn, strategy, seeds)
        loss = matching_loss(net, real, syn, 512, dtype, embed)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    return Unit(1, 1, setup, run, supports=lambda path: not path.channels_last)


def make_unit(row: str, net: str, size: int, cap: int | None = None) -> Unit | None:
    cap = cap or (TIMED_CAP[(net, size)] if DEVICE.type == "cpu" else 5000)  # CUDA: the whole workload
    digits = size == 28
    micro = batch_for(memory_gb(), activation_bytes(net, channels_of(size), size, True), TRAIN_BATCH)
    if row == "epoch-ipc10":
        return train_unit(net, size, 10 * CLASSES, micro, strategy_for(digits), cap)
    if row == "epoch-ipc50":
        return train_unit(net, size, 50 * CLASSES, micro, strategy_for(digits), cap)
    if row == "test-2000":
        return test_unit(net, size, 2000, cap)
    if row == "dm-iter":
        return dm_unit(size) if net == "convnet" else None
    if row == "teacher-epoch":
        return train_unit(net, size, 5000, TRAIN_BATCH, strategy_for(digits), cap)  # train_on_split: no micro-batches
    raise ValueError(row)


@dataclass
class Cell:
    seconds: float  # the row's workload, scaled from the best timed call
    warmup: float  # seconds the first (warm-up / compiling) call took beyond the best one, unscaled


def measure(unit: Unit, paths: list[str], repeats: int) -> dict[str, Cell]:
    """Warm-up call per path, then ``repeats`` rounds over the paths; min per path, scaled to the workload."""
    paths = [name for name in paths if unit.supports(PATHS[name])]
    states = {}
    first = {}
    for name in paths:
        torch.manual_seed(0)
        states[name] = unit.setup(PATHS[name])
        start = time.perf_counter()
        unit.run(states[name])
        synchronize()
        first[name] = time.perf_counter() - start
    best = dict.fromkeys(paths, float("inf"))
    for _ in range(repeats):
        for name in paths:
            start = time.perf_counter()
            unit.run(states[name])
            synchronize()
            best[name] = min(best[name], time.perf_counter() - start)
    scale = unit.images / unit.timed
    return {name: Cell(best[name] * scale, max(0.0, first[name] - best[name])) for name in paths}


# ---------------------------------------------------------------------------- accuracy of each path
def accuracy(path: Path_, epochs: int, test_images: int) -> float:
    """MNIST, 10 random real images per class (seed 0), ConvNet, train_student_dc's protocol (SGD m 0.9, wd 5e-4,
    lr 0.01, x0.1 at E//2+1 of E+1 epochs, DSA for digits), tested on ``test_images`` stratified test images."""
    import numpy as np

    from distill.data import get_dataset
    from distill.evaluate import _test_indices

    ds = get_dataset("mnist")
    rng = np.random.default_rng(0)
    picks = np.concatenate([np.sort(rng.choice(ds.train.class_indices(c), 10, replace=False)) for c in range(CLASSES)])
    x_all = ds.train.load(picks).float().div_(255.0)
    y_all = torch.from_numpy(ds.train.labels[picks]).long()
    fast, optimizer = _student("convnet", 28, path, seed=0)
    fast.model.train()
    generator = torch.Generator().manual_seed(0)
    strategy = strategy_for(True)
    for epoch in range(epochs + 1):
        if epoch == epochs // 2 + 1:
            for group in optimizer.param_groups:
                group["lr"] *= 0.1
        order = torch.randperm(len(x_all), generator=generator)
        for start in range(0, len(order), TRAIN_BATCH):
            part = order[start : start + TRAIN_BATCH]
            optimizer.zero_grad(set_to_none=True)
            x = augment_for_training(ds.normalize(x_all[part]), strategy, generator)
            F.cross_entropy(fast.logits(x), y_all[part]).backward()
            optimizer.step()
    fast.model.eval()
    indices = _test_indices(ds, test_images, 0)
    correct = 0
    with torch.no_grad():
        for start in range(0, len(indices), 500):
            chunk = indices[start : start + 500]
            x = ds.normalize(ds.test.load(chunk).float().div_(255.0))
            with fast.autocast():  # eager under the path's precision and layout: one compile less per path
                pred = fast.model(fast.input(x)).argmax(1)
            correct += int((pred == torch.from_numpy(ds.test.labels[chunk])).sum())
    return 100.0 * correct / len(indices)


# ---------------------------------------------------------------------------- table
def cpu_model() -> str:
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, timeout=10).stdout
    except (OSError, subprocess.SubprocessError):
        out = ""
    for line in out.splitlines():
        if line.startswith("Model name:"):
            return line.split(":", 1)[1].strip()
    return "unknown CPU"


def columns(paths: list[str]) -> list[str]:
    """The table's header cells: row identity, then seconds (and ratio to ref) per path, then compile columns."""
    cols = ["network", "px", "workload", "timed"]
    for name in paths:
        cols.append(f"{name} s" if name == "ref" else f"{name} s (x ref)")
    if any(PATHS[name].compile for name in paths):
        cols += ["compile s", "compile pays after"]
    return cols


def format_row(net: str, size: int, row: str, unit: Unit, cells: dict[str, Cell], paths: list[str]) -> list[str]:
    ref = cells.get("ref")
    out = [net, str(size), row if row != "dm-iter" else f"dm-iter (real {DM_BATCH_REAL[size]}/class)",
           f"{unit.timed}/{unit.images}" if unit.timed != unit.images else str(unit.images)]
    for name in paths:
        if name not in cells:
            out.append("—")
            continue
        cell = cells[name]
        ratio = f" ({ref.seconds / cell.seconds:.2f}x)" if ref is not None and name != "ref" else ""
        out.append(f"{cell.seconds:.3f}{ratio}")
    compiled = [name for name in paths if PATHS[name].compile]
    if compiled:
        comp = []
        pays = []
        for name in compiled:
            if name not in cells:
                comp.append("—")
                pays.append("—")
                continue
            spent = cells[name].warmup
            eager_name = {"fp32": "ref"}.get(name.replace("+compile", ""), name.replace("+compile", ""))
            eager = cells.get(eager_name, cells.get("ref"))  # the same path without compile, else ref
            comp.append(f"{spent:.1f}")
            gain = (eager.seconds - cells[name].seconds) if eager is not None else 0.0
            pays.append(f"{spent / gain:.0f} {row_units(row)}" if gain > 0 else "never")
        out += [" / ".join(comp), " / ".join(pays)]
    return out


def row_units(row: str) -> str:
    return {"test-2000": "passes", "dm-iter": "iterations"}.get(row, "epochs")


def parse_sizes(text: str) -> list[tuple[str, int]]:
    configs = []
    for item in text.split(","):
        net, _, size = item.strip().partition(":")
        if not size.isdigit() or (net, int(size)) not in TIMED_CAP:
            raise SystemExit(f"unknown size '{item}'; known: {', '.join(f'{n}:{s}' for n, s in CONFIGS)}")
        configs.append((net, int(size)))
    return configs


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="ConvNet 28 px, three rows, short accuracy (a test)")
    parser.add_argument("--sizes", default=None, help="network:px list, e.g. convnet:64,resnet18:128")
    parser.add_argument("--rows", default=None, help=f"comma-separated from {', '.join(ROWS)}")
    parser.add_argument("--paths", default=",".join(DEFAULT_PATHS), help=f"comma-separated from {', '.join(PATHS)}")
    parser.add_argument("--repeats", type=int, default=None, help="timed calls per cell (min is reported); default 3")
    parser.add_argument("--acc-epochs", type=int, default=None, help="epochs of the accuracy row (0: no accuracy row)")
    parser.add_argument("--acc-test", type=int, default=None, help="test images of the accuracy row (default 1000)")
    parser.add_argument("--cap", type=int, default=None, help="images per timed training call (default by size)")
    parser.add_argument("--out", type=Path, default=None, help="also write the header and table to this file")
    parser.add_argument("--device", default="cpu", help="cpu, or cuda / cuda:N (the GPU kit)")
    args = parser.parse_args(argv)
    global DEVICE
    DEVICE = torch.device(args.device)
    if DEVICE.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("error: --device cuda but torch sees no CUDA device")
    quick = QUICK if args.quick else {}
    configs = parse_sizes(args.sizes or quick.get("sizes") or ",".join(f"{n}:{s}" for n, s in CONFIGS))
    rows = (args.rows or quick.get("rows") or ",".join(ROWS)).split(",")
    paths = args.paths.split(",")
    bad = [r for r in rows if r not in ROWS] + [p for p in paths if p not in PATHS]
    if bad:
        raise SystemExit(f"unknown rows or paths: {', '.join(bad)}")
    if "ref" not in paths:
        paths.insert(0, "ref")
    repeats = args.repeats or quick.get("repeats") or 3
    acc_epochs = args.acc_epochs if args.acc_epochs is not None else quick.get("acc_epochs", 100)
    acc_test = args.acc_test or quick.get("acc_test") or 1000
    torch.set_num_threads(1)
    load_before = os.getloadavg()
    where = f"CPU: {cpu_model()}" if DEVICE.type == "cpu" else f"GPU: {torch.cuda.get_device_name(DEVICE)}"
    header = [f"{where}; native bf16 (bf16_fast_on): {bf16_fast_on(DEVICE)}; torch {torch.__version__}, "
              f"{torch.get_num_threads()} CPU thread; min of {repeats} timed calls per cell",
              f"load average before: {' '.join(f'{v:.2f}' for v in load_before)}", ""]
    print("\n".join(header), flush=True)
    cols = columns(paths)
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    print("\n".join(lines), flush=True)
    for net, size in configs:
        for row in rows:
            unit = make_unit(row, net, size, args.cap or quick.get("cap"))
            if unit is None:
                continue
            cells = measure(unit, paths, repeats)
            line = "| " + " | ".join(format_row(net, size, row, unit, cells, paths)) + " |"
            lines.append(line)
            print(line, flush=True)
    if acc_epochs > 0:
        accs = {name: accuracy(PATHS[name], acc_epochs, acc_test) for name in paths}
        cells_text = [f"{accs[name]:.1f}%" for name in paths]
        extra = ["", ""] if any(PATHS[name].compile for name in paths) else []
        line = "| " + " | ".join(["convnet", "28", f"accuracy (MNIST IPC 10, {acc_epochs} ep)", str(acc_test),
                                  *cells_text, *extra]) + " |"
        lines.append(line)
        print(line, flush=True)
    footer = f"\nload average after: {' '.join(f'{v:.2f}' for v in os.getloadavg())}"
    print(footer, flush=True)
    if args.out is not None:
        from distill.files import atomic_write_text

        atomic_write_text(args.out, "\n".join(header + lines) + "\n" + footer + "\n")


if __name__ == "__main__":
    main()
