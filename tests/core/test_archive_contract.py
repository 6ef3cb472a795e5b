"""The archive contract held for every method: each registered method runs (tiny budgets, real MNIST) through
``run_to_archive`` - the one writer path the CLI and both workers share - and its archive reads back with
weights of mean 1.0 and the images' range recorded in the manifest (``load_dataset``'s docstring)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from distill.archive import load_dataset
from distill.methods.registry import METHODS
from distill.runner import RunRequest, run_to_archive

TINY: dict[str, dict] = {
    "random": {},
    "herding": {"batch_size": 50},
    "kcenter": {"batch_size": 50},
    "dc": {"iterations": 1, "batch_real": 4, "model": "convnet-w16", "outer_loop": 1, "inner_loop": 0},
    "dsa": {"iterations": 1, "batch_real": 4, "model": "convnet-w16", "outer_loop": 1, "inner_loop": 0},
    "dm": {"iterations": 2, "batch_real": 4, "model": "convnet-w16", "compile_real": "off", "lr_img": 50.0},
    "dd": {"iterations": 1, "batch_real": 16, "model": "convnet-w16", "distill_epochs": 1},
    "dq": {"teacher_model": "convnet-w16", "teacher_epochs": 1, "num_bins": 2},
    "mtt": {"iterations": 1, "experts": 1, "expert_train_epochs": 2, "expert_model": "convnet-w16",
            "expert_epochs": 1, "max_start_epoch": 1, "syn_steps": 1},
    "datm": {"iterations": 1, "experts": 1, "expert_train_epochs": 2, "expert_model": "convnet-w16",
             "expert_epochs": 1, "max_start_epoch": 1, "min_start_epoch": 0, "sequential_generation": False,
             "syn_steps": 1},
    # latent methods: the taef2 encoder (shared weights), nearest decode; oq keeps its cluster masses as weights
    "oq": {"iterations": 2, "kmeans_backend": "torch", "refine_iterations": 2, "w2_uniform": False},
    "d4m": {"iterations": 1, "decode": "vae", "w2_uniform": False},
}


def test_every_registered_method_is_covered() -> None:
    assert set(TINY) == set(METHODS)


@pytest.mark.parametrize("method", list(TINY))
def test_archive_contract(method: str, tmp_path: Path) -> None:
    request = RunRequest(dataset="mnist", method=method, ipc=2, params=TINY[method], max_per_class=10, device="cpu")
    result = run_to_archive(request, tmp_path / f"{method}.tar")
    loaded = load_dataset(result.path)
    assert (result.distilled.weights is not None) == (method == "oq")  # the one weighted method here
    assert float(loaded.weights.mean()) == pytest.approx(1.0, abs=1e-5)
    low, high = loaded.manifest["image_range"]
    assert low == pytest.approx(float(loaded.images.min()), abs=1e-5)
    assert high == pytest.approx(float(loaded.images.max()), abs=1e-5)
    if result.distilled.weights is None:
        assert loaded.manifest["weights_mean"] is None and loaded.weights.tolist() == [1.0] * len(loaded)
    else:  # ratios kept: what the method produced, scaled to mean 1.0
        produced = result.distilled.weights.double()
        torch.testing.assert_close(loaded.weights.double(), produced / produced.mean(), rtol=1e-5, atol=1e-6)
