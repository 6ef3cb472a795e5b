"""Loader throughput: the streaming ImageStream with 1 and 2 worker processes vs a bare decode + resize loop.

    python bench/loader.py --data /tmp/synthetic-imagenet --classes 10 --per-class 40 --size 256 --workers 1 2

Same files, same decode (``readers.load_image``: PIL decode, short-side bicubic resize, centre crop), one run,
the order of the variants rotated per repeat so a busy host's drift hits all of them. The synthetic set
(``bench/synthetic_imagenet.py``, ImageNet's ~500 x 375 JPEGs) is written first if ``--data`` has none.
Reported: images/s, and per loader process relative to the bare loop (target >= 0.8: the pipeline costs
little beyond the decode it parallelises). Prints a markdown table; one JSON line per row on stderr.

``--encode`` adds the overlap check of the latent-cache encode (TAEF2 at ``--encode-resolution``): load time
alone (the stream), model time alone (encoding already decoded batches) and the real
``quantize.latent_cache.encode_shards`` with ``--encode-workers`` loader processes; target: encode wall time
<= 1.15 x max(load, model).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=Path("/tmp/synthetic-imagenet-bench"))
    parser.add_argument("--classes", type=int, default=10)
    parser.add_argument("--per-class", type=int, default=40)
    parser.add_argument("--size", type=int, default=256, help="output resolution (short-side resize + centre crop)")
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=3, help="timed passes per variant; the best is reported")
    parser.add_argument("--encode", action="store_true", help="also the encode overlap check (needs TAEF2 weights)")
    parser.add_argument("--encode-resolution", type=int, default=128)
    parser.add_argument("--encode-workers", type=int, default=1)
    args = parser.parse_args()

    os.environ.setdefault("OMP_NUM_THREADS", "1")
    import torch

    torch.set_num_threads(1)
    from bench.synthetic_imagenet import generate
    from distill.data import readers
    from distill.data.loader import ImageStream
    from distill.data.registry import FileSplit

    if not (args.data / "train").is_dir() or len(list((args.data / "train").rglob("*.JPEG"))) < args.classes * args.per_class:
        generate(args.data, args.classes, args.per_class, 0, seed=0)
    _, files, labels = readers.list_imagefolder(args.data / "train")
    split = FileSplit(args.data / "train", files, labels, args.size, 3)
    n = len(split)

    def bare() -> float:
        start = time.perf_counter()
        for rel in split.files:
            readers.load_image(split.root / rel, split.size, split.channels)
        return time.perf_counter() - start

    def streamed(workers: int) -> float:
        start = time.perf_counter()
        count = sum(len(idx) for idx, _ in ImageStream(split, batch_size=args.batch_size, num_workers=workers))
        assert count == n
        return time.perf_counter() - start

    variants = [("bare loop (this process)", 1, bare)] + [
        (f"ImageStream, {w} loader process{'es' if w > 1 else ''}", w, (lambda w=w: streamed(w))) for w in args.workers
    ]
    times: dict[str, list[float]] = {name: [] for name, _, _ in variants}
    for r in range(args.repeats):
        for name, _, run in variants[r % len(variants):] + variants[: r % len(variants)]:
            times[name].append(run())
    bare_rate = n / min(times[variants[0][0]])
    print(f"{n} JPEGs of {args.data} -> {args.size} px, {os.cpu_count()} cores visible, best of {args.repeats}, "
          f"{time.strftime('%Y-%m-%d')}\n")
    print("| variant | processes | images/s | per process / bare loop |")
    print("|---|---|---|---|")
    for name, procs, _ in variants:
        rate = n / min(times[name])
        print(f"| {name} | {procs} | {rate:.1f} | {rate / procs / bare_rate:.2f} |")
        print(json.dumps({"variant": name, "processes": procs, "images_per_s": round(rate, 2),
                          "per_process_vs_bare": round(rate / procs / bare_rate, 3), "images": n, "size": args.size,
                          "median_s": round(float(np.median(times[name])), 3)}), file=sys.stderr)
    if args.encode:
        encode_overlap(split, args)


def encode_overlap(split, args) -> None:
    """Encode wall time against max(load alone, model alone) on the same files."""
    import tempfile

    from distill.data.loader import ImageStream
    from distill.data.registry import split_at_size
    from quantize.encoders import load_encoder
    from quantize.latent_cache import encode_shards

    split = split_at_size(split, args.encode_resolution)
    encoder = load_encoder("taef2", image_size=args.encode_resolution, resolution=args.encode_resolution,
                           batch_size=args.batch_size)
    chunks = [np.arange(s, min(len(split), s + args.batch_size)) for s in range(0, len(split), args.batch_size)]
    start = time.perf_counter()
    batches = [x for _, x in ImageStream(split, batches=chunks, num_workers=args.encode_workers)]
    load_s = time.perf_counter() - start
    start = time.perf_counter()
    for x in batches:
        encoder.encode(x.float().div_(255.0))
    model_s = time.perf_counter() - start
    del batches
    with tempfile.TemporaryDirectory() as folder:
        start = time.perf_counter()
        encode_shards(Path(folder), {0: np.arange(len(split))}, split, encoder, num_workers=args.encode_workers)
        encode_s = time.perf_counter() - start
    ratio = encode_s / max(load_s, model_s)
    print(f"\nencode overlap ({len(split)} images, TAEF2 at {args.encode_resolution} px, {args.encode_workers} loader "
          f"process(es), 1 torch thread): load alone {load_s:.1f} s, model alone {model_s:.1f} s, encode "
          f"{encode_s:.1f} s = {ratio:.2f} x max(load, model) (target <= 1.15)")
    print(json.dumps({"variant": "encode overlap", "load_s": round(load_s, 2), "model_s": round(model_s, 2),
                      "encode_s": round(encode_s, 2), "ratio": round(ratio, 3)}), file=sys.stderr)


if __name__ == "__main__":
    main()
