"""Imagenette as a registered dataset (issue 32): the layouts users have (the official imagenette2-160/-320
folders and tarballs, the development tarball), the NAME@SIZE variants (good and bad sizes, on the CLI), the
release chosen for a size, and `distill fetch imagenette`'s checks; on small generated trees of tiny JPEGs."""

from __future__ import annotations

import hashlib
import os
import tarfile
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

from distill.archive import read_archive
from distill.cli import app
from distill.data import registry
from distill.errors import InvalidRequest
from distill.fetch import SOURCES, RemoteFile

TRAIN, VAL = 3, 2  # images per class in the generated trees


def write_imagenette(root: Path, short: int = 20) -> Path:
    """An Imagenette-shaped ImageFolder: train/ and val/ with the ten wnid folders of tiny JPEGs (landscape,
    short side ``short``, as the official releases' files are)."""
    rng = np.random.default_rng(0)
    for split, count in (("train", TRAIN), ("val", VAL)):
        for label, wnid in enumerate(registry.IMAGENETTE_WNIDS):
            folder = root / split / wnid
            folder.mkdir(parents=True)
            for i in range(count):
                pixels = np.clip(rng.normal(25 * label, 20, (short, short + 4, 3)), 0, 255).astype(np.uint8)
                Image.fromarray(pixels).save(folder / f"ILSVRC2012_val_{label:03d}{i:05d}.JPEG", quality=90)
    return root


def tar_folder(folder: Path, tarball: Path, top: str | None) -> Path:
    """``folder``'s train/ and val/ in a tarball, inside the top folder ``top`` (or at the top when None)."""
    with tarfile.open(tarball, "w:gz" if tarball.suffix == ".tgz" else "w") as archive:
        for split in ("train", "val"):
            archive.add(folder / split, arcname=f"{top}/{split}" if top else split)
    return tarball


def test_registered_with_readable_names_and_sizes() -> None:
    names = registry.dataset_names()
    assert "imagenette" in names
    assert [n for n in names if n.startswith("imagenette@")] == [f"imagenette@{s}" for s in registry.RESOLUTIONS]
    spec, at_64 = registry.DATASETS["imagenette"], registry.DATASETS["imagenette@64"]
    assert (spec.image_size, spec.num_classes, spec.channels) == (registry.IMAGENETTE_SIZE, 10, 3)
    assert (at_64.image_size, at_64.base, at_64.sizes) == (64, "imagenette", ())
    assert registry.DATASETS["imagenet@128"].image_size == 128  # ImageNet takes the same sizes
    assert not any(n.startswith(("mnist@", "cifar10@")) for n in names)  # fixed-resolution datasets do not
    help_text = CliRunner().invoke(app, ["datasets"]).output
    assert "imagenette@64" in help_text and "10 classes" in help_text


LAYOUTS = {
    # the official 160 px release unpacked by the user
    "official folder": lambda tree, data: tree.rename(data / "imagenette2-160"),
    # the official 320 px release as downloaded: a gzip tar with one top folder
    "official tarball": lambda tree, data: tar_folder(tree, data / "imagenette2-320.tgz", "imagenette2-320"),
    # the development split: an uncompressed tar with a top folder of its own name
    "dev tarball": lambda tree, data: tar_folder(tree, data / "imagenette-160-dev.tar", "imagenette-160-dev"),
    # an ImageFolder tarball with train/ and val/ at its top
    "flat tarball": lambda tree, data: tar_folder(tree, data / "imagenette-flat.tar", None),
    # train/ and val/ right in DISTILL_DATA_DIR/imagenette
    "plain tree": lambda tree, data: [(tree / split).rename(data / split) for split in ("train", "val")],
}


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_layouts(layout: str, tmp_path: Path, use_data_dir: Callable[[Path], None]) -> None:
    data = tmp_path / "data" / "imagenette"
    data.mkdir(parents=True)
    LAYOUTS[layout](write_imagenette(tmp_path / "tree"), data)
    use_data_dir(tmp_path / "data")
    assert registry.dataset_available("imagenette") and registry.dataset_available("imagenette@32")
    ds = registry.get_dataset("imagenette@32")
    assert ds.name == "imagenette@32" and ds.image_size == 32 and ds.extra["image_size_from"] == "explicit (@SIZE)"
    assert ds.extra["folders"] == list(registry.IMAGENETTE_WNIDS)
    assert ds.classes[:4] == ["tench", "English Springer Spaniel", "cassette player", "chainsaw"]
    assert (len(ds.train), len(ds.test)) == (10 * TRAIN, 10 * VAL)
    assert ds.train.counts(10).tolist() == [TRAIN] * 10
    assert (ds.mean, ds.std) == (registry.IMAGENET_MEAN, registry.IMAGENET_STD)
    images = ds.test.load([0, len(ds.test) - 1])
    assert tuple(images.shape) == (2, 3, 32, 32) and images.dtype == torch.uint8
    # Same files, same caches: without a size the default resolution (streamed at 128 px: above the in-memory limit)
    default = registry.get_dataset("imagenette")
    assert default.image_size == registry.IMAGENETTE_SIZE and default.extra["image_size_from"] == "dataset default"
    assert tuple(default.train.load([0]).shape) == (1, 3, registry.IMAGENETTE_SIZE, registry.IMAGENETTE_SIZE)
    assert default.extra["fingerprint"] == ds.extra["fingerprint"]


def test_the_release_read_depends_on_the_size(tmp_path: Path) -> None:
    folder = tmp_path / "imagenette"
    folder.mkdir()
    (folder / "imagenette2-160").mkdir()
    for name in ("imagenette-160-dev.tar", "imagenette2-320.tgz"):
        (folder / name).write_bytes(b"")
    assert registry.imagenette_source(folder, 64).name == "imagenette2-160"  # official before the dev split
    assert registry.imagenette_source(folder, 160).name == "imagenette2-160"
    assert registry.imagenette_source(folder, 224).name == "imagenette2-320.tgz"  # nothing upsampled from 160 px
    (folder / "imagenette2-320").mkdir()
    assert registry.imagenette_source(folder, 224).name == "imagenette2-320"  # a folder before its tarball
    for name in ("imagenette2-160", "imagenette2-320"):
        (folder / name).rmdir()
    (folder / "imagenette2-320.tgz").unlink()
    assert registry.imagenette_source(folder, 224).name == "imagenette-160-dev.tar"  # whatever there is
    (folder / "imagenette-160-dev.tar").unlink()
    with pytest.raises(registry.DistillError, match="no Imagenette in .*imagenette2-160/"):
        registry.imagenette_source(folder, 64)


def test_size_suffix_on_the_cli(tmp_path: Path, use_data_dir: Callable[[Path], None]) -> None:
    write_imagenette(tmp_path / "data" / "imagenette" / "imagenette2-160")
    use_data_dir(tmp_path / "data")
    out = tmp_path / "nette.tar"
    done = CliRunner().invoke(app, ["run", "random", "-d", "imagenette@32", "--ipc", "2", "-o", str(out)])
    assert done.exit_code == 0, done.output
    archive = read_archive(out)
    assert archive.manifest["dataset"]["name"] == "imagenette@32"  # `distill eval` reads the test split at 32 px
    assert tuple(archive.distilled.images.shape) == (20, 3, 32, 32)
    for name, message in (
        ("imagenette@100", "error: no resolution '@100' for imagenette: choose imagenette@32, imagenette@64, "
                           f"imagenette@128, imagenette@224 (imagenette alone is {registry.IMAGENETTE_SIZE} px)"),
        ("imagenette@", "error: no resolution '@' for imagenette"),
        ("mnist@64", "error: mnist has a fixed resolution (28 px); @SIZE is for imagenet, imagenette"),
    ):
        bad = tmp_path / "bad.tar"
        refused = CliRunner().invoke(app, ["run", "random", "-d", name, "--ipc", "1", "-o", str(bad)])
        assert refused.exit_code == 2, refused.output
        assert refused.output.strip().count("\n") == 0 and refused.output.startswith(message), refused.output
        assert not bad.exists()
    with pytest.raises(InvalidRequest, match="no resolution '@48' for imagenette"):
        registry.get_dataset("imagenette@48")


def test_fetch_knows_the_official_archive(tmp_path: Path) -> None:
    (remote,) = SOURCES["imagenette"].files
    assert remote.name == "imagenette2-160.tgz" and SOURCES["imagenette"].folder == "imagenette"
    assert (remote.size, remote.md5) == (99_003_388, "e793b78cc4c9e9a4ccc0c1155377a412")
    # size, then the first MiB's md5 (fast.ai's own check), then the whole file's
    blob = np.random.default_rng(0).integers(0, 256, (1 << 20) + 5000, dtype=np.uint8).tobytes()
    path = tmp_path / "file.tgz"
    path.write_bytes(blob)
    head, whole = hashlib.md5(blob[: 1 << 20]).hexdigest(), hashlib.md5(blob).hexdigest()
    assert RemoteFile("f", md5=whole, size=len(blob), head_md5=head).check(path) is None
    assert RemoteFile("f", size=len(blob) + 1).check(path) == f"{len(blob)} bytes, expected {len(blob) + 1}"
    assert "md5 of the first MiB" in str(RemoteFile("f", size=len(blob), head_md5=whole).check(path))
    path.write_bytes(blob[:-1] + b"x")
    assert str(RemoteFile("f", md5=whole, size=len(blob), head_md5=head).check(path)).startswith("md5 ")


SHARED_DEV = Path(os.environ.get("DISTILL_DATA_DIR", "")) / "imagenette" / "imagenette-160-dev.tar"


@pytest.mark.skipif(not SHARED_DEV.is_file(), reason="no imagenette/imagenette-160-dev.tar in DISTILL_DATA_DIR")
def test_the_shared_development_tarball() -> None:
    """The real dev split, streamed at the default resolution: listing and a few decoded images, no full decode."""
    ds = registry.get_dataset("imagenette")
    assert (len(ds.train), len(ds.test)) == (8469, 1000)
    assert ds.train.counts(10).min() == 758 and ds.test.counts(10).tolist() == [100] * 10
    assert ds.classes[-1] == "parachute" and ds.extra["folders"][-1] == "n03888257"
    images = ds.train.load([0, 4000, 8468])
    assert tuple(images.shape) == (3, 3, 128, 128) and float(images.float().std()) > 10


def test_a_plugin_dataset_with_sizes() -> None:
    """registry.register gives a plugin's dataset the same NAME@SIZE variants; its loader receives the size."""
    seen: list[int | None] = []

    def loader(size: int | None = None) -> registry.Dataset:
        seen.append(size)
        return registry.get_dataset("mnist")

    spec = registry.DatasetSpec("plugin-set", "a plugin's set", 1, 28, 10, (0.5,), (0.5,), loader, sizes=(32, 64))
    registry.register(spec)
    try:
        assert [n for n in registry.dataset_names() if n.startswith("plugin-set")] == [
            "plugin-set", "plugin-set@32", "plugin-set@64"]
        assert registry.get_dataset("plugin-set@64").name == "plugin-set@64" and seen == [64]
        assert registry.dataset_available("plugin-set@32")  # a plugin's loader: the operator's word for it
    finally:
        for name in ("plugin-set", "plugin-set@32", "plugin-set@64"):
            registry.DATASETS.pop(name)
        registry.get_dataset.cache_clear()
