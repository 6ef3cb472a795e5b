"""The ImageNet-scale data path end to end on a small synthetic ImageNet-shaped folder: bad files skipped and
reported, the 256 px policy with an SD-VAE-shaped AutoencoderKL, content-keyed ImageFolder caches, explicit
resolution, pre-flight rejection and lazy --max-per-class samples."""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from distill.data import registry
from distill.data.loader import ImageStream
from distill.errors import DistillError
from distill.methods.base import RunContext
from distill.runner import RunRequest, run_to_archive


@pytest.fixture(scope="module")
def sd_shaped_vae(tmp_path_factory) -> Path:
    """An AutoencoderKL of Stable Diffusion's shape (4 stages = 8x down, 4 latent channels), tiny widths, random."""
    from diffusers import AutoencoderKL

    torch.manual_seed(0)
    vae = AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 4,
                        up_block_types=("UpDecoderBlock2D",) * 4, block_out_channels=(8, 8, 16, 16), layers_per_block=1,
                        latent_channels=4, norm_num_groups=4, sample_size=256)
    folder = tmp_path_factory.mktemp("sd-shaped-vae")
    vae.save_pretrained(folder)
    return folder


@pytest.fixture
def tree(synthetic_imagenet) -> Callable[..., Path]:
    """Writes a small synthetic ImageNet-shaped folder at a given root and returns the root."""

    def make(root: Path, classes: int = 3, per_class: int = 5, size: float = 0.8) -> Path:
        synthetic_imagenet.generate(root, classes=classes, per_class=per_class, val_per_class=2, seed=0, workers=1,
                                    size_scale=size, quiet=True)
        return root

    return make


def test_oq_imagefolder_256_policy_skips_bad_files(tmp_path: Path, sd_shaped_vae: Path, tree):
    root = tree(tmp_path / "inet")  # files >= 266 px on the short side
    first = sorted((root / "train").iterdir())[0]
    good = sorted(first.glob("*.JPEG"))[0].read_bytes()
    (first / "zz_truncated.JPEG").write_bytes(good[: len(good) // 3])
    (first / "zz_not_an_image.JPEG").write_bytes(b"definitely not a JPEG")
    request = RunRequest(f"imagefolder:{root}", "oq", 2, {"encoder": str(sd_shaped_vae), "w2_uniform": True},
                         device="cpu")
    result = run_to_archive(request, tmp_path / "out.tar")
    metrics, dataset = result.manifest["metrics"], result.manifest["dataset"]
    assert metrics["resolution"] == 256 and metrics["latent_shape"] == [4, 32, 32]
    assert "256 px" in metrics["resolution_policy"]
    assert metrics["skipped_images"] == 2 and len(metrics["skipped_files"]) == 2
    assert any("zz_truncated.JPEG" in f for f in metrics["skipped_files"])
    assert metrics["class_sizes"] == [5, 5, 5]  # the bad files are left out of k-means
    assert dataset["source_size"] >= 256 and dataset["fingerprint"]
    assert any("unreadable" in w for w in dataset["preflight_warnings"])
    assert result.distilled.images.dtype == torch.uint8 and len(result.distilled) == 6


def test_changed_folder_is_reindexed(tmp_path: Path):
    root = tmp_path / "small"
    rng = np.random.default_rng(0)
    for split, n in (("train", 3), ("val", 1)):
        for c in ("a", "b"):
            (root / split / c).mkdir(parents=True)
            for i in range(n):
                Image.fromarray(rng.integers(0, 255, (16, 16, 3), dtype=np.uint8)).save(root / split / c / f"{i}.png")
    name = f"imagefolder:{root}"
    registry.get_dataset.cache_clear()
    before = registry.get_dataset(name)
    assert len(before.train) == 6 and isinstance(before.train, registry.ArraySplit)
    # rewrite one file in place (same name) and add another: a new fingerprint, a new index and decoded cache
    Image.fromarray(np.zeros((16, 16, 3), dtype=np.uint8)).save(root / "train" / "a" / "0.png")
    os.utime(root / "train" / "a" / "0.png", ns=(1, 1))
    Image.fromarray(np.full((16, 16, 3), 7, dtype=np.uint8)).save(root / "train" / "b" / "9.png")
    registry.get_dataset.cache_clear()
    after = registry.get_dataset(name)
    assert after.extra["fingerprint"] != before.extra["fingerprint"]
    assert len(after.train) == 7
    assert int(after.train.load([0]).max()) == 0 and int(before.train.load([0]).max()) > 0


def test_explicit_resolution_and_bad_layout(tmp_path: Path, tree):
    root = tree(tmp_path / "t", classes=2, per_class=3, size=0.2)
    registry.get_dataset.cache_clear()
    ds = registry.get_dataset(f"imagefolder:{root}@24")
    assert ds.image_size == 24 and ds.describe()["image_size_from"] == "explicit (@SIZE)"
    assert ds.train.load([0]).shape == (1, 3, 24, 24)
    bad = tree(tmp_path / "bad", classes=2, per_class=2, size=0.2)
    for f in sorted((bad / "train").iterdir())[1].iterdir():
        f.unlink()
    with pytest.raises(DistillError, match="without images"):
        registry.get_dataset(f"imagefolder:{bad}")


def test_max_per_class_is_a_lazy_view(tmp_path: Path, tree):
    root = tree(tmp_path / "lazy", classes=2, per_class=4, size=0.5)
    registry.get_dataset.cache_clear()
    ds = registry.get_dataset(f"imagefolder:{root}")
    ctx = RunContext(dataset=ds, ipc=1, seed=0, max_per_class=2)
    train = ctx.train
    assert isinstance(train, registry.SubsetSplit) and len(train) == 4
    expected = ds.train.load(train.index)
    streamed = torch.cat([x for _, x in ImageStream(train, batch_size=3, num_workers=1)])
    assert torch.equal(streamed, expected) and torch.equal(train.load(np.arange(4)), expected)
    at64 = registry.split_at_size(train, 64)
    assert at64.load([0]).shape == (1, 3, 64, 64) and np.array_equal(at64.labels, train.labels)


def test_max_per_class_cache_takes_rows_from_the_full_cache(tmp_path: Path, tree):
    """On an on-disk ImageFolder with an undecodable file: the sample's cache is copied from the complete full
    cache (no encode), and the bad file stays skipped under its index in the sample."""
    from distill.data.sampling import run_train_split
    from quantize.latent_cache import latents_for_dataset

    root = tree(tmp_path / "reuse", classes=2, per_class=5, size=0.2)
    first = sorted((root / "train").iterdir())[0]
    (first / "zz_bad.JPEG").write_bytes(b"definitely not a JPEG")
    registry.get_dataset.cache_clear()
    name = f"imagefolder:{root}"
    ds = registry.get_dataset(name)
    bad = ds.train.files.index(f"{first.name}/zz_bad.JPEG")
    seed = next(s for s in range(50) if bad in run_train_split(ds, 4, s).index)  # a sample that holds the bad file
    full = latents_for_dataset(name, "taef2", resolution=32)
    assert list(full.skipped) == [str(bad)]
    sample = latents_for_dataset(name, "taef2", resolution=32, max_per_class=4, seed=seed)
    complete = json.loads((sample.folder / "complete.json").read_text())
    assert complete["copied_from"] == full.folder.name and complete["encoded_shards"] == 0
    index = run_train_split(ds, 4, seed).index
    assert list(sample.skipped) == [str(int(np.flatnonzero(index == bad)[0]))]
    assert list(sample.skipped.values()) == list(full.skipped.values()) and sample.valid_counts == [3, 4]
    for c in range(2):
        rows = [int(np.flatnonzero(full.class_indices(c) == p)[0]) for p in index[sample.class_indices(c)]]
        assert torch.equal(sample.class_latents(c), full.class_latents(c)[rows])
