"""K-means backends side by side: FAISS vs MiniBatchKMeans.fit vs D4M's partial_fit stream vs sklearn KMeans.

Data: real CIFAR-10 TAEF2 latents (64 px -> 32x8x8 = 2048 dims) of the first N training images of a few
classes, and random Gaussian "4x32x32" latents (4096 dims, ImageNet class size 1300). For each K: wall time,
time ratio to FAISS, squared W2 with cluster-mass weights (= mean squared distance, the k-means objective),
its gap to sklearn's Lloyd KMeans, and the squared W2 to the *uniform* measure on the same centroids.

    python bench/kmeans.py --per-class 1300 --classes 2 --ks 10 50 100 --threads 1 --repeats 5
    python bench/kmeans.py --random-only --backends faiss --ks 10 50 100   # per-class k-means + W2 at ImageNet scale

Prints a markdown table. Every backend runs with the same thread count (``--threads``, via threadpoolctl and
faiss.omp_set_num_threads) so the ratios compare algorithms, not thread scheduling.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

BACKENDS = [
    ("faiss", "faiss (25 it, k-means++)", {"iterations": 25}),
    ("sklearn-minibatch", "MiniBatchKMeans.fit", {"iterations": 100}),
    ("sklearn-partial-fit", "D4M partial_fit stream", {"iterations": 1}),
    ("sklearn", "sklearn KMeans (Lloyd)", {"iterations": 300}),
]


def cifar_latents(per_class: int, classes: int, cache: Path) -> dict[str, np.ndarray]:
    """TAEF2 latents of the first ``per_class`` CIFAR-10 training images of the first ``classes`` classes."""
    if cache.exists():
        data = np.load(cache)
        return {k: data[k] for k in data.files}
    from distill.data import get_dataset
    from distill.files import atomic_output
    from quantize.encoders import load_encoder

    ds = get_dataset("cifar10")
    encoder = load_encoder("taef2", image_size=ds.image_size)
    out = {}
    for c in range(classes):
        idx = ds.train.class_indices(c)[:per_class]
        start = time.perf_counter()
        z = encoder.encode(ds.train.load(idx).float() / 255.0)
        print(f"encoded class {c}: {len(idx)} images in {time.perf_counter() - start:.1f} s", file=sys.stderr)
        out[f"cifar10-{ds.classes[c]}"] = z.reshape(len(z), -1).numpy()
    with atomic_output(cache, suffix=".npz") as tmp:
        np.savez(tmp, **out)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--per-class", type=int, default=1300)
    parser.add_argument("--classes", type=int, default=2)
    parser.add_argument("--ks", type=int, nargs="+", default=[10, 50, 100])
    parser.add_argument("--random-n", type=int, default=1300)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--repeats", type=int, default=3, help="timed runs per backend; the median is reported")
    parser.add_argument("--no-uniform", action="store_true", help="skip the OT solves for the uniform W2")
    parser.add_argument("--cache", type=Path, default=None, help="npz cache of the encoded latents")
    parser.add_argument("--random-only", action="store_true", help="only the random 4x32x32 latents (no CIFAR encode)")
    parser.add_argument("--backends", nargs="+", default=None, help="subset of backends (default: all)")
    args = parser.parse_args()

    os.environ.setdefault("OMP_NUM_THREADS", str(args.threads))
    import faiss
    from threadpoolctl import threadpool_limits

    from distill.config import get_settings
    from quantize.kmeans import kmeans, w2_uniform

    faiss.omp_set_num_threads(args.threads)
    cache = args.cache or get_settings().cache_dir / f"bench-kmeans-cifar10-taef2-{args.per_class}x{args.classes}.npz"
    datasets = {} if args.random_only else cifar_latents(args.per_class, args.classes, cache)
    w2_uniform(np.eye(4, dtype=np.float32), np.eye(4, dtype=np.float32)[:2])  # import POT outside the timings
    backends = [b for b in BACKENDS if args.backends is None or b[0] in args.backends]
    rng = np.random.default_rng(args.seed)
    datasets[f"random-4x32x32-n{args.random_n}"] = rng.standard_normal((args.random_n, 4096)).astype(np.float32)

    print("| data | n x d | K | backend | seconds (median) | time / first | W2² weighted | vs last backend | W2² uniform | "
          "W2 uniform s (POT) | weights lower W2² by |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    with threadpool_limits(limits=args.threads):
        for name, x in datasets.items():
            for k in args.ks:
                rows = []
                for backend, label, kwargs in backends:
                    # same seed every repeat (identical result); the median time damps a busy host's noise
                    repeats = [kmeans(x, k, seed=args.seed, backend=backend, **kwargs) for _ in range(args.repeats)]
                    result = repeats[0]
                    result.seconds = float(np.median([r.seconds for r in repeats]))
                    uniform, w2_times = None, [0.0]
                    if not args.no_uniform:
                        w2_times = []
                        for _ in range(args.repeats):
                            w2_start = time.perf_counter()
                            uniform = w2_uniform(x, result.centroids)[0]
                            w2_times.append(time.perf_counter() - w2_start)
                    rows.append((label, result, uniform, float(np.median(w2_times))))
                faiss_s = rows[0][1].seconds
                lloyd = rows[-1][1].error
                for label, result, uniform, w2_seconds in rows:
                    gap = 100 * (result.error / lloyd - 1)
                    uni = "-" if uniform is None else f"{uniform:.2f}"
                    w2s = "-" if uniform is None else f"{w2_seconds:.3f}"
                    red = "-" if uniform is None else f"{100 * (1 - result.error / uniform):.1f} %"
                    print(f"| {name} | {x.shape[0]} x {x.shape[1]} | {k} | {label} | {result.seconds:.3f} | "
                          f"{result.seconds / faiss_s:.1f}x | {result.error:.2f} | {gap:+.2f} % | {uni} | {w2s} | {red} |",
                          flush=True)


if __name__ == "__main__":
    main()
