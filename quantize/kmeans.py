"""K-means quantization of one class's latents, and the two W2 errors that compare weighted and uniform quantizers.

``kmeans(x, k, ...)`` is a plain function over a float32 ``n x d`` array with interchangeable backends:

- ``auto`` (default of ``oq``): ``faiss`` when FAISS can be imported, else ``torch`` (the same seeds and Lloyd
  iterations); :attr:`KMeansResult.backend` says which ran, and the job's manifest records it.
- ``faiss``: ``faiss.Kmeans`` (exact Lloyd iterations, BLAS distance computations, GPU
  index when faiss sees a GPU). faiss has no k-means++, so each restart is seeded with greedy k-means++
  (:func:`kmeanspp`: scikit-learn's variant in float32 BLAS, in a random projection for wide latents) and
  passed through ``init_centroids``; faiss' subsampling is disabled (``max_points_per_centroid = n``) so
  every point is used. ``restarts`` runs keep the lowest inertia.
- ``sklearn-minibatch``: ``MiniBatchKMeans(...).fit`` (``iterations`` = epochs, ``restarts`` = ``n_init``).
- ``sklearn-partial-fit``: D4M's use (``distillation/gen_prototype.py``): one ``MiniBatchKMeans(n_clusters=K,
  random_state=seed, batch_size=km_expand*K, n_init="auto")`` fed shuffled chunks of exactly
  ``km_expand*K`` latents with ``partial_fit``; the first chunk seeds by k-means++, a leftover shorter than
  a chunk is dropped (as D4M does); ``iterations`` = passes over the stream (D4M: 1).
- ``sklearn``: ``KMeans(algorithm="lloyd")`` (reference quality).
- ``torch``: the same k-means++ seeds and Lloyd iterations as ``faiss``, written in torch so they run on the
  job's device (CUDA on GPU hosts, without a GPU build of faiss); stops at the first iteration whose
  assignment repeats (a fixed point of Lloyd). Same centroids as ``faiss`` up to float rounding (see
  :func:`torch_lloyd` for the one difference, empty clusters).

Whatever the backend, the result is measured the same way: every point is assigned to its nearest centroid
(exact search), ``counts`` are the Voronoi cell sizes, ``weights = counts / n`` and ``error`` = mean squared
distance = the squared W2 distance between the empirical measure and the weighted centroids (the optimal
weights for these centroids). :func:`w2_uniform` gives the squared W2 to the *uniform* measure on the same
centroids (D4M's implicit weights), by an optimal-transport solve with balanced capacities (see there).
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Any

import numpy as np

from distill.errors import DistillError

BACKENDS = ("auto", "faiss", "sklearn-minibatch", "sklearn-partial-fit", "sklearn", "torch")
EXACT_OT_MAX_ENTRIES = 20_000_000  # n*K above which w2_uniform switches from exact EMD to Sinkhorn (float64 costs)


@dataclass
class KMeansResult:
    centroids: np.ndarray  # K x d float32
    assignments: np.ndarray  # n int64, nearest centroid
    counts: np.ndarray  # K int64, Voronoi cell sizes
    weights: np.ndarray  # K float64, counts / n (sum to 1)
    inertia: float  # sum of squared distances to the nearest centroid
    backend: str  # the backend that ran (``auto`` resolved)
    seconds: float

    @property
    def error(self) -> float:
        """Squared W2 between the empirical measure and the weighted centroids (= inertia / n)."""
        return self.inertia / max(1, len(self.assignments))


def _check(x: np.ndarray, k: int) -> np.ndarray:
    x = np.ascontiguousarray(x, dtype=np.float32)
    if x.ndim != 2:
        raise DistillError(f"k-means expects an n x d array, got shape {x.shape}")
    if k < 1:
        raise DistillError(f"k must be >= 1 (got {k})")
    if k > len(x):
        raise DistillError(f"cannot make {k} clusters from {len(x)} points (ipc is larger than the class)")
    if not np.isfinite(x).all():
        raise DistillError("k-means input contains NaN or inf")
    return x


def assign(x: np.ndarray, centroids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Exact nearest centroid (faiss flat L2 index) -> (assignments int64, squared distances float64)."""
    try:
        import faiss
    except ImportError:  # neither extra installed (kmeans_backend=torch): the same search in torch
        import torch

        points, c = torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32)), torch.from_numpy(
            np.ascontiguousarray(centroids, dtype=np.float32))
        nearest = ((points * points).sum(1)[:, None] - 2.0 * points @ c.T + (c * c).sum(1)[None, :]).min(1)
        return nearest.indices.numpy().astype(np.int64), np.maximum(nearest.values.numpy().astype(np.float64), 0.0)

    index = faiss.IndexFlatL2(centroids.shape[1])
    index.add(np.ascontiguousarray(centroids, dtype=np.float32))
    distances, labels = index.search(np.ascontiguousarray(x, dtype=np.float32), 1)
    return labels[:, 0].astype(np.int64), np.maximum(distances[:, 0].astype(np.float64), 0.0)


SEED_PROJECTION_DIM = 256  # latents wider than this are seeded in a random projection of this width


def kmeanspp(x: np.ndarray, k: int, seed: int, local_trials: int | None = None,
             project_dim: int | None = SEED_PROJECTION_DIM) -> np.ndarray:
    """Greedy k-means++ seeding (Arthur & Vassilvitskii; scikit-learn's variant with 2 + log k local trials).

    Written here in float32 BLAS because scikit-learn's ``kmeans_plusplus`` took many times longer than the
    faiss Lloyd iterations it seeds. Seeding is sequential and re-reads every point per centre (memory bound,
    several times the Lloyd iterations for wide latents and large K), so points wider than ``project_dim`` are
    seeded in a seeded Gaussian (Johnson-Lindenstrauss) projection, which preserves k-means costs up to
    1 +- eps for O(log k / eps^2) dimensions; the chosen *points* are returned in the full space and Lloyd
    refines them there. ``project_dim=None`` seeds in the full space.
    """
    x = np.ascontiguousarray(x, dtype=np.float32)
    n = len(x)
    rng = np.random.default_rng(seed)
    trials = local_trials or 2 + int(math.log(k))
    z = x
    # the projection (one n x d x p GEMM) pays off once the k * trials sequential passes over x cost more
    if project_dim is not None and x.shape[1] > project_dim and 4 * k * trials > project_dim:
        projection = rng.standard_normal((x.shape[1], project_dim), dtype=np.float32) / np.float32(math.sqrt(project_dim))
        z = x @ projection
    sq_norms = np.einsum("ij,ij->i", z, z)
    chosen = [int(rng.integers(n))]
    closest = np.maximum(sq_norms - 2.0 * (z @ z[chosen[0]]) + sq_norms[chosen[0]], 0.0)
    for _ in range(1, k):
        total = float(closest.sum())
        if total <= 0.0:  # fewer distinct points than k: pick unused points uniformly
            candidates = rng.choice(np.setdiff1d(np.arange(n), chosen), size=1)
        else:
            cumulative = np.cumsum(closest, dtype=np.float64)
            candidates = np.searchsorted(cumulative, rng.random(trials) * cumulative[-1], side="right")
            candidates = np.minimum(candidates, n - 1)
        distances = sq_norms[:, None] - 2.0 * (z @ z[candidates].T) + sq_norms[candidates][None, :]
        distances = np.minimum(closest[:, None], np.maximum(distances, 0.0))
        best = int(np.argmin(distances.sum(0)))
        chosen.append(int(candidates[best]))
        closest = distances[:, best]
    return np.ascontiguousarray(x[chosen])


def faiss_available() -> bool:
    """Whether FAISS can be imported here (the ``cpu`` or ``gpu`` extra; GPU images without a matching wheel
    have none)."""
    try:
        import faiss  # noqa: F401
    except ImportError:
        return False
    return True


def resolve_backend(backend: str) -> str:
    """``auto`` -> ``faiss`` when importable, else ``torch``; any other backend as it is."""
    if backend != "auto":
        return backend
    return "faiss" if faiss_available() else "torch"


def faiss_has_gpu() -> bool:
    try:
        import faiss
    except ImportError:
        return False

    return hasattr(faiss, "get_num_gpus") and faiss.get_num_gpus() > 0


_GPU_RESOURCES: Any = None


def faiss_gpu_resources() -> Any:
    """One ``StandardGpuResources`` per process (cuBLAS handle, streams, scratch memory), reused by every class.

    ``faiss.Kmeans(gpu=True)`` builds new resources on every call (``index_cpu_to_all_gpus``), which costs more
    than clustering one 1300-point class; a Ray worker process clustering many classes keeps this one.
    """
    global _GPU_RESOURCES
    if _GPU_RESOURCES is None:
        import faiss

        _GPU_RESOURCES = faiss.StandardGpuResources()
    return _GPU_RESOURCES


def _flat_index(d: int, gpu: bool) -> Any:
    import faiss

    if not gpu:
        return faiss.IndexFlatL2(d)
    import torch

    config = faiss.GpuIndexFlatConfig()
    config.device = torch.cuda.current_device()  # the GPU this process's task was given (workers.ray_executor)
    return faiss.GpuIndexFlatL2(faiss_gpu_resources(), d, config)


def _faiss(x: np.ndarray, k: int, iterations: int, restarts: int, seed: int, gpu: bool | None) -> np.ndarray:
    try:
        import faiss
    except ImportError:
        raise DistillError("kmeans_backend=faiss needs FAISS: pip install 'distillery[cpu]' (or '[gpu]' on GPU "
                           "hosts), or use kmeans_backend=torch") from None

    use_gpu = faiss_has_gpu() if gpu is None else gpu
    best, best_obj = None, math.inf
    for r in range(restarts):
        centroids, obj = kmeanspp(x, k, seed + r), math.inf
        if iterations > 0:
            # faiss.Kmeans.train without its per-call index: the same Clustering, seeded with our k-means++
            params = faiss.ClusteringParameters()
            params.niter, params.nredo, params.seed, params.verbose = iterations, 1, seed + r, False
            params.max_points_per_centroid, params.min_points_per_centroid = max(len(x), 1), 1
            clustering = faiss.Clustering(x.shape[1], k, params)
            faiss.copy_array_to_vector(np.ascontiguousarray(centroids).ravel(), clustering.centroids)
            clustering.train(x, _flat_index(x.shape[1], use_gpu))
            centroids = faiss.vector_float_to_array(clustering.centroids).reshape(k, x.shape[1])
            stats: Any = clustering.iteration_stats  # a SWIG vector (the stubs call it a list)
            obj = float(stats.at(stats.size() - 1).obj) if stats.size() else math.inf
        if restarts == 1:
            return np.ascontiguousarray(centroids, dtype=np.float32)
        if obj < best_obj or best is None:
            best, best_obj = np.array(centroids, dtype=np.float32), obj
    assert best is not None
    return best


def torch_device(device: str | None = None) -> str:
    import torch

    return device or ("cuda" if torch.cuda.is_available() else "cpu")


def torch_lloyd(x: np.ndarray, centroids: np.ndarray, iterations: int, device: str | None = None) -> tuple[np.ndarray, float]:
    """Lloyd iterations from ``centroids`` on ``device`` (float32, exact squared distances by GEMM).

    Each iteration assigns every point to its nearest centroid and moves each centroid to its points' mean,
    as faiss' ``Clustering`` does; it stops early once the assignment repeats (faiss would run on and change
    nothing). An empty cluster takes over half of the largest one, as faiss does, but deterministically: a copy
    of the largest cluster's centroid with faiss' symmetric 1/1024 perturbation (faiss picks the cluster at
    random). Returns (centroids, inertia of the last assignment).
    """
    import torch

    dev = torch.device(torch_device(device))
    points = torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32)).to(dev)
    c = torch.from_numpy(np.array(centroids, dtype=np.float32)).to(dev)
    k = c.shape[0]
    sq_norms = (points * points).sum(1)
    previous, inertia = None, math.inf
    eps = 1.0 / 1024.0
    sign = torch.ones(points.shape[1], device=dev)
    sign[1::2] = -1.0
    for _ in range(iterations):
        distances = sq_norms[:, None] - 2.0 * (points @ c.T) + (c * c).sum(1)[None, :]
        best, labels = distances.min(1)
        inertia = float(best.clamp_min_(0.0).sum())
        if previous is not None and torch.equal(labels, previous):
            break
        previous = labels
        counts = torch.bincount(labels, minlength=k)
        sums = torch.zeros_like(c).index_add_(0, labels, points)
        nonempty = counts > 0
        c = torch.where(nonempty[:, None], sums / counts.clamp_min(1)[:, None].to(sums.dtype), c)
        for empty in torch.nonzero(~nonempty).flatten().tolist():
            largest = int(torch.argmax(counts))
            c[empty] = c[largest] * (1.0 + sign * eps)
            c[largest] = c[largest] * (1.0 - sign * eps)
            counts[empty] = counts[largest] // 2
            counts[largest] -= counts[empty]
    return c.cpu().numpy(), inertia


def _torch(x: np.ndarray, k: int, iterations: int, restarts: int, seed: int, device: str | None) -> np.ndarray:
    best, best_obj = None, math.inf
    for r in range(restarts):
        centroids, obj = torch_lloyd(x, kmeanspp(x, k, seed + r), iterations, device)
        if best is None or obj < best_obj:
            best, best_obj = centroids, obj
    assert best is not None
    return np.ascontiguousarray(best, dtype=np.float32)


def d4m_partial_fit(x: np.ndarray, k: int, *, seed: int, km_expand: int = 1, passes: int = 1) -> np.ndarray:
    """D4M's streaming clustering of one class: shuffled chunks of ``km_expand*k`` points to ``partial_fit``."""
    from sklearn.cluster import MiniBatchKMeans

    chunk = km_expand * k
    if len(x) < chunk:
        raise DistillError(f"D4M's stream needs at least km_expand*ipc = {chunk} points, got {len(x)}")
    from threadpoolctl import threadpool_limits

    model = MiniBatchKMeans(n_clusters=k, random_state=seed, batch_size=chunk, n_init="auto")
    rng = np.random.default_rng(seed)
    # Chunks of K points gain nothing from threads, and OpenMP spin-waits slowed each call on a busy host.
    with threadpool_limits(limits=1):
        for _ in range(max(1, passes)):
            order = rng.permutation(len(x))
            for start in range(0, len(order) - chunk + 1, chunk):  # a short leftover is dropped, as in D4M
                model.partial_fit(x[order[start : start + chunk]])
    return np.ascontiguousarray(model.cluster_centers_, dtype=np.float32)


def kmeans(
    x: np.ndarray,
    k: int,
    *,
    iterations: int = 25,
    restarts: int = 1,
    seed: int = 0,
    backend: str = "auto",
    km_expand: int = 1,
    minibatch_size: int = 1024,
    gpu: bool | None = None,
    device: str | None = None,
) -> KMeansResult:
    """Cluster ``x`` (n x d float32) into ``k`` centroids; see the module docstring for the backends."""
    x = _check(x, k)
    if backend not in BACKENDS:
        raise DistillError(f"unknown k-means backend '{backend}'; known: {', '.join(BACKENDS)}")
    if iterations < 0 or restarts < 1:
        raise DistillError("k-means needs iterations >= 0 and restarts >= 1")
    backend = resolve_backend(backend)
    start = time.perf_counter()
    if backend == "faiss":
        centroids = _faiss(x, k, iterations, restarts, seed, gpu)
    elif backend == "torch":
        centroids = _torch(x, k, iterations, restarts, seed, device)
    elif backend == "sklearn-partial-fit":
        centroids = d4m_partial_fit(x, k, seed=seed, km_expand=km_expand, passes=max(1, iterations))
    elif backend == "sklearn-minibatch":
        from sklearn.cluster import MiniBatchKMeans

        model = MiniBatchKMeans(n_clusters=k, random_state=seed, n_init=restarts, max_iter=max(1, iterations),
                                batch_size=minibatch_size)
        centroids = np.ascontiguousarray(model.fit(x).cluster_centers_, dtype=np.float32)
    else:
        from sklearn.cluster import KMeans

        model = KMeans(n_clusters=k, random_state=seed, n_init=restarts, max_iter=max(1, iterations),
                       algorithm="lloyd")
        centroids = np.ascontiguousarray(model.fit(x).cluster_centers_, dtype=np.float32)
    assignments, distances = assign(x, centroids)
    seconds = time.perf_counter() - start
    counts = np.bincount(assignments, minlength=k).astype(np.int64)
    return KMeansResult(
        centroids=centroids, assignments=assignments, counts=counts, weights=counts / counts.sum(),
        inertia=float(distances.sum()), backend=backend, seconds=seconds,
    )


# ----------------------------------------------------------------------------------------- W2 errors
def squared_distances(x: np.ndarray, centroids: np.ndarray) -> np.ndarray:
    """n x K squared Euclidean distances (float64, clipped at 0)."""
    x64, c64 = x.astype(np.float64), centroids.astype(np.float64)
    d = (x64**2).sum(1)[:, None] - 2.0 * x64 @ c64.T + (c64**2).sum(1)[None, :]
    return np.maximum(d, 0.0)


def w2_weighted(x: np.ndarray, centroids: np.ndarray) -> float:
    """Squared W2 to the centroids carrying their Voronoi masses: the mean squared nearest-centroid distance."""
    _, distances = assign(x, centroids)
    return float(distances.mean())


def w2_uniform(x: np.ndarray, centroids: np.ndarray, method: str = "auto") -> tuple[float, str]:
    """Squared W2 between the empirical measure (1/n each) and the uniform measure on the centroids (1/K each).

    Balanced capacities make this a transportation problem (n sources, K sinks), not a nearest-centroid
    assignment. ``exact``: the transportation problem solved exactly by POT's network simplex (``ot.emd2``,
    far faster than a general LP solver on these problems), used up to
    ``EXACT_OT_MAX_ENTRIES``. ``sinkhorn``: log-domain Sinkhorn with epsilon-scaling down to 1e-4 of the mean
    cost, then the plan's transport cost (an upper bound within ~0.1 % of the exact value in our tests).
    Replicating each centroid n/K times and solving a linear assignment is exact only when K divides n.
    Returns (value, method used).
    """
    x = np.ascontiguousarray(x, dtype=np.float32)
    cost = squared_distances(x, centroids)
    n, k = cost.shape
    if method == "auto":
        method = "exact" if n * k <= EXACT_OT_MAX_ENTRIES else "sinkhorn"
    if method == "exact":
        return _ot_emd(cost), "exact"
    if method == "sinkhorn":
        return _ot_sinkhorn(cost), "sinkhorn"
    raise DistillError(f"unknown OT method '{method}' (exact|sinkhorn|auto)")


def _ot_emd(cost: np.ndarray) -> float:
    import ot

    n, k = cost.shape
    value, log = ot.emd2(np.full(n, 1.0 / n), np.full(k, 1.0 / k), np.ascontiguousarray(cost, dtype=np.float64),
                         numItermax=max(1_000_000, 50 * n * k), log=True)
    if log.get("warning"):  # pragma: no cover - iteration cap on a feasible, bounded problem
        raise RuntimeError(f"OT solve failed: {log['warning']}")
    return float(value)


def _ot_sinkhorn(cost: np.ndarray, final_eps: float = 1e-4, iterations_per_eps: int = 200) -> float:
    from scipy.special import logsumexp

    n, k = cost.shape
    scale = float(cost.mean()) or 1.0
    c = cost / scale
    log_a, log_b = np.full(n, -math.log(n)), np.full(k, -math.log(k))
    f, g = np.zeros(n), np.zeros(k)
    eps = 1.0
    while True:
        for _ in range(iterations_per_eps):
            f = eps * log_a - eps * logsumexp((g[None, :] - c) / eps, axis=1)
            g_new = eps * log_b - eps * logsumexp((f[:, None] - c) / eps, axis=0)
            converged = np.abs(g_new - g).max() < 1e-9
            g = g_new
            if converged:
                break
        if eps <= final_eps:
            break
        eps = max(eps / 4.0, final_eps)
    plan = np.exp((f[:, None] + g[None, :] - c) / eps)
    plan *= (1.0 / n) / np.maximum(plan.sum(1, keepdims=True), 1e-300)  # exact row marginals
    return float((plan * cost).sum())
