"""Dataset registry and readers on real data (MNIST IDX, the CIFAR-10 JPEG tarball) and small trees built from it."""

from __future__ import annotations

import gzip
import pickle
import tarfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from distill.data import registry
from distill.data.readers import read_idx
from distill.errors import DistillError


def test_mnist_matches_published_facts(mnist):
    assert len(mnist.train) == 60000 and len(mnist.test) == 10000
    counts = mnist.train.counts(10).tolist()
    assert counts == [5923, 6742, 5958, 6131, 5842, 5421, 5918, 6265, 5851, 5949]
    x = mnist.train.load(np.arange(5000)).float() / 255
    assert abs(float(x.mean()) - 0.1307) < 0.01
    assert mnist.classes == [str(i) for i in range(10)] and mnist.digits


def test_idx_raw_and_gzip_agree(tmp_path: Path):
    source = Path(registry.get_settings().data_dir) / "mnist" / "t10k-labels-idx1-ubyte.gz"
    raw = tmp_path / "t10k-labels-idx1-ubyte"
    raw.write_bytes(gzip.decompress(source.read_bytes()))
    assert np.array_equal(read_idx(source), read_idx(raw))
    bad = tmp_path / "bad"
    bad.write_bytes(b"\x01\x02\x03\x04")
    with pytest.raises(DistillError, match="magic"):
        read_idx(bad)


def test_cifar10_from_shared_jpeg_tarball(cifar10):
    assert cifar10.classes == registry.CIFAR10_CLASSES
    assert len(cifar10.train) == 50000 and len(cifar10.test) == 10000
    assert cifar10.train.counts(10).tolist() == [5000] * 10
    assert tuple(cifar10.train.load([0]).shape) == (1, 3, 32, 32)


def test_cifar10_pickled_batches_reader(tmp_path: Path, cifar10, use_data_dir):
    """Write the canonical cifar-10-batches-py layout from real images, read it back through the registry."""
    folder = tmp_path / "cifar10" / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    rows = cifar10.train.load(np.arange(60)).numpy().reshape(60, -1)
    labels = cifar10.train.labels[:60].tolist()
    for i in range(1, 6):
        batch = {"data": rows[(i - 1) * 10 : i * 10], "labels": labels[(i - 1) * 10 : i * 10]}
        (folder / f"data_batch_{i}").write_bytes(pickle.dumps(batch))
    (folder / "test_batch").write_bytes(pickle.dumps({"data": rows[50:], "labels": labels[50:]}))
    (folder / "batches.meta").write_bytes(pickle.dumps({"label_names": registry.CIFAR10_CLASSES}))
    use_data_dir(tmp_path)
    ds = registry.get_dataset("cifar10")
    assert len(ds.train) == 50 and len(ds.test) == 10
    assert np.array_equal(ds.train.load([3]).numpy(), cifar10.train.load([3]).numpy())


def _write_tree(root: Path, images: np.ndarray, labels: np.ndarray, classes: list[str], split: str) -> None:
    for i, (image, label) in enumerate(zip(images, labels, strict=True)):
        folder = root / split / classes[label]
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(image[0]).save(folder / f"{i:04d}.png")


def test_imagefolder_tarball_any_path(tmp_path: Path, mnist):
    tree = tmp_path / "tree" / "digits"
    idx = np.arange(40)
    _write_tree(tree, mnist.train.load(idx).numpy(), mnist.train.labels[idx], [f"d{c}" for c in range(10)], "train")
    _write_tree(tree, mnist.test.load(idx).numpy(), mnist.test.labels[idx], [f"d{c}" for c in range(10)], "val")
    tarball = tmp_path / "digits.tar.gz"
    with tarfile.open(tarball, "w:gz") as tar:
        tar.add(tree, arcname="digits")
    ds = registry.get_dataset(f"imagefolder:{tarball}")
    present = sorted(set(f"d{c}" for c in mnist.train.labels[idx]))
    assert ds.classes == present and ds.channels == 1 and ds.image_size == 28
    assert len(ds.train) == 40
    first = ds.train.load([0]).numpy()[0, 0]
    assert first.shape == (28, 28)


def test_imagenet_layout_streams_in_wnid_order(tmp_path: Path, cifar10, use_data_dir):
    wnids, names = registry.imagenet_wnids_and_names()
    assert len(wnids) == 1000 and wnids == sorted(wnids) and names[0] == "tench"
    root = tmp_path / "imagenet"
    for split in ("train", "val"):
        for k, wnid in enumerate([wnids[5], wnids[0]]):
            folder = root / split / wnid
            folder.mkdir(parents=True)
            for j in range(2):
                Image.fromarray(cifar10.train.load([k * 2 + j]).numpy()[0].transpose(1, 2, 0)).resize((40, 30)).save(
                    folder / f"img{j}.JPEG")
    use_data_dir(tmp_path)
    ds = registry.get_dataset("imagenet")
    assert ds.num_classes == 1000 and ds.classes[0] == "tench"
    assert isinstance(ds.train, registry.FileSplit)
    assert ds.train.labels.tolist() == [0, 0, 5, 5]
    assert tuple(ds.train.load([0, 3]).shape) == (2, 3, 224, 224)


def test_unknown_and_missing_datasets(tmp_path: Path, use_data_dir):
    with pytest.raises(DistillError, match="unknown dataset"):
        registry.get_dataset("mnits")
    use_data_dir(tmp_path)
    with pytest.raises(DistillError, match="missing data"):
        registry.get_dataset("mnist")


def test_check_ipc_bounds(mnist):
    registry.check_ipc(mnist, 1)
    with pytest.raises(DistillError, match=">= 1"):
        registry.check_ipc(mnist, 0)
    with pytest.raises(DistillError, match="smallest class"):
        registry.check_ipc(mnist, 5422)
    with pytest.raises(DistillError, match="smallest class"):
        registry.check_ipc(mnist, 11, max_per_class=10)


def test_fashion_mnist_from_debian_package():
    ds = registry.get_dataset("fashion-mnist")
    assert ds.classes[0] == "T-shirt/top" and not ds.digits
    assert ds.train.counts(10).tolist() == [6000] * 10 and len(ds.test) == 10000


def test_registry_smallest_class_matches_data(mnist, cifar10):
    assert registry.DATASETS["mnist"].smallest_class == int(mnist.train.counts(10).min())
    assert registry.DATASETS["cifar10"].smallest_class == int(cifar10.train.counts(10).min())


def test_a_tarball_unpacked_meanwhile_by_another_process_is_kept_not_replaced(tmp_path, monkeypatch):
    """Two processes unpacking the same tarball at once: the later one keeps the folder the first finished (a
    reader may be using it) instead of replacing it under that reader."""
    import tarfile
    import tempfile

    from distill.data import readers

    (tmp_path / "tree" / "train" / "a").mkdir(parents=True)
    (tmp_path / "tree" / "train" / "a" / "0.txt").write_text("x")
    tarball = tmp_path / "set.tar"
    with tarfile.open(tarball, "w") as archive:
        archive.add(tmp_path / "tree", arcname="set")
    name = readers.unpack_once(tarball, tmp_path / "first").name
    real_mkdtemp = tempfile.mkdtemp

    def another_process_finishes_first(**kwargs):
        theirs = tmp_path / "second" / "unpacked" / name
        (theirs / "set").mkdir(parents=True)
        (theirs / ".complete").write_text("ok")
        (theirs / "in-use").write_text("a reader's file")
        return real_mkdtemp(**kwargs)

    monkeypatch.setattr(readers.tempfile, "mkdtemp", another_process_finishes_first)
    target = readers.unpack_once(tarball, tmp_path / "second")
    assert (target / "in-use").exists()  # theirs, not replaced
    assert [p.name for p in target.parent.iterdir()] == [name]  # our scratch copy is gone
