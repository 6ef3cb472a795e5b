"""Teacher training throughput on an on-disk, ImageNet-shaped set: does the teacher keep up with its loader?

    python bench/teacher_speed.py --data /tmp/synthetic-imagenet-teacher --classes 10 --per-class 60 --size 32
    python bench/teacher_speed.py --device cuda --model resnet18 --size 224 --workers 12 --batch-size 256 \
        --per-class 100   # a GPU host: the loader is the bound there

The teacher (``distill.teacher.train_on_split``, what ``labels=teacher``, ``features=teacher`` and soft-label
evaluation train) reads its batches through the streaming loader. Rows, on the same JPEGs (ImageNet's ~500 x 375,
written by ``bench/synthetic_imagenet.py`` if ``--data`` has none) and the same batches:

- serial decode: ``split.load`` in this process, the input of a teacher without the loader;
- loader alone: ``ImageStream`` with ``--workers`` processes, nothing consuming but the count;
- model alone: the same training on the images already decoded (an in-memory split), no loader;
- teacher: ``train_on_split`` on the files, loader and training overlapped;
- teacher decoding in its own process: the same with no loader process (decode, then train, in turn).

Target: teacher >= 0.8 x the slower of (loader alone, model alone); where the model is cheap next to the decode
(a GPU) that is "within 0.8 x of the loader's own rate". Overlap needs a free core for each loader process
beside the training process: on a host whose cores are all busy the teacher runs at the rate of decode and
training one after the other, whatever the loader does (the header prints the load average). Each variant runs
one epoch per repeat (loader start-up included, as in training), variants rotated per repeat, best reported.
Prints a markdown table; one JSON line per row on stderr.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=Path("/tmp/synthetic-imagenet-teacher"))
    parser.add_argument("--classes", type=int, default=10)
    parser.add_argument("--per-class", type=int, default=60)
    parser.add_argument("--size", type=int, default=32, help="training resolution (short-side resize + centre crop)")
    parser.add_argument("--model", default="convnet", help="teacher network")
    parser.add_argument("--workers", type=int, default=1, help="loader processes")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=2, help="timed epochs per variant; the best is reported")
    parser.add_argument("--device", default="cpu", help="where the teacher trains (cpu, cuda)")
    args = parser.parse_args()

    os.environ.setdefault("OMP_NUM_THREADS", "1")
    import torch

    torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))
    from bench.synthetic_imagenet import generate
    from distill.data import readers
    from distill.data.loader import ImageStream
    from distill.data.registry import ArraySplit, Dataset, FileSplit
    from distill.teacher import train_on_split

    if len(list((args.data / "train").rglob("*.JPEG"))) < args.classes * args.per_class:
        generate(args.data, args.classes, args.per_class, 0, seed=0, quiet=True)
    classes, files, labels = readers.list_imagefolder(args.data / "train")
    files_split = FileSplit(args.data / "train", files, labels, args.size, 3)
    n = len(files_split)

    def dataset(split) -> Dataset:
        return Dataset(name="bench", classes=classes, channels=3, image_size=args.size, mean=(0.5,) * 3,
                       std=(0.25,) * 3, train=split, test=split)

    on_disk = dataset(files_split)
    in_memory = dataset(ArraySplit(files_split.load(range(n)).numpy(), labels))
    device = torch.device(args.device)

    def serial() -> float:
        start = time.perf_counter()
        for s in range(0, n, args.batch_size):
            files_split.load(range(s, min(n, s + args.batch_size)))
        return time.perf_counter() - start

    def loader() -> float:
        start = time.perf_counter()
        count = sum(len(idx) for idx, _ in ImageStream(files_split, batch_size=args.batch_size, num_workers=args.workers))
        assert count == n
        return time.perf_counter() - start

    def train(ds: Dataset, workers: int | None) -> float:
        start = time.perf_counter()
        train_on_split(ds, args.model, 1, 0, device, batch_size=args.batch_size, num_workers=workers)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        return time.perf_counter() - start

    variants = {
        "serial decode (this process)": serial,
        f"loader alone ({args.workers} process{'es' if args.workers > 1 else ''})": loader,
        "model alone (decoded images in memory)": lambda: train(in_memory, 0),
        "teacher through the loader": lambda: train(on_disk, args.workers),
        "teacher decoding in its own process (no loader processes)": lambda: train(on_disk, 0),
    }
    names = list(variants)
    times: dict[str, list[float]] = {name: [] for name in names}
    for r in range(args.repeats):
        for name in names[r % len(names):] + names[: r % len(names)]:
            times[name].append(variants[name]())
    report(args, n, device, {name: n / min(times[name]) for name in names})


def report(args: argparse.Namespace, n: int, device, rates: dict[str, float]) -> None:
    """The markdown table (stdout), one JSON line per row (stderr) and the verdict against the target."""
    names = list(rates)
    loader_rate, model_rate, teacher_rate = rates[names[1]], rates[names[2]], rates[names[3]]
    bound = min(loader_rate, model_rate)
    print(f"{n} JPEGs ({args.classes} classes) -> {args.size} px, {args.model} on {device}, batch {args.batch_size}, "
          f"{args.workers} loader process(es), OMP_NUM_THREADS={os.environ['OMP_NUM_THREADS']}, "
          f"{os.cpu_count()} cores visible (load average {os.getloadavg()[0]:.1f}), best of {args.repeats}\n")
    print("| variant | images/s | / loader alone | / min(loader, model) |")
    print("|---|---|---|---|")
    for name in names:
        print(f"| {name} | {rates[name]:.1f} | {rates[name] / loader_rate:.2f} | {rates[name] / bound:.2f} |")
        print(json.dumps({"variant": name, "images_per_s": round(rates[name], 2), "images": n, "size": args.size,
                          "model": args.model, "workers": args.workers, "batch_size": args.batch_size}), file=sys.stderr)
    verdict = "meets" if teacher_rate >= 0.8 * bound else "misses"
    print(f"\nteacher / min(loader, model) = {teacher_rate / bound:.2f} ({verdict} the 0.8 target); "
          f"teacher / loader alone = {teacher_rate / loader_rate:.2f}")

if __name__ == "__main__":
    main()
