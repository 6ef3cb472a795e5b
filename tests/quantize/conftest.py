"""Shared real latents: MNIST, 50 training images per class (the seeded --max-per-class 50 sample of seed 0),
encoded once per session with the real TAEF2 weights into the session's latent cache. The end-to-end
``distill run oq --max-per-class 50`` test reuses this very cache folder."""

from __future__ import annotations

import pytest


@pytest.fixture(scope="session")
def mnist_store(mnist):
    from quantize.latent_cache import latents_for_dataset

    return latents_for_dataset("mnist", "taef2", max_per_class=50, seed=0)
