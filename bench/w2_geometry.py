"""Weighted vs uniform W2 of `oq`'s Lloyd centroids and of D4M's streamed prototypes, and why they differ.

Issue 12 asks that the cluster masses lower the latent W2 by >= 15 % against uniform weights; DDOQ reports
15.7 % (IPC 10) / 16.1 % (IPC 50) for its mini-batch k-means centroids. This bench measures, per class of a
registered dataset's cached latents (the cache `distill run oq/d4m` builds; built here on a miss):

- `oq`'s quantizer (FAISS Lloyd, 25 iterations, k-means++; seed 1000 c as `oq` seeds class c) and D4M's
  (one `partial_fit` pass, chunks of K, seed 0), both on the raw latents so that their W2 share one space;
  `oq`'s default space (each latent grid standardised per channel, ``latent_norm=instance``) in a row of
  its own;
- the squared W2 to the centroids with their masses (weighted) and with 1/K each (uniform, exact OT), the
  masses' gain over the centroids' own uniform measure and over D4M's uniform quantizer (what D4M delivers);
- the geometry behind the gain: the median ratio of a point's squared distance to its second-nearest and
  nearest centroid (near 1: moving mass to another cell costs little, so uniform weights cost little), and
  the cells holding a single image;
- with ``--pca``, `oq`'s quantizer on the top principal components of the standardised latents: the gain
  as the dimension shrinks.

    python bench/w2_geometry.py --dataset cifar10 --ks 10 50 --pca 2 8 32

Prints a markdown table of means over the classes (DISTILL_DATA_DIR / DISTILL_WEIGHTS_DIR / DISTILL_HOME
as for `distill run`; an uncached dataset is encoded first, about 16-30 min for CIFAR-10 on one CPU thread).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def standardise(z) -> np.ndarray:
    """The latents as `oq` quantizes them by default (``latent_norm=instance``), one row per image."""
    from quantize.methods import instance_standardise

    return instance_standardise(z.flatten(2))[0].reshape(len(z), -1).numpy()


D4M, OQ, RAW = "d4m stream (partial_fit)", "oq Lloyd (faiss)", "raw latents"


def measure(x: np.ndarray, k: int, backend: str, seed: int) -> dict[str, float]:
    """Weighted / uniform squared W2 of one quantizer on one class, and the distance ratios behind them."""
    from quantize.kmeans import kmeans, squared_distances, w2_uniform

    iterations = 1 if backend == "sklearn-partial-fit" else 25
    result = kmeans(x, k, iterations=iterations, seed=seed, backend=backend)
    uniform, _ = w2_uniform(x, result.centroids)
    nearest = np.sort(squared_distances(x, result.centroids), axis=1)[:, :2]
    return {
        "weighted": result.error, "uniform": uniform,
        "ratio": float(np.median(nearest[:, 1] / np.maximum(nearest[:, 0], 1e-12))),
        "singletons": float((result.counts == 1).sum()),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dataset", default="cifar10")
    parser.add_argument("--ks", type=int, nargs="+", default=[10, 50])
    parser.add_argument("--classes", type=int, nargs="*", help="class indices (default: all)")
    parser.add_argument("--pca", type=int, nargs="*", default=[], help="also quantize the top P principal components")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()

    import torch
    from threadpoolctl import threadpool_limits

    from quantize.latent_cache import latents_for_dataset

    torch.set_num_threads(args.threads)
    store = latents_for_dataset(args.dataset, "taef2")
    classes = args.classes if args.classes else list(range(store.num_classes))
    rows: dict[tuple[int, str, str], list[dict[str, float]]] = {}
    start = time.perf_counter()
    with threadpool_limits(args.threads):
        for c in classes:
            z = store.class_latents(c)
            raw, standard = z.reshape(len(z), -1).numpy(), standardise(z)
            centred = standard - standard.mean(0)
            components = np.linalg.svd(centred, full_matrices=False)[2] if args.pca else np.empty((0, 0))
            for k in args.ks:
                rows.setdefault((k, D4M, RAW), []).append(measure(raw, k, "sklearn-partial-fit", 0))
                rows.setdefault((k, OQ, RAW), []).append(measure(raw, k, "faiss", 1000 * c))
                rows.setdefault((k, OQ, "standardised (oq default)"), []).append(measure(standard, k, "faiss", 1000 * c))
                for p in args.pca:
                    projected = np.ascontiguousarray(centred @ components[:p].T, dtype=np.float32)
                    rows.setdefault((k, OQ, f"standardised, top {p} PCs"), []).append(measure(projected, k, "faiss", 1000 * c))
            print(f"class {c} done ({time.perf_counter() - start:.0f} s)", file=sys.stderr)

    print(f"\n{args.dataset}, TAEF2 latents {tuple(store.latent_shape)}, classes {classes[0]}-{classes[-1]} "
          f"({len(classes)}), {sum(store.class_count(c) for c in classes)} images; means over the classes\n")
    print("| K | quantizer | space | W2² weighted | W2² uniform | weighted below own uniform | "
          "weighted below D4M's uniform | median d²(2nd)/d²(1st) | one-image cells per class |")
    print("|---|---|---|---|---|---|---|---|---|")
    for (k, quantizer, space), values in rows.items():
        mean = {key: float(np.mean([v[key] for v in values])) for key in values[0]}
        # gains of the class means, as a run's manifest reports them (w2_reduction_pct)
        gain_own = 100.0 * (1.0 - mean["weighted"] / mean["uniform"])
        d4m_uniform = float(np.mean([v["uniform"] for v in rows[(k, D4M, RAW)]]))
        versus_d4m = f"{100.0 * (1.0 - mean['weighted'] / d4m_uniform):.1f} %" if space == RAW else ""
        print(f"| {k} | {quantizer} | {space} | {mean['weighted']:.1f} | {mean['uniform']:.1f} | "
              f"{gain_own:.1f} % | {versus_d4m} | {mean['ratio']:.3f} | {mean['singletons']:.1f} |")


if __name__ == "__main__":
    main()
