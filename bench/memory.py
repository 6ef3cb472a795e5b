"""Peak memory and time of the data path's bounded parts on a synthetic ImageNet-shaped set.

    python bench/memory.py realpool --data DIR [--classes 10 --per-class 60 --image-size 160 --cache-mb 4]
    python bench/memory.py prior --rows 60000 --side 16 [--iterations 20]
    python bench/memory.py sample-cache --data DIR [--classes 10 --per-class 30 --max-per-class 10]

Each prints one JSON line: wall seconds of the stages and ``peak_rss_mb`` / ``rss_growth_mb`` (ru_maxrss, and
its growth over the process after imports and data set-up). Run from another checkout's root (``cd
/path/to/other-checkout && python /path/to/bench/memory.py ...``) to measure that checkout's code: the script imports the
project from the current directory. Use a fresh ``DISTILL_HOME`` per run so no cache is reused by accident.
"""

from __future__ import annotations

import argparse
import importlib.util
import inspect
import json
import os
import resource
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, os.getcwd())  # measure the checkout we are run from


def _rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


class AnonPeak:
    """Peak anonymous resident memory (``RssAnon``: heap, tensors; not the page cache of memory-mapped files,
    which ru_maxrss counts too), sampled every 10 ms in a thread."""

    def __init__(self) -> None:
        self.peak = self.now()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    @staticmethod
    def now() -> float:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("RssAnon:"):
                return int(line.split()[1]) / 1024
        return 0.0

    def _run(self) -> None:
        while not self._stop.wait(0.01):
            self.peak = max(self.peak, self.now())

    def stop(self) -> float:
        self._stop.set()
        self._thread.join()
        return round(max(self.peak, self.now()), 1)


def _tree(data: Path, classes: int, per_class: int, size: float) -> None:
    spec = importlib.util.spec_from_file_location("synthetic_imagenet", Path(__file__).with_name("synthetic_imagenet.py"))
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules["synthetic_imagenet"] = module
    spec.loader.exec_module(module)
    module.generate(data, classes=classes, per_class=per_class, val_per_class=1, seed=0, workers=1, size_scale=size,
                    quiet=True)


def bench_realpool(args: argparse.Namespace) -> dict:
    import torch

    from distill.data import get_dataset
    from distill.methods.base import RunContext
    from pixelspace.realpool import RealPool

    _tree(args.data, args.classes, args.per_class, args.size)
    ds = get_dataset(f"imagefolder:{args.data}@{args.image_size}")
    ds.train.load([0])
    base = _rss_mb()
    anon = AnonPeak()
    anon_base = anon.peak
    ctx = RunContext(dataset=ds, ipc=1, seed=0)
    start = time.perf_counter()
    bounded = "cache_bytes" in inspect.signature(RealPool).parameters
    pool = RealPool(ctx, cache_bytes=int(args.cache_mb * 2**20)) if bounded and args.cache_mb is not None else RealPool(ctx)
    built = time.perf_counter() - start
    gen = torch.Generator().manual_seed(0)
    start = time.perf_counter()
    checksum = 0.0
    for _ in range(args.rounds):
        checksum += float(pool.sample_all(args.batch, gen).sum())
        checksum += float(pool.sample_mixed(args.batch * 2, gen)[0].sum())
    return {"bench": "realpool", "bounded_pool": bounded, "cache_mb": args.cache_mb,
            "images": len(ds.train), "image_size": ds.image_size,
            "split_mb": round(len(ds.train) * ds.channels * ds.image_size**2 / 2**20, 1),
            "construct_s": round(built, 2), "sampling_s": round(time.perf_counter() - start, 2),
            "rounds": args.rounds, "checksum": round(checksum, 3), "anon_before_mb": round(anon_base, 1),
            "peak_anon_mb": anon.stop(), "peak_rss_mb": round(_rss_mb(), 1), "rss_growth_mb": round(_rss_mb() - base, 1)}


def bench_prior(args: argparse.Namespace) -> dict:
    import numpy as np
    import torch

    from quantize.prior import PriorConfig, train_prior_on_latents

    path = Path(args.scratch) / f"latents-{args.rows}-{args.side}.npy"
    if not path.exists():
        rng = np.random.default_rng(0)
        out = np.lib.format.open_memmap(path, mode="w+", dtype=np.float16, shape=(args.rows, 4, args.side, args.side))
        for s in range(0, args.rows, 4096):
            out[s : s + 4096] = rng.standard_normal(out[s : s + 4096].shape).astype(np.float16)
        out.flush()
        del out
    labels = np.arange(args.rows) % 10
    mapped = np.load(path, mmap_mode="r")
    streaming = "LatentSource" in vars(sys.modules["quantize.prior"])
    # the code before streaming only takes a tensor: it gets the whole array (what load_dataset_latents gave it)
    source = mapped if streaming else torch.from_numpy(np.asarray(mapped))
    base = _rss_mb()
    anon = AnonPeak()
    anon_base = anon.peak
    start = time.perf_counter()
    result = train_prior_on_latents(source, torch.from_numpy(labels), 10, Path(args.scratch) / "prior-out",
                                    iterations=args.iterations, batch_size=64, seed=0, eval_size=64,
                                    config=PriorConfig(num_layers=1, num_attention_heads=2, attention_head_dim=16))
    return {"bench": "prior", "streaming": streaming, "rows": args.rows, "latent": [4, args.side, args.side],
            "fp16_mb": round(path.stat().st_size / 2**20, 1), "iterations": args.iterations,
            "train_s": round(time.perf_counter() - start, 2), "loss_sum": sum(result.losses),
            "anon_before_mb": round(anon_base, 1), "peak_anon_mb": anon.stop(),
            "peak_rss_mb": round(_rss_mb(), 1), "rss_growth_mb": round(_rss_mb() - base, 1)}


def bench_sample_cache(args: argparse.Namespace) -> dict:
    from quantize.latent_cache import latents_for_dataset

    _tree(args.data, args.classes, args.per_class, args.size)
    name = f"imagefolder:{args.data}"
    start = time.perf_counter()
    latents_for_dataset(name, "taef2", resolution=32)
    full_s = time.perf_counter() - start
    start = time.perf_counter()
    store = latents_for_dataset(name, "taef2", resolution=32, max_per_class=args.max_per_class, seed=0)
    complete = json.loads((store.folder / "complete.json").read_text())
    return {"bench": "sample-cache", "images": args.classes * args.per_class, "full_encode_s": round(full_s, 2),
            "sample_rows": len(store), "sample_s": round(time.perf_counter() - start, 2),
            "encoded_shards": complete.get("encoded_shards"), "copied_from": complete.get("copied_from")}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="bench", required=True)
    pool = sub.add_parser("realpool")
    pool.add_argument("--data", type=Path, required=True)
    pool.add_argument("--classes", type=int, default=10)
    pool.add_argument("--per-class", type=int, default=60)
    pool.add_argument("--size", type=float, default=0.5, help="synthetic file size scale")
    pool.add_argument("--image-size", type=int, default=160)
    pool.add_argument("--cache-mb", type=float, default=None, help="RealPool cache budget (default: the setting)")
    pool.add_argument("--batch", type=int, default=8)
    pool.add_argument("--rounds", type=int, default=5)
    prior = sub.add_parser("prior")
    prior.add_argument("--rows", type=int, default=60000)
    prior.add_argument("--side", type=int, default=16)
    prior.add_argument("--iterations", type=int, default=20)
    prior.add_argument("--scratch", default="/tmp/bench-memory")
    cache = sub.add_parser("sample-cache")
    cache.add_argument("--data", type=Path, required=True)
    cache.add_argument("--classes", type=int, default=10)
    cache.add_argument("--per-class", type=int, default=30)
    cache.add_argument("--size", type=float, default=0.2)
    cache.add_argument("--max-per-class", type=int, default=10)
    args = parser.parse_args()
    Path(getattr(args, "scratch", "/tmp/bench-memory")).mkdir(parents=True, exist_ok=True)
    run = {"realpool": bench_realpool, "prior": bench_prior, "sample-cache": bench_sample_cache}[args.bench]
    print(json.dumps(run(args)))


if __name__ == "__main__":
    main()
