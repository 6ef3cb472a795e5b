"""The on-disk latent cache: class-contiguous shards, reuse, resume after a killed encode, executor fan-out."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from distill.data.registry import ArraySplit, SubsetSplit
from distill.data.sampling import sample_per_class
from distill.errors import Cancelled
from distill.methods.base import map_in_process
from quantize.encoders import load_encoder
from quantize.latent_cache import (
    COMPLETE,
    EncoderSpec,
    SplitSpec,
    build_latent_cache,
    cache_folder,
    latents_for_context,
    open_store,
    shard_path,
)


class CountingEncoder:
    """The real TAEF2 encoder, counting the images it encodes (to see which shards a resume redoes)."""

    def __init__(self, encoder):
        self.inner = encoder
        self.images = 0

    def __getattr__(self, name):
        return getattr(self.inner, name)

    def encode(self, images):
        self.images += len(images)
        return self.inner.encode(images)


@pytest.fixture(scope="module")
def small(mnist):
    """36 real MNIST digits (shuffled labels order), encoded at 32 px to keep the test fast."""
    idx = np.arange(36) * 97
    split = ArraySplit(mnist.train.load(idx).numpy(), mnist.train.labels[idx])
    encoder = load_encoder("taef2", image_size=28, resolution=32, batch_size=8)
    return split, encoder


def _build(split, encoder, name: str, max_per_class: int | None = None, seed: int = 0, **kwargs):
    spec = EncoderSpec("taef2", encoder.resolution, 28, "cpu", encoder.batch_size)
    return build_latent_cache(split, split_spec=SplitSpec(name, max_per_class, seed), encoder_spec=spec, encoder_key="taef2",
                              num_classes=10, latent_shape=encoder.latent_shape, shard_size=8, encoder=encoder,
                              **kwargs)


def test_shards_are_class_contiguous_and_match_direct_encoding(small):
    split, encoder = small
    counting = CountingEncoder(encoder)
    fractions: list[float] = []
    store = _build(split, counting, "unit-a", progress=fractions.append)
    assert counting.images == 36 and fractions[-1] == 1.0 and fractions == sorted(fractions)
    assert len(list(store.folder.glob("shard_*.safetensors"))) == 5 and (store.folder / COMPLETE).exists()
    direct = encoder.encode(split.load(np.arange(36)).float() / 255.0)
    for c in range(10):
        idx = store.class_indices(c)
        assert (split.labels[idx] == c).all() and len(idx) == (split.labels == c).sum()
        torch.testing.assert_close(store.class_latents(c), direct[idx].half().float())
    again, reused, said = CountingEncoder(encoder), [], []
    store_again = _build(split, again, "unit-a", progress=reused.append, log=said.append)
    assert store_again.folder == store.folder and again.images == 0  # reused, nothing encoded
    assert reused == [1.0] and said == [f"latent cache {store.folder.name}: complete, 36 latents reused"]  # not silent


def test_killed_encode_resumes_from_the_last_complete_shard(small):
    split, encoder = small
    calls = {"n": 0}

    def cancel_after_two_shards() -> None:
        calls["n"] += 1
        if calls["n"] == 3:
            raise Cancelled("killed")

    with pytest.raises(Cancelled):
        _build(split, encoder, "unit-b", check_cancelled=cancel_after_two_shards)
    folder = cache_folder("unit-b", "taef2", 32)
    assert sorted(p.name for p in folder.glob("shard_*")) == ["shard_00000.safetensors", "shard_00001.safetensors"]
    assert not (folder / COMPLETE).exists() and open_store(folder) is None
    resumed = CountingEncoder(encoder)
    store = _build(split, resumed, "unit-b")
    assert resumed.images == 36 - 16  # only the three missing shards
    # a kill during the last shard: no marker, last shard gone -> only that shard is encoded again
    (folder / COMPLETE).unlink()
    shard_path(folder, 4).unlink()
    last = CountingEncoder(encoder)
    store2 = _build(split, last, "unit-b")
    assert last.images == 4
    for c in range(10):
        torch.testing.assert_close(store2.class_latents(c), store.class_latents(c))


class InProcessExecutor:
    """The executor protocol (``distill.methods.base.Executor``) run in this process: exercises the picklable
    shard jobs, the streamed results and the "auto" device of the children."""

    device = "auto"

    def __init__(self):
        self.items = 0
        self.reported: list[int] = []

    def map(self, fn, items, *, num_gpus=None, num_cpus=1.0, on_result=None, check_cancelled=None):
        items = list(items)
        self.items += len(items)

        def report(i, result):
            on_result(i, result)
            self.reported.append(i)

        return map_in_process(fn, items, on_result=report if on_result is not None else None,
                              check_cancelled=check_cancelled)


def test_executor_path_encodes_the_same_latents(mnist):
    from distill.methods.base import RunContext

    executor = InProcessExecutor()
    ctx = RunContext(dataset=mnist, ipc=1, seed=3, max_per_class=3, executor=executor)
    store = latents_for_context(ctx, "taef2", resolution=32, batch_size=8, shard_size=8)
    assert executor.items == 4 and len(store) == 30 and executor.reported == [0, 1, 2, 3]
    tasks = json.loads((store.folder / COMPLETE).read_text())["tasks"]
    assert sorted(t["shard"] for t in tasks) == [0, 1, 2, 3] and all(t["end"] >= t["start"] for t in tasks)
    assert store.folder.name == "mnist-taef2-32-max3-s3"
    ctx_local = RunContext(dataset=mnist, ipc=1, seed=3, max_per_class=3)
    direct = load_encoder("taef2", resolution=32).encode(ctx_local.class_images(5))
    torch.testing.assert_close(store.class_latents(5), direct.half().float())


class CountingSplit(ArraySplit):
    """A real in-memory split that counts the images loaded from it."""

    loads = 0

    def load(self, indices):
        self.loads += len(indices)
        return super().load(indices)


def test_max_per_class_sample_takes_its_rows_from_the_full_cache(small):
    """A --max-per-class sample of a dataset whose full-split cache is complete reads the full cache's rows:
    no image is loaded, nothing is encoded, and the latents equal encoding the sample's images."""
    split, encoder = small
    parent = CountingSplit(split.images, split.labels)
    _build(parent, encoder, "unit-r")
    keep = sample_per_class(parent.labels, 10, 2, np.random.default_rng(5))
    sample = SubsetSplit(parent, keep)
    parent.loads = 0
    counting = CountingEncoder(encoder)
    store = _build(sample, counting, "unit-r", max_per_class=2, seed=5)
    assert parent.loads == 0 and counting.images == 0
    assert store.folder == cache_folder("unit-r", "taef2", 32, 2, 5) and len(store) == len(keep)
    assert json.loads((store.folder / COMPLETE).read_text())["copied_from"] == "unit-r-taef2-32"
    # the same sample encoded from its images (no full cache under this name)
    fresh = _build(sample, CountingEncoder(encoder), "unit-r-fresh", max_per_class=2, seed=5)
    assert parent.loads == len(keep)
    for c in range(10):
        assert np.array_equal(store.class_indices(c), fresh.class_indices(c))
        torch.testing.assert_close(store.class_latents(c), fresh.class_latents(c), rtol=2e-3, atol=2e-3)
    # a sample of a different split (other labels) does not take rows from a cache that is not its parent's
    other = CountingSplit(split.images, np.roll(split.labels, 1))
    _build(SubsetSplit(other, keep), encoder, "unit-r", max_per_class=2, seed=6)
    assert other.loads == len(keep)


def test_latent_rows_read_through_memory_mapped_shards(small):
    split, encoder = small
    store = _build(split, encoder, "unit-a")
    latents, labels = store.all_latents()
    rows = store.latent_rows()
    assert rows.shape == tuple(latents.shape) and np.array_equal(rows.labels, labels.numpy())
    pick = np.array([35, 0, 9, 9, 17])  # across shards, unsorted, repeated
    assert torch.equal(torch.from_numpy(rows[pick]).float(), latents[pick])
    assert torch.equal(torch.from_numpy(rows[3:20]).float(), latents[3:20])


def test_loader_processes_get_a_path_not_the_file_list_and_follow_the_task_grant(tmp_path, monkeypatch):
    """A shard task's loader processes unpickle the split's names as a memory-mapped file's path (not the list,
    whose size grows with the split), decode the same images, and number the CPUs the task was granted."""
    import pickle

    from PIL import Image

    from distill.data.loader import load_batch
    from distill.data.registry import FileSplit
    from quantize.latent_cache import TASK_CPUS_ENV, loader_split, task_loader_workers, write_file_names

    rng = np.random.default_rng(0)
    files = []
    for i in range(30):
        name = f"class{i % 3}/image_with_a_long_file_name_{i:05d}.png"
        (tmp_path / "images" / name).parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 256, (20, 24, 3), dtype=np.uint8)).save(tmp_path / "images" / name)
        files.append(name)
    split = FileSplit(tmp_path / "images", files, np.arange(30) % 3, 16, 3)
    folder = tmp_path / "cache"
    folder.mkdir()
    assert loader_split(split, folder) is split  # no files.npy yet: as it is
    write_file_names(folder, SubsetSplit(split, np.arange(0, 30, 2)))  # through a --max-per-class view
    mapped = loader_split(SubsetSplit(split, np.arange(0, 30, 2)), folder)
    shipped = pickle.loads(pickle.dumps(mapped))  # what a forkserver loader process receives
    indices = np.array([0, 3, 14])
    kept, images, skipped = load_batch(shipped, indices)
    expected = load_batch(SubsetSplit(split, np.arange(0, 30, 2)), indices)
    assert np.array_equal(kept, expected[0]) and torch.equal(images, expected[1]) and not skipped
    bigger = FileSplit(split.root, [f"n{i:08d}/{i:08d}.JPEG" for i in range(3000)], np.zeros(3000, dtype=np.int64), 16, 3)
    write_file_names(tmp_path, bigger)
    assert len(pickle.dumps(loader_split(bigger, tmp_path).files)) < 300 < len(pickle.dumps(bigger.files)) // 100
    monkeypatch.delenv(TASK_CPUS_ENV, raising=False)
    assert task_loader_workers() is None  # a process of its own: the loader's default
    monkeypatch.setenv(TASK_CPUS_ENV, "3")
    assert task_loader_workers() == 3
