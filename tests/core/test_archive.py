"""Archive round trip, tamper detection and atomic writes."""

from __future__ import annotations

import io
import tarfile
from pathlib import Path

import pytest
import torch

from distill.archive import build_manifest, read_archive, write_archive
from distill.errors import ArchiveError
from distill.methods.base import DistilledSet


def _sample_set() -> DistilledSet:
    g = torch.Generator().manual_seed(0)
    return DistilledSet(
        images=torch.rand(6, 3, 8, 8, generator=g) * 1.2 - 0.1,  # outside [0, 1] on purpose
        labels=torch.tensor([0, 0, 1, 1, 2, 2]),
        soft_labels=torch.randn(6, 3, generator=g),
        weights=torch.tensor([0.25, 0.75, 0.5, 0.5, 0.1, 0.9]),
        learned_lr=0.0123,
        extras={"step_lrs": torch.tensor([0.1, 0.2])},
        metrics={"w2": 1.5},
    )


def _write(path: Path) -> str:
    distilled = _sample_set()
    dataset = {"name": "toy", "classes": ["a/x", "b", "c"], "channels": 3, "image_size": 8}
    manifest = build_manifest(distilled, dataset=dataset, method="random", ipc=2, params={"k": 1}, seed=3)
    return write_archive(path, distilled, manifest)


def test_round_trip_is_exact(tmp_path: Path):
    path = tmp_path / "set.tar"
    _write(path)
    archive = read_archive(path)
    original = _sample_set()
    assert torch.equal(archive.distilled.images, original.images)
    assert torch.equal(archive.distilled.labels, original.labels)
    assert torch.equal(archive.distilled.soft_labels, original.soft_labels)
    assert torch.equal(archive.distilled.weights, original.weights)
    assert archive.distilled.learned_lr == pytest.approx(0.0123)
    assert torch.equal(archive.distilled.extras["step_lrs"], original.extras["step_lrs"])
    assert archive.classes == ["a/x", "b", "c"] and archive.manifest["seed"] == 3
    with tarfile.open(path) as tar:
        names = tar.getnames()
    assert names[0] == "manifest.json"
    assert "images/0000_a_x/00000.png" in names and "metadata.csv" in names and "tensors.safetensors" in names
    assert not list(tmp_path.glob("*.partial"))


def _rewrite_member(src: Path, dst: Path, name: str, transform) -> None:
    with tarfile.open(src) as tar_in, tarfile.open(dst, "w") as tar_out:
        for member in tar_in.getmembers():
            data = tar_in.extractfile(member).read()
            if member.name == name:
                data = transform(data)
            info = tarfile.TarInfo(member.name)
            info.size = len(data)
            tar_out.addfile(info, io.BytesIO(data))


def test_tampered_member_is_detected(tmp_path: Path):
    path = tmp_path / "set.tar"
    _write(path)
    tampered = tmp_path / "tampered.tar"
    _rewrite_member(path, tampered, "metadata.csv", lambda data: data.replace(b"0.25", b"0.35"))
    with pytest.raises(ArchiveError, match="sha256 mismatch for metadata.csv"):
        read_archive(tampered)


def test_malformed_archives_are_rejected(tmp_path: Path):
    garbage = tmp_path / "garbage.tar"
    garbage.write_bytes(b"not a tar file at all" * 100)
    with pytest.raises(ArchiveError, match="not a readable"):
        read_archive(garbage)
    no_manifest = tmp_path / "empty.tar"
    with tarfile.open(no_manifest, "w") as tar:
        info = tarfile.TarInfo("hello.txt")
        info.size = 2
        tar.addfile(info, io.BytesIO(b"hi"))
    with pytest.raises(ArchiveError, match="no manifest.json"):
        read_archive(no_manifest)
    with pytest.raises(ArchiveError, match="no such archive"):
        read_archive(tmp_path / "missing.tar")


def test_failed_write_leaves_no_file(tmp_path: Path):
    path = tmp_path / "out.tar"
    distilled = _sample_set()
    bad_manifest = {"dataset": {"classes": ["only-one"]}}  # labels 1 and 2 have no class name
    with pytest.raises(IndexError):
        write_archive(path, distilled, bad_manifest)
    assert not path.exists() and not list(tmp_path.iterdir())
