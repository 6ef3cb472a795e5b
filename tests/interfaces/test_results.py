"""Using a result: an archive as a torch Dataset in one call, and the labelled preview grid."""

from __future__ import annotations

import io
from pathlib import Path

import torch
from PIL import Image

from distill.archive import build_manifest, load_dataset, preview_png, read_archive, read_manifest, write_archive
from distill.methods.base import DistilledSet


def weighted_archive(path: Path) -> Path:
    torch.manual_seed(0)
    images = torch.rand(6, 3, 32, 32)
    labels = torch.tensor([0, 0, 0, 1, 1, 2])
    distilled = DistilledSet(images=images, labels=labels, weights=torch.tensor([0.5, 0.3, 0.2, 0.6, 0.4, 1.0]),
                             soft_labels=torch.randn(6, 3))
    classes = ["airplane", "a rather long class name for a label", "cat"]
    manifest = build_manifest(distilled, dataset={"name": "toy", "classes": classes}, method="oq", ipc=3, params={},
                              seed=0)
    write_archive(path, distilled, manifest)
    return path


def test_load_dataset_in_one_call(tmp_path: Path) -> None:
    path = weighted_archive(tmp_path / "toy.tar")
    dataset = load_dataset(path)
    assert len(dataset) == 6 and dataset.classes[0] == "airplane"
    image, label, weight, soft = dataset[1]
    assert image.shape == (3, 32, 32) and label == 0 and abs(weight - 0.6) < 1e-6 and soft.shape == (3,)  # 0.3 at mean 1.0
    batch = next(iter(torch.utils.data.DataLoader(dataset, batch_size=4)))
    assert [tuple(t.shape) for t in batch] == [(4, 3, 32, 32), (4,), (4,), (4, 3)]
    flipped = load_dataset(path, transform=lambda x: x.flip(-1))
    assert torch.equal(flipped[0][0], dataset[0][0].flip(-1))
    assert read_manifest(path)["method"] == "oq" and "files" not in read_manifest(path)


def test_preview_is_labelled(tmp_path: Path) -> None:
    archive = read_archive(weighted_archive(tmp_path / "toy.tar"))
    image = Image.open(io.BytesIO(preview_png(archive))).convert("RGB")
    plain = archive.distilled
    archive.distilled = DistilledSet(images=plain.images, labels=plain.labels)  # no weights: no captions
    unweighted = Image.open(io.BytesIO(preview_png(archive)))
    assert image.height > unweighted.height  # a caption line under each row for the weights
    assert image.width == unweighted.width and image.width > 3 * 56  # a label column, then 3 tiles (the most per class)
    label_column = image.crop((0, 0, image.width - 3 * 60, image.height))
    assert len(label_column.getcolors(maxcolors=1 << 16) or []) > 2  # class names drawn in the label column
