"""bench/w2_geometry.py's measure(): the masses' W2 gain is large where cells are unequal and far apart, and
near zero where every point is about as far from its second-nearest centroid as from its nearest (the
high-dimensional case the bench finds on CIFAR-10 / Fashion-MNIST latents)."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[2]


def load_bench():
    spec = importlib.util.spec_from_file_location("w2_geometry", REPO / "bench" / "w2_geometry.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules["w2_geometry"] = module
    spec.loader.exec_module(module)
    return module


def gain(row: dict[str, float]) -> float:
    """Per cent by which the masses lower the squared W2 below the uniform weights'."""
    return 100.0 * (1.0 - row["weighted"] / row["uniform"])


def test_unequal_far_apart_cells_make_the_masses_worth_most_of_the_w2() -> None:
    rng = np.random.default_rng(0)
    centres = np.array([[0.0, 0.0], [50.0, 0.0], [0.0, 50.0]])
    x = np.concatenate([c + rng.normal(size=(n, 2)) for c, n in zip(centres, (1000, 300, 100), strict=True)]).astype(np.float32)
    row = load_bench().measure(x, 3, "faiss", 0)
    assert gain(row) > 90.0  # uniform weights ship 1000 - 467 points 50 units away
    assert row["ratio"] > 100.0
    assert row["singletons"] == 0


def test_in_high_dimension_uniform_weights_cost_little() -> None:
    x = np.random.default_rng(0).normal(size=(2000, 2048)).astype(np.float32)
    row = load_bench().measure(x, 10, "faiss", 0)
    assert 0.0 <= gain(row) < 3.0
    assert 1.0 <= row["ratio"] < 1.05
    assert abs(row["weighted"] - 2048 * (1 - 10 / 2000)) / 2048 < 0.05  # about the data's variance per point
