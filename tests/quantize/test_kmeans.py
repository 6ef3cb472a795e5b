"""K-means and the W2 errors on real TAEF2 latents of MNIST (and small synthetic cases with known answers)."""

from __future__ import annotations

import numpy as np
import pytest
from scipy.optimize import linear_sum_assignment

from distill.errors import DistillError
from quantize.kmeans import BACKENDS, assign, kmeans, kmeanspp, squared_distances, w2_uniform, w2_weighted


@pytest.fixture(scope="module")
def latents(mnist_store) -> dict[int, np.ndarray]:
    return {c: mnist_store.class_latents(c).reshape(mnist_store.class_count(c), -1).numpy() for c in range(10)}


@pytest.mark.parametrize("backend", BACKENDS)
def test_weights_are_cluster_masses_and_deterministic(latents, backend):
    x = latents[3]
    result = kmeans(x, 5, seed=7, backend=backend, iterations=10 if backend != "sklearn-partial-fit" else 1)
    assert result.centroids.shape == (5, x.shape[1]) and result.centroids.dtype == np.float32
    assert result.counts.sum() == len(x)
    np.testing.assert_array_equal(result.counts, np.bincount(result.assignments, minlength=5))
    assert abs(result.weights.sum() - 1.0) < 1e-12
    np.testing.assert_allclose(result.weights, result.counts / len(x))
    # error = squared W2 with the masses = mean squared distance to the nearest centroid
    distances = squared_distances(x, result.centroids).min(1)
    assert result.error == pytest.approx(distances.mean(), rel=1e-4)
    again = kmeans(x, 5, seed=7, backend=backend, iterations=10 if backend != "sklearn-partial-fit" else 1)
    np.testing.assert_array_equal(again.centroids, result.centroids)
    np.testing.assert_array_equal(again.assignments, result.assignments)


def test_faiss_matches_lloyd_and_beats_the_d4m_stream(latents):
    x = np.concatenate([latents[c] for c in range(10)])  # 500 real latents, 2048 dims
    errors = {b: kmeans(x, 10, seed=0, backend=b, iterations=25 if b != "sklearn-partial-fit" else 1).error
              for b in BACKENDS}
    assert errors["faiss"] == pytest.approx(errors["sklearn"], rel=0.03)
    assert errors["faiss"] <= errors["sklearn-minibatch"] * 1.03
    assert errors["faiss"] < errors["sklearn-partial-fit"]  # one pass of K-point chunks is a coarse quantizer
    # different seeds give (slightly) different local optima; restarts keep the best of them
    best = kmeans(x, 10, seed=0, restarts=3)
    assert best.error <= min(kmeans(x, 10, seed=s).error for s in range(3)) + 1e-3


def test_projected_seeding_keeps_kmeans_plus_plus_quality(latents):
    """Seeding in a 256-d random projection picks real points and seeds as well as the full-space seeding."""
    x = np.concatenate([latents[c] for c in range(10)])  # 2048 dims > 256: the projection is used
    seeds = kmeanspp(x, 20, seed=3)
    assert any(np.array_equal(seeds[0], row) for row in x)
    np.testing.assert_array_equal(seeds, kmeanspp(x, 20, seed=3))
    projected = np.mean([assign(x, kmeanspp(x, 20, seed=s))[1].mean() for s in range(3)])
    full = np.mean([assign(x, kmeanspp(x, 20, seed=s, project_dim=None))[1].mean() for s in range(3)])
    assert projected <= full * 1.05


def test_uniform_w2_exact_ot(latents):
    x = latents[1][:40]
    result = kmeans(x, 4, seed=0)
    uniform, method = w2_uniform(x, result.centroids, "exact")
    assert method == "exact"
    # 4 divides 40: replicating each centroid 10 times makes it a linear assignment; both are exact
    cost = np.repeat(squared_distances(x, result.centroids), 10, axis=1)
    rows, cols = linear_sum_assignment(cost)
    assert uniform == pytest.approx(cost[rows, cols].mean(), rel=1e-6)
    # the Voronoi masses are the optimal weights for these centroids: uniform weights cannot do better
    assert uniform >= w2_weighted(x, result.centroids) - 1e-6
    sinkhorn, _ = w2_uniform(x, result.centroids, "sinkhorn")
    assert sinkhorn == pytest.approx(uniform, rel=5e-3)
    assert sinkhorn >= uniform * (1 - 1e-6)


def test_uniform_equals_weighted_when_clusters_are_balanced():
    rng = np.random.default_rng(0)
    centers = np.array([[0.0, 0.0], [10.0, 0.0], [0.0, 10.0]], dtype=np.float32)
    x = np.concatenate([c + rng.normal(0, 0.1, (20, 2)) for c in centers]).astype(np.float32)
    result = kmeans(x, 3, seed=0)
    np.testing.assert_array_equal(np.sort(result.counts), [20, 20, 20])
    assert w2_uniform(x, result.centroids)[0] == pytest.approx(result.error, rel=1e-6)
    labels, distances = assign(x, result.centroids)
    assert len(set(labels[:20])) == 1 and distances.max() < 1.0


def test_kmeans_errors(latents):
    with pytest.raises(DistillError, match="ipc is larger than the class"):
        kmeans(latents[0], 51)
    with pytest.raises(DistillError, match="unknown k-means backend"):
        kmeans(latents[0], 2, backend="nope")
    with pytest.raises(DistillError, match="km_expand"):
        kmeans(latents[0][:12], 5, backend="sklearn-partial-fit", km_expand=3)


def test_torch_lloyd_gives_the_faiss_result(latents):
    """Same k-means++ seeds, same Lloyd iterations: the torch backend (the GPU path, here on the CPU) reproduces
    faiss' centroids to float rounding. Tolerance: identical assignments, centroids within 1e-4 (measured
    2.4e-7), W2 within 1e-5 relative (measured <= 6e-8, also at 1300 x 4096, K = 100)."""
    for c in (0, 3, 7):
        for k in (2, 10):
            ref = kmeans(latents[c], k, seed=c, backend="faiss")
            got = kmeans(latents[c], k, seed=c, backend="torch", device="cpu")
            np.testing.assert_array_equal(got.assignments, ref.assignments)
            np.testing.assert_allclose(got.centroids, ref.centroids, atol=1e-4)
            assert got.error == pytest.approx(ref.error, rel=1e-5)


def test_torch_lloyd_refills_empty_clusters():
    x = np.repeat(np.eye(3, 4, dtype=np.float32), 5, axis=0)  # 3 distinct points, 4 clusters: one starts empty
    result = kmeans(x, 4, seed=0, backend="torch", device="cpu")
    assert result.counts.sum() == 15 and np.isfinite(result.centroids).all()
    assert result.error == pytest.approx(0.0, abs=1e-5)


def test_without_faiss_the_torch_backend_works_and_faiss_says_what_to_install(latents, monkeypatch):
    with_faiss = kmeans(latents[5], 4, seed=1, backend="torch", device="cpu")
    monkeypatch.setitem(__import__("sys").modules, "faiss", None)  # neither the cpu nor the gpu extra installed
    without = kmeans(latents[5], 4, seed=1, backend="torch", device="cpu")
    np.testing.assert_array_equal(without.assignments, with_faiss.assignments)
    assert without.error == pytest.approx(with_faiss.error, rel=1e-5)
    with pytest.raises(DistillError, match=r"distillery\[cpu\]"):
        kmeans(latents[5], 4, backend="faiss")


def test_auto_backend_is_faiss_when_importable_else_torch_and_says_which_ran(latents, monkeypatch, mnist_store):
    import quantize.kmeans as kmeans_module
    from quantize.methods import _quantize_job

    with_faiss = kmeans(latents[5], 4, seed=1)  # backend="auto" is the default
    assert with_faiss.backend == "faiss"
    monkeypatch.setattr(kmeans_module, "faiss_available", lambda: False)  # as on a GPU image without FAISS
    without = kmeans(latents[5], 4, seed=1, device="cpu")
    assert without.backend == "torch"
    np.testing.assert_array_equal(without.assignments, with_faiss.assignments)
    job = {"folder": str(mnist_store.folder), "label": 3, "k": 2, "iterations": 5, "restarts": 1, "seed": 0,
           "backend": "auto", "km_expand": 1, "w2_uniform": False}
    assert _quantize_job(job)["backend"] == "torch"  # what the manifest's kmeans_backend lists
    monkeypatch.undo()
    assert _quantize_job(job)["backend"] == "faiss"
