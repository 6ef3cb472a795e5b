"""The synthetic ImageNet-shaped set, the streaming loader and odd / bad image handling."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from distill.data import readers
from distill.data.loader import ImageStream
from distill.data.registry import ArraySplit, FileSplit, imagenet_wnids_and_names
from distill.errors import DistillError


@pytest.fixture(scope="module")
def synthetic_root(tmp_path_factory, synthetic_imagenet) -> Path:
    out = tmp_path_factory.mktemp("synthetic") / "imagenet"
    synthetic_imagenet.generate(out, classes=3, per_class=6, val_per_class=2, seed=1, workers=2, size_scale=0.3, quiet=True)
    return out


def _file_split(root: Path, size: int = 32) -> FileSplit:
    classes, files, labels = readers.list_imagefolder(root / "train")
    return FileSplit(root / "train", files, labels, size, 3)


def test_synthetic_layout_and_determinism(synthetic_root: Path, tmp_path: Path, synthetic_imagenet):
    wnids = imagenet_wnids_and_names()[0][:3]
    assert sorted(p.name for p in (synthetic_root / "train").iterdir()) == wnids
    assert sorted(p.name for p in (synthetic_root / "val").iterdir()) == wnids
    for wnid in wnids:
        train = sorted((synthetic_root / "train" / wnid).glob("*.JPEG"))
        assert len(train) == 6 and len(list((synthetic_root / "val" / wnid).glob("*.JPEG"))) == 2
        with Image.open(train[0]) as img:
            assert img.format == "JPEG"
    assert not list(synthetic_root.rglob("*.tmp"))
    again = tmp_path / "again"
    synthetic_imagenet.generate(again, classes=3, per_class=6, val_per_class=2, seed=1, workers=1, size_scale=0.3, quiet=True)
    for path in synthetic_root.rglob("*.JPEG"):
        assert (again / path.relative_to(synthetic_root)).read_bytes() == path.read_bytes()
    other = synthetic_imagenet.make_image(2, "train", 0, 0, 0.3)[0]
    assert other != (synthetic_root / "train" / wnids[0] / f"{wnids[0]}_00000.JPEG").read_bytes()


def test_synthetic_full_size_modes_and_class_structure(synthetic_imagenet):
    sizes = set()
    for i in range(6):
        with Image.open(io.BytesIO(synthetic_imagenet.make_image(0, "train", 0, i, 1.0)[0])) as img:
            sizes.add(img.size)
    assert sizes & {(500, 375), (375, 500), (500, 333)}
    draws = [synthetic_imagenet.make_image(0, "train", 0, i, 0.05)[1] for i in range(400)]
    assert {"RGB", "L", "CMYK"} <= set(draws) and draws.count("RGB") > 370
    # class means differ far more than images within a class: a student has something to learn
    means = [[np.asarray(Image.open(io.BytesIO(synthetic_imagenet.make_image(0, "train", c, i, 0.2)[0])).convert("RGB"),
                         dtype=np.float64).mean((0, 1)) for i in range(4)] for c in range(3)]
    within = np.mean([np.std(m, axis=0).mean() for m in means])
    between = np.std([np.mean(m, axis=0) for m in means], axis=0).mean()
    assert between > 1.5 * within


def test_stream_matches_serial_load(synthetic_root: Path):
    split = _file_split(synthetic_root)
    indices = np.array([5, 0, 17, 3, 3, 11, 8, 2, 16])
    expected = split.load(indices)
    for workers in (0, 2):
        stream = ImageStream(split, indices, batch_size=4, num_workers=workers)
        got_idx, got = zip(*stream, strict=True)
        assert np.array_equal(np.concatenate(got_idx), indices)
        assert [len(g) for g in got] == [4, 4, 1]
        assert np.array_equal(np.concatenate([g.numpy() for g in got]), expected.numpy())
        assert stream.skipped == {}
    array_split = ArraySplit(expected.numpy(), np.zeros(len(indices), dtype=np.int64))
    got = np.concatenate([g.numpy() for _, g in ImageStream(array_split, batch_size=4)])
    assert np.array_equal(got, expected.numpy())


def _odd_files(folder: Path) -> dict[str, str]:
    """Odd but convertible files and hopeless ones; name -> expected outcome."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    rgb = Image.fromarray(rng.integers(0, 255, (40, 60, 3), dtype=np.uint8), "RGB")
    rgb.convert("CMYK").save(folder / "cmyk.jpg", quality=90)
    Image.fromarray((rng.integers(0, 65535, (30, 30))).astype(np.uint16)).save(folder / "gray16.png")
    rgb.convert("P", palette=Image.Palette.ADAPTIVE).save(folder / "palette.png", transparency=0)
    rgb.convert("RGBA").save(folder / "alpha.png")
    rgb.convert("LA").save(folder / "la.png")
    Image.fromarray(np.full((2, 3, 3), 200, dtype=np.uint8)).save(folder / "tiny.png")
    Image.fromarray(np.full((3, 400, 3), 90, dtype=np.uint8)).save(folder / "strip.png")
    full = io.BytesIO()
    rgb.save(full, format="JPEG", quality=90)
    (folder / "truncated.jpg").write_bytes(full.getvalue()[: len(full.getvalue()) // 3])
    (folder / "notimage.jpg").write_bytes(b"this is not a JPEG at all")
    (folder / "empty.jpg").write_bytes(b"")
    return {"cmyk.jpg": "ok", "gray16.png": "ok", "palette.png": "ok", "alpha.png": "ok", "la.png": "ok",
            "tiny.png": "ok", "strip.png": "ok", "truncated.jpg": "bad", "notimage.jpg": "bad", "empty.jpg": "bad"}


def test_odd_images_convert_and_bad_ones_are_skipped(tmp_path: Path):
    expected = _odd_files(tmp_path / "train" / "a")
    for name, outcome in expected.items():
        array, reason = readers.try_load_image(tmp_path / "train" / "a" / name, 16, 3)
        if outcome == "ok":
            assert reason is None and array.shape == (3, 16, 16) and array.dtype == np.uint8, name
        else:
            assert array is None and reason, name
        gray, _ = readers.try_load_image(tmp_path / "train" / "a" / name, 16, 1)
        assert (gray is None) == (outcome == "bad")
    gray16, _ = readers.try_load_image(tmp_path / "train" / "a" / "gray16.png", 30, 1)
    assert 80 < gray16.mean() < 175  # rescaled from 16 bits, not clipped to white
    with pytest.raises(DistillError, match="truncated.jpg"):
        readers.load_image(tmp_path / "train" / "a" / "truncated.jpg", 16, 3)

    split = _file_split(tmp_path, size=16)
    stream = ImageStream(split, batch_size=3, num_workers=2)
    kept = np.concatenate([idx for idx, _ in stream])
    bad = {i for i, f in enumerate(split.files) if expected[Path(f).name] == "bad"}
    assert set(stream.skipped) == bad and set(kept.tolist()) == set(range(len(split))) - bad
    assert all("a/" in reason for reason in stream.skipped.values())


def test_preflight_check(tmp_path: Path, synthetic_root: Path):
    assert readers.check_imagefolder(synthetic_root, ("train", "val")).errors == []
    root = tmp_path / "bad"
    _odd_files(root / "train" / "a")
    (root / "train" / "b").mkdir()
    (root / "train" / "c").mkdir()
    (root / "train" / "c" / "notes.txt").write_text("x")
    (root / "train" / "d").mkdir()
    (root / "train" / "d" / "x.jpg").write_bytes(b"garbage")
    report = readers.check_imagefolder(root, ("train", "val"))
    text = "\n".join(report.errors)
    assert "no val/ folder" in text and "without images: b, c" in text and "d: none of the 1 files" in text
    assert any("non-image files" in w for w in report.warnings) and any("empty files" in w for w in report.warnings)
    assert "train/a/notimage.jpg" in report.unreadable
    with pytest.raises(DistillError, match=r"none of the 1 files probed is a readable image \(and 2 more problems\)"):
        report.raise_for_errors()
    missing = readers.check_imagefolder(root, ("train",), classes=["a", "zz"])
    assert any("missing: zz" in w for w in missing.warnings)
