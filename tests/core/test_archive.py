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
    torch.testing.assert_close(archive.distilled.weights, original.weights * 2)  # scaled to mean 1.0 (sum was 3)
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
    _rewrite_member(path, tampered, "metadata.csv", lambda data: data.replace(b"0.5", b"0.6"))
    with pytest.raises(ArchiveError, match=r"member metadata.csv was changed \(sha256 mismatch\)"):
        read_archive(tampered)


@pytest.mark.parametrize(("edit", "fields"), [
    (lambda m: m | {"method": "dm"}, ["method"]),
    (lambda m: m | {"seed": 4, "metrics": {"w2": 0.1}}, ["metrics", "seed"]),
    (lambda m: {k: v for k, v in m.items() if k != "code_version"} | {"signed": True}, ["code_version", "signed"]),
])
def test_an_edited_manifest_is_refused_and_verify_names_the_fields(tmp_path: Path, edit, fields: list[str]):
    import json

    from typer.testing import CliRunner

    from distill.archive import load_dataset
    from distill.cli import app

    path = tmp_path / "set.tar"
    _write(path)
    tampered = tmp_path / "tampered.tar"
    _rewrite_member(path, tampered, "manifest.json", lambda data: json.dumps(edit(json.loads(data))).encode())
    with pytest.raises(ArchiveError, match=f"manifest field '{fields[0]}' was"):
        load_dataset(tampered)
    result = CliRunner().invoke(app, ["verify", str(tampered)])
    assert result.exit_code == 1
    lines = result.output.strip().splitlines()
    assert [line.split("'")[1] for line in lines[:-1]] == fields and all(line.startswith("changed: manifest field")
                                                                           for line in lines[:-1])
    assert lines[-1].startswith(f"error: {tampered} was modified or is corrupt ({len(fields)} difference")
    refused = CliRunner().invoke(app, ["eval", str(tampered), "--runs", "1", "--epochs", "1"])
    assert refused.exit_code == 2 and f"manifest field '{fields[0]}' was" in refused.output
    ok = CliRunner().invoke(app, ["verify", str(path)])
    assert ok.exit_code == 0 and ok.output.startswith("ok: random on toy, ipc 2, 6 images, seed 3")


def test_verify_lists_every_changed_member(tmp_path: Path):
    from typer.testing import CliRunner

    from distill.cli import app

    path = tmp_path / "set.tar"
    _write(path)
    once = tmp_path / "once.tar"
    _rewrite_member(path, once, "metadata.csv", lambda data: data + b"x")
    twice = tmp_path / "twice.tar"
    _rewrite_member(once, twice, "images/0001_b/00000.png", lambda data: data[:-1] + b"\0")
    result = CliRunner().invoke(app, ["verify", str(twice)])
    assert result.exit_code == 1
    assert "changed: member images/0001_b/00000.png was changed (sha256 mismatch)" in result.output
    assert "changed: member metadata.csv was changed (sha256 mismatch)" in result.output
    with pytest.raises(ArchiveError, match="1 more: distill verify lists them"):
        read_archive(twice)


def test_every_archive_keeps_the_contract(tmp_path: Path):
    """Whatever a method hands the writer: weights scaled to mean 1.0 (ratios kept; oq's per-class masses become
    mass x ipc), the images' range in the manifest, and a uniform set has weight 1.0 per image."""
    from distill.archive import load_dataset

    labels = torch.arange(3).repeat_interleave(4)
    masses = torch.tensor([0.1, 0.2, 0.3, 0.4, 0.25, 0.25, 0.25, 0.25, 0.7, 0.1, 0.1, 0.1])  # sum 1 per class
    cases = {
        "masses": DistilledSet(images=torch.rand(12, 1, 4, 4) * 1.4 - 0.2, labels=labels, weights=masses),
        "uniform": DistilledSet(images=torch.rand(12, 1, 4, 4), labels=labels, weights=torch.full((12,), 0.25)),
        "none": DistilledSet(images=(torch.rand(12, 1, 4, 4) * 255).to(torch.uint8), labels=labels),
    }
    for name, distilled in cases.items():
        path = tmp_path / f"{name}.tar"
        dataset = {"name": "toy", "classes": ["a", "b", "c"], "channels": 1, "image_size": 4}
        write_archive(path, distilled, build_manifest(distilled, dataset=dataset, method=name, ipc=4, params={},
                                                      seed=0))
        loaded = load_dataset(path)
        pixels = distilled.pixels()
        assert loaded.manifest["image_range"] == pytest.approx([float(pixels.min()), float(pixels.max())], abs=1e-6)
        torch.testing.assert_close(loaded.images, pixels)  # stored as produced, not clamped
        assert float(loaded.weights.mean()) == pytest.approx(1.0)
        if distilled.weights is not None:
            torch.testing.assert_close(loaded.weights, distilled.weights / distilled.weights.mean())
    torch.testing.assert_close(load_dataset(tmp_path / "masses.tar").weights, masses * 4)  # mass x ipc
    assert load_dataset(tmp_path / "uniform.tar").weights.tolist() == [1.0] * 12


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
