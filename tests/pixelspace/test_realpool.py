"""RealPool's memory bound: the same batches whether the split is held whole or read on demand through a
bounded LRU, and a bounded footprint on an on-disk (ImageNet-shaped) ImageFolder."""

from __future__ import annotations

import importlib.util
import sys
import tracemalloc
from pathlib import Path

import pytest
import torch

from distill.data import registry
from distill.methods.base import RunContext
from pixelspace.realpool import RealPool
from pixelspace.synthetic import init_synthetic

REPO = Path(__file__).resolve().parents[2]


def _synthetic():
    if "synthetic_imagenet" not in sys.modules:
        spec = importlib.util.spec_from_file_location("synthetic_imagenet", REPO / "bench" / "synthetic_imagenet.py")
        module = importlib.util.module_from_spec(spec)
        sys.modules["synthetic_imagenet"] = module
        spec.loader.exec_module(module)
    return sys.modules["synthetic_imagenet"]


def _draws(pool: RealPool, ctx: RunContext, rounds: int = 3) -> list[torch.Tensor]:
    """Every kind of batch the methods draw (DC/DM, DD, init 'real'), from one seeded generator."""
    gen = torch.Generator().manual_seed(11)
    out: list[torch.Tensor] = []
    for _ in range(rounds):
        out.append(pool.sample(1, 5, gen))
        out.append(pool.sample_all(4, gen))
        out.extend(pool.sample_mixed(9, gen))
    out.append(init_synthetic(ctx, pool, "real", gen)[0])
    return out


def _assert_same(a: list[torch.Tensor], b: list[torch.Tensor]) -> None:
    assert len(a) == len(b)
    for x, y in zip(a, b, strict=True):
        assert torch.equal(x, y) and x.stride() == y.stride()  # the same layout too: the same kernels downstream


def test_bounded_pool_draws_the_same_batches_as_the_whole_split(mnist):
    ctx = RunContext(dataset=mnist, ipc=2, seed=3, max_per_class=20)
    whole = RealPool(ctx)
    assert whole.whole and whole.cached_bytes == 200 * 28 * 28  # MNIST fits the default budget: as before
    reference = _draws(whole, ctx)
    for budget in (0, 7 * 28 * 28):  # nothing cached, and an LRU smaller than one sample_all batch
        bounded = RealPool(ctx, cache_bytes=budget)
        assert not bounded.whole and bounded.loaded_images == 0  # nothing read up front
        _assert_same(_draws(bounded, ctx), reference)
        assert bounded.cached_bytes <= budget
    roomy = RealPool(ctx, cache_bytes=200 * 28 * 28 - 1)  # one byte short of the split: LRU that rarely evicts
    _assert_same(_draws(roomy, ctx), reference)
    drawn = sum(t.numel() for t in reference if t.is_floating_point()) // (28 * 28)
    assert roomy.loaded_images < drawn  # repeats came from the cache


@pytest.fixture(scope="module")
def on_disk(tmp_path_factory):
    """An ImageNet-shaped ImageFolder (4 classes x 12 JPEGs ~100 x 75) read at 72 px: a FileSplit, not arrays."""
    root = tmp_path_factory.mktemp("realpool") / "inet"
    _synthetic().generate(root, classes=4, per_class=12, val_per_class=1, seed=0, workers=1, size_scale=0.2,
                          quiet=True)
    registry.get_dataset.cache_clear()
    ds = registry.get_dataset(f"imagefolder:{root}@72")
    assert isinstance(ds.train, registry.FileSplit)
    return ds


def _traced_peak(build) -> tuple[int, object]:
    """Peak bytes traced while ``build`` runs: numpy buffers (decoded images, loaded and stacked batches, the
    LRU's entries); the normalised float batches are torch's and not traced."""
    tracemalloc.start()
    try:
        tracemalloc.reset_peak()
        result = build()
        return tracemalloc.get_traced_memory()[1], result
    finally:
        tracemalloc.stop()


def test_memory_stays_bounded_on_an_on_disk_imagefolder(on_disk):
    ctx = RunContext(dataset=on_disk, ipc=1, seed=0)
    image = 3 * 72 * 72
    split_bytes = 48 * image
    budget = 5 * image

    def run(cache_bytes: int):
        pool = RealPool(ctx, cache_bytes=cache_bytes)
        held, loads = [], []
        gen = torch.Generator().manual_seed(0)
        batches = []
        for _ in range(4):
            before = pool.loaded_images
            batches.append(pool.sample_all(3, gen))
            batches.extend(pool.sample_mixed(6, gen))
            loads.append(pool.loaded_images - before)
            held.append(pool.cached_bytes)
        return pool, held, loads, batches

    whole, whole_held, whole_loads, whole_batches = run(split_bytes)
    bounded_peak, (bounded, held, loads, batches) = _traced_peak(lambda: run(budget))
    assert whole.whole and whole.loaded_images == 48 and whole_loads == [0, 0, 0, 0]
    assert whole_held == [split_bytes] * 4  # the whole split in memory (torch-owned: tracemalloc cannot see it)
    assert not bounded.whole and max(held) <= budget
    # at most the 4 x 3 + 6 images of one round are read per round, never a class or the split
    assert all(0 < n <= 18 for n in loads)
    # entries are their own buffers (an entry does not pin its loaded batch)
    assert sum(a.base is None and a.nbytes == image for a in bounded._cache.values()) == len(bounded._cache)
    # traced peak: the budget plus about one round's decoded batch (twice: loaded and stacked), not the split
    assert bounded_peak < budget + 2 * 18 * image + 64 * 1024 < split_bytes
    _assert_same(batches, whole_batches)
