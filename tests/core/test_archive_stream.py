"""The streamed archive writer: same members as the old in-memory writer, bounded memory, uint8 format 2, and a
preview that reads only the PNGs it shows."""

from __future__ import annotations

import csv
import hashlib
import io
import json
import tarfile
import tracemalloc
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from safetensors.torch import save as save_safetensors

from distill import archive as arch
from distill.archive import build_manifest, preview_png, preview_sample, read_archive, to_png, write_archive
from distill.errors import ArchiveError
from distill.methods.base import DistilledSet

DATASET = {"name": "toy", "classes": ["a/x", "b", "c"], "channels": 3, "image_size": 8}


def _set(uint8: bool = False, n_per_class: int = 2, size: int = 8) -> DistilledSet:
    g = torch.Generator().manual_seed(0)
    n = 3 * n_per_class
    images = torch.rand(n, 3, size, size, generator=g)
    return DistilledSet(
        images=(images * 255).round().to(torch.uint8) if uint8 else images * 1.2 - 0.1,
        labels=torch.arange(3).repeat_interleave(n_per_class),
        soft_labels=torch.randn(n, 3, generator=g),
        weights=torch.rand(n, generator=g),
        learned_lr=0.0123,
        extras={"latents": torch.randn(n, 4, 2, 2, generator=g)},
        metrics={"w2": 1.5},
    )


def _old_writer(path: Path, distilled: DistilledSet, manifest: dict) -> None:
    """The format-1 writer as it was before streaming (all members built in memory, then one tar)."""
    classes = manifest["dataset"]["classes"]
    folders = arch._unique_folders(classes)
    members, rows, seen = [], [], {}
    for i in range(len(distilled)):
        label = int(distilled.labels[i])
        k = seen.get(label, 0)
        seen[label] = k + 1
        name = f"images/{folders[label]}/{k:05d}.png"
        members.append((name, to_png(distilled.images[i])))
        rows.append((name, label, classes[label], f"{float(distilled.weights[i]):.8g}"))
    table = io.StringIO()
    writer = csv.writer(table, lineterminator="\n")
    writer.writerow(["file", "label", "class", "weight"])
    writer.writerows(rows)
    members.append(("metadata.csv", table.getvalue().encode()))
    members.append(("tensors.safetensors", save_safetensors(arch._tensor_dict(distilled))))
    manifest = dict(manifest, format_version=1, files={n: hashlib.sha256(d).hexdigest() for n, d in members})
    with tarfile.open(path, "w", format=tarfile.PAX_FORMAT) as tar:
        for name, data in [("manifest.json", json.dumps(manifest).encode()), *members]:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))


def _members(path: Path) -> dict[str, bytes]:
    with tarfile.open(path) as tar:
        return {m.name: tar.extractfile(m).read() for m in tar.getmembers()}


def test_streamed_archive_matches_the_old_format(tmp_path: Path):
    distilled = _set()
    manifest = build_manifest(distilled, dataset=DATASET, method="random", ipc=2, params={}, seed=3)
    old, new = tmp_path / "old.tar", tmp_path / "new.tar"
    stored = replace(distilled, weights=arch.normalised_weights(distilled.weights))  # the contract: mean 1.0
    _old_writer(old, stored, manifest)
    digest = write_archive(new, distilled, manifest)
    assert digest == hashlib.sha256(new.read_bytes()).hexdigest()
    old_members, new_members = _members(old), _members(new)
    assert list(new_members)[:2] == ["manifest.json", "manifest.digest.json"]
    assert list(old_members) == [n for n in new_members if n != "manifest.digest.json"]
    for name in old_members:
        if name != "manifest.json":
            assert old_members[name] == new_members[name], name
    assert json.loads(new_members["manifest.json"])["files"] == json.loads(old_members["manifest.json"])["files"]
    assert json.loads(new_members["manifest.json"])["format_version"] == 1  # float images: format 1 unchanged
    with pytest.warns(UserWarning, match="predates manifest.digest.json"):  # old archives: read, with a warning
        old_loaded = read_archive(old).distilled
    for loaded in (old_loaded, read_archive(new).distilled):  # both verify
        assert torch.equal(loaded.images, distilled.images) and torch.equal(loaded.weights, stored.weights)
        assert torch.equal(loaded.extras["latents"], distilled.extras["latents"]) and loaded.learned_lr == 0.0123
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no spool or partial left


def test_uint8_images_are_format_2_and_read_back_exactly(tmp_path: Path):
    distilled = _set(uint8=True)
    manifest = build_manifest(distilled, dataset=DATASET, method="oq", ipc=2, params={}, seed=0)
    write_archive(tmp_path / "u.tar", distilled, manifest)
    loaded = read_archive(tmp_path / "u.tar")
    assert loaded.manifest["format_version"] == 2 and loaded.distilled.images.dtype == torch.uint8
    assert torch.equal(loaded.distilled.images, distilled.images)
    torch.testing.assert_close(loaded.distilled.pixels(), distilled.images.float() / 255)
    assert len(_members(tmp_path / "u.tar")["tensors.safetensors"]) < 6 * 3 * 8 * 8 * 4  # 1 byte per pixel


def test_write_memory_is_bounded_by_one_member(tmp_path: Path):
    distilled = _set(n_per_class=100, size=48)  # 300 random PNGs of ~7 KB
    manifest = build_manifest(distilled, dataset=DATASET, method="random", ipc=100, params={}, seed=0)
    png_bytes = sum(len(to_png(img)) for img in distilled.images)
    tracemalloc.start()
    write_archive(tmp_path / "big.tar", distilled, manifest)
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    assert peak < png_bytes / 2, (peak, png_bytes)  # python-side bytes: a few PNGs + metadata, never all of them


def test_preview_reads_only_the_pngs_it_shows(tmp_path: Path):
    distilled = _set(n_per_class=4)
    manifest = build_manifest(distilled, dataset=DATASET, method="random", ipc=4, params={}, seed=0)
    path = tmp_path / "p.tar"
    write_archive(path, distilled, manifest)
    expected = preview_png(read_archive(path), max_per_class=3)  # the preview as drawn from the whole archive
    sample = preview_sample(path, max_per_class=3)
    assert len(sample.distilled) == 9 and sample.distilled.images.dtype == torch.uint8
    assert preview_png(sample, max_per_class=3) == expected
    # break the tensors member: the full read refuses it, the preview never touches it
    broken = tmp_path / "broken.tar"
    with tarfile.open(path) as tar_in, tarfile.open(broken, "w") as tar_out:
        for member in tar_in.getmembers():
            data = tar_in.extractfile(member).read()
            if member.name == "tensors.safetensors":
                data = b"\xff" * len(data)
            tar_out.addfile(member, io.BytesIO(data))
    with pytest.raises(ArchiveError):
        read_archive(broken)
    assert preview_png(preview_sample(broken, max_per_class=3), max_per_class=3) == expected
