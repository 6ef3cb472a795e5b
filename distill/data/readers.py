"""Readers for the on-disk dataset formats: IDX (MNIST family), CIFAR pickles, ImageFolder trees and tarballs.

Readers return plain numpy arrays (uint8, N x C x H x W) or lists of files; the registry wraps them in splits.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import os
import pickle
import shutil
import tarfile
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from distill.errors import DistillError
from distill.files import atomic_output, atomic_write_json

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".webp", ".ppm", ".tif", ".tiff", ".gif", ".jpe"}


# ----------------------------------------------------------------------------------------------- IDX
def read_idx(path: Path) -> np.ndarray:
    """Read one IDX file (gzip or raw) into an array of its declared shape."""
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as handle:
        data = handle.read()
    if len(data) < 4 or data[0] != 0 or data[1] != 0:
        raise DistillError(f"{path}: not an IDX file (bad magic)")
    dtype_code, ndim = data[2], data[3]
    dtypes: dict[int, Any] = {0x08: np.uint8, 0x09: np.int8, 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}
    if dtype_code not in dtypes:
        raise DistillError(f"{path}: unknown IDX data type {dtype_code:#x}")
    shape = tuple(int.from_bytes(data[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim))
    array = np.frombuffer(data, dtype=dtypes[dtype_code], offset=4 + 4 * ndim)
    if array.size != int(np.prod(shape)):
        raise DistillError(f"{path}: truncated IDX file ({array.size} values, header says {shape})")
    return array.reshape(shape)


def find_idx(folder: Path, stem: str) -> Path:
    for name in (f"{stem}.gz", stem, stem.replace("-idx", ".idx")):
        if (folder / name).exists():
            return folder / name
    raise DistillError(f"missing data file {folder / stem}[.gz]")


def read_idx_split(folder: Path, prefix: str) -> tuple[np.ndarray, np.ndarray]:
    """MNIST-family split: ``{prefix}-images-idx3-ubyte`` and ``{prefix}-labels-idx1-ubyte``."""
    images = read_idx(find_idx(folder, f"{prefix}-images-idx3-ubyte"))
    labels = read_idx(find_idx(folder, f"{prefix}-labels-idx1-ubyte")).astype(np.int64)
    if len(images) != len(labels):
        raise DistillError(f"{folder}: {len(images)} images but {len(labels)} labels for split {prefix}")
    return images[:, None, :, :].copy(), labels


# ---------------------------------------------------------------------------------------- CIFAR pickles
def _unpickle(raw: bytes) -> dict:
    return pickle.loads(raw, encoding="latin1")


def _cifar_members(source: Path) -> Callable[[str], bytes]:
    """Return a function reading a member (by base name) from a folder or a .tar.gz."""
    if source.is_dir():
        return lambda name: (source / name).read_bytes()
    archive = tarfile.open(source, "r:*")
    members = {Path(m.name).name: m for m in archive.getmembers() if m.isfile()}

    def read(name: str) -> bytes:
        if name not in members:
            raise DistillError(f"{source}: member {name} missing")
        handle = archive.extractfile(members[name])
        assert handle is not None
        return handle.read()

    return read


def read_cifar10_pickles(source: Path) -> tuple[dict, list[str]]:
    read = _cifar_members(source)
    meta = _unpickle(read("batches.meta"))
    splits = {}
    for split, names in (("train", [f"data_batch_{i}" for i in range(1, 6)]), ("test", ["test_batch"])):
        batches = [_unpickle(read(n)) for n in names]
        images = np.concatenate([b["data"] for b in batches]).reshape(-1, 3, 32, 32)
        labels = np.concatenate([np.asarray(b["labels"], dtype=np.int64) for b in batches])
        splits[split] = (images, labels)
    return splits, list(meta["label_names"])


def read_cifar100_pickles(source: Path) -> tuple[dict, list[str]]:
    read = _cifar_members(source)
    meta = _unpickle(read("meta"))
    splits = {}
    for split in ("train", "test"):
        batch = _unpickle(read(split))
        splits[split] = (batch["data"].reshape(-1, 3, 32, 32), np.asarray(batch["fine_labels"], dtype=np.int64))
    return splits, list(meta["fine_label_names"])


# --------------------------------------------------------------------------------------- ImageFolder
def unpack_once(tarball: Path, cache_dir: Path) -> Path:
    """Unpack a tarball into the cache (keyed by name, size and mtime) exactly once; return the folder."""
    stat = tarball.stat()
    key = hashlib.sha256(f"{tarball.resolve()}:{stat.st_size}:{stat.st_mtime_ns}".encode()).hexdigest()[:16]
    target = cache_dir / "unpacked" / f"{tarball.name.split('.')[0]}-{key}"
    if (target / ".complete").exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    scratch = Path(tempfile.mkdtemp(prefix=".unpack-", dir=target.parent))
    try:
        with tarfile.open(tarball, "r:*") as archive:
            archive.extractall(scratch, filter="data")
    except (tarfile.TarError, OSError, EOFError) as exc:
        shutil.rmtree(scratch, ignore_errors=True)
        raise DistillError(f"{tarball}: cannot unpack ({exc})") from exc
    (scratch / ".complete").write_text("ok")
    if target.exists() and not (target / ".complete").exists():
        shutil.rmtree(target, ignore_errors=True)  # a partial folder left by an older version
    try:
        os.replace(scratch, target)  # fails on a non-empty target: never replaces a folder a reader may be using
    except OSError:
        shutil.rmtree(scratch, ignore_errors=True)
        if not (target / ".complete").exists():
            raise
        # another process unpacked the same tarball meanwhile: keep its folder
    return target


def locate_imagefolder_root(folder: Path) -> Path:
    """Find the directory that holds ``train/`` (a tarball often wraps the tree in one top folder)."""
    if (folder / "train").is_dir():
        return folder
    children = [c for c in folder.iterdir() if c.is_dir() and not c.name.startswith(".")]
    for child in children:
        if (child / "train").is_dir():
            return child
    raise DistillError(f"{folder}: no train/ folder found (ImageFolder layout: train/<class>/*.jpg, val|test/...)")


def list_imagefolder(split_dir: Path, classes: list[str] | None = None) -> tuple[list[str], list[str], np.ndarray]:
    """List an ImageFolder split: sorted class folders, sorted files per class (relative paths), labels."""
    if classes is None:
        classes = sorted(d.name for d in split_dir.iterdir() if d.is_dir() and not d.name.startswith("."))
    if not classes:
        raise DistillError(f"{split_dir}: no class folders")
    files: list[str] = []
    labels: list[int] = []
    for label, name in enumerate(classes):
        class_dir = split_dir / name
        if not class_dir.is_dir():
            continue
        names = sorted(
            entry.name
            for entry in os.scandir(class_dir)
            if entry.is_file() and Path(entry.name).suffix.lower() in IMAGE_SUFFIXES
        )
        files.extend(f"{name}/{n}" for n in names)
        labels.extend([label] * len(names))
    return classes, files, np.asarray(labels, dtype=np.int64)


class BadImageError(DistillError):
    """One image file that cannot be decoded (truncated, corrupt, not an image): skipped, never fatal, by the loader."""

    def __init__(self, path: Path | str, reason: str):
        super().__init__(f"{path}: {reason}")
        self.path = str(path)
        self.reason = reason


# Images whose resized long side would exceed this many times the target are centre-cut before resizing, so a
# 1 x 10000 strip cannot allocate a 256 x 2.5M intermediate. Ordinary aspects (ImageNet: at most ~1:4) never are.
MAX_ASPECT = 8


def _to_8bit(img: Image.Image) -> Image.Image:
    """16-bit / 32-bit integer and float grayscale -> 8-bit L (PIL's own convert clips 16-bit data at 255)."""
    array = np.asarray(img)
    if img.mode == "F":
        array = array.astype(np.float64)
        high = float(np.nanmax(array)) if array.size else 0.0
        array = np.nan_to_num(array * (255.0 if high <= 1.0 else 1.0))
    else:
        array = array.astype(np.float64)
        high = float(array.max()) if array.size else 0.0
        if high > 255:  # 16-bit data (I;16*, or I from a 16-bit PNG)
            array = array / 257.0
    return Image.fromarray(np.clip(np.rint(array), 0, 255).astype(np.uint8), "L")


def _normalise_mode(img: Image.Image, channels: int) -> Image.Image:
    """Any PIL mode -> L or RGB: CMYK and YCbCr convert, palette and alpha drop transparency (torchvision's
    ImageFolder does the same ``convert("RGB")``), 16-bit and float grayscale are rescaled to 8 bits."""
    if img.mode in ("I", "F") or img.mode.startswith("I;16"):
        img = _to_8bit(img)
    elif img.mode == "P" and "transparency" in img.info:
        img = img.convert("RGBA")  # PIL's warning path: palette transparency goes through RGBA
    elif img.mode in ("LA", "La", "PA"):
        img = img.convert("L" if img.mode != "PA" else "RGBA")
    target = "L" if channels == 1 else "RGB"
    return img if img.mode == target else img.convert(target)


def load_image(path: Path, size: int, channels: int) -> np.ndarray:
    """Decode one image to uint8 C x size x size: resize the short side, centre crop (torchvision's eval policy).

    Odd files are converted where that is meaningful (CMYK, 16-bit, palette, alpha, grayscale as RGB and back,
    tiny images are upsampled); a file that cannot be decoded (truncated, corrupt, not an image) raises
    :class:`BadImageError` naming the file, which the loader turns into a skipped index.
    """
    try:
        with Image.open(path) as opened:
            opened.load()
            img = _normalise_mode(opened, channels)
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as exc:  # UnidentifiedImageError is OSError
        raise BadImageError(path, f"unreadable image ({type(exc).__name__}: {exc})") from exc
    width, height = img.size
    if width < 1 or height < 1:
        raise BadImageError(path, f"empty image ({width}x{height})")
    if max(width, height) > MAX_ASPECT * min(width, height):  # centre-cut extreme strips first
        keep = MAX_ASPECT * min(width, height)
        if width > height:
            left = (width - keep) // 2
            img = img.crop((left, 0, left + keep, height))
        else:
            top = (height - keep) // 2
            img = img.crop((0, top, width, top + keep))
        width, height = img.size
    if (width, height) != (size, size):
        scale = size / min(width, height)
        new_w, new_h = max(size, round(width * scale)), max(size, round(height * scale))
        img = img.resize((new_w, new_h), Image.Resampling.BICUBIC)
        left, top = (new_w - size) // 2, (new_h - size) // 2
        img = img.crop((left, top, left + size, top + size))
    array = np.asarray(img, dtype=np.uint8)
    return array[None] if channels == 1 else array.transpose(2, 0, 1)


def try_load_image(path: Path, size: int, channels: int) -> tuple[np.ndarray | None, str | None]:
    """:func:`load_image` that returns ``(None, reason)`` for a bad file instead of raising."""
    try:
        return load_image(path, size, channels), None
    except BadImageError as exc:
        return None, exc.reason


def probe_image(path: Path) -> tuple[int, int, str]:
    with Image.open(path) as img:
        return img.size[0], img.size[1], img.mode


def try_probe(path: Path) -> tuple[int, int, str] | None:
    """:func:`probe_image`, or None for a file PIL cannot identify."""
    try:
        return probe_image(path)
    except (OSError, SyntaxError, ValueError):
        return None


@dataclass
class FolderReport:
    """What a pre-flight look at an ImageFolder found: ``errors`` stop a job before any work, ``warnings`` don't."""

    errors: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    images: dict[str, int] = field(default_factory=dict)  # split -> image files found
    unreadable: list[str] = field(default_factory=list)  # relative paths that failed the header probe

    def raise_for_errors(self) -> None:
        if self.errors:
            more = f" (and {len(self.errors) - 1} more problems)" if len(self.errors) > 1 else ""
            raise DistillError(self.errors[0] + more)


def _few(names: list[str], limit: int = 3) -> str:
    return ", ".join(names[:limit]) + (f", ... ({len(names)} in all)" if len(names) > limit else "")


def check_imagefolder(root: Path, splits: tuple[str, ...] = ("train",), classes: list[str] | None = None,
                      probe_per_class: int | None = 20) -> FolderReport:
    """Pre-flight check of an ImageFolder before any decoding or encoding starts.

    Errors: a split folder missing, no class folders, a class folder without image files in the first split
    (training). Warnings: class folders of ``classes`` missing, empty class folders in the other splits,
    files that are not images (by suffix), empty files, and files whose header PIL cannot read among the
    ``probe_per_class`` probed per class (evenly spread; ``None`` probes all). Bad files are skipped at load
    time, so they only warn unless a whole class is unreadable.
    """
    report = FolderReport()
    for position, split in enumerate(splits):
        split_dir = root / split
        if not split_dir.is_dir():
            report.errors.append(f"{root}: no {split}/ folder (ImageFolder layout: {split}/<class>/<image>)")
            continue
        found = sorted(d.name for d in split_dir.iterdir() if d.is_dir() and not d.name.startswith("."))
        wanted = classes if classes is not None else found
        if not wanted:
            report.errors.append(f"{split_dir}: no class folders")
            continue
        missing = [c for c in wanted if c not in set(found)]
        empty: list[str] = []
        non_images: list[str] = []
        zero: list[str] = []
        total = 0
        for name in wanted:
            if name in missing:
                continue
            entries = sorted((e for e in os.scandir(split_dir / name) if e.is_file() and not e.name.startswith(".")),
                             key=lambda e: e.name)
            images = [e for e in entries if Path(e.name).suffix.lower() in IMAGE_SUFFIXES]
            non_images.extend(f"{name}/{e.name}" for e in entries if Path(e.name).suffix.lower() not in IMAGE_SUFFIXES)
            zero.extend(f"{name}/{e.name}" for e in images if e.stat().st_size == 0)
            total += len(images)
            if not images:
                empty.append(name)
                continue
            step = 1 if probe_per_class is None else max(1, len(images) // max(1, probe_per_class))
            probed = images[::step] if probe_per_class is None else images[::step][:probe_per_class]
            bad = []
            for entry in probed:
                try:
                    with Image.open(entry.path) as img:  # header only (cheap); PNG and others verify checksums
                        if img.format != "JPEG":
                            img.verify()
                except Exception:  # any failure means "unreadable" here
                    bad.append(f"{name}/{entry.name}")
            report.unreadable.extend(f"{split}/{b}" for b in bad)
            if len(bad) == len(probed):
                report.errors.append(f"{split_dir / name}: none of the {len(probed)} files probed is a readable image")
        report.images[split] = total
        if missing:  # a partial copy (a subset of ImageNet's wnids) is usable; its missing classes have 0 images
            report.warnings.append(f"{split_dir}: class folders missing: {_few(missing)}")
        if empty:
            message = f"{split_dir}: class folders without images: {_few(empty)}"
            (report.errors if position == 0 else report.warnings).append(message)
        if non_images:
            report.warnings.append(f"{split_dir}: {len(non_images)} non-image files ignored: {_few(non_images)}")
        if zero:
            report.warnings.append(f"{split_dir}: {len(zero)} empty files will be skipped: {_few(zero)}")
    if report.unreadable:
        report.warnings.append(f"{root}: {len(report.unreadable)} probed files are unreadable and will be skipped: "
                               f"{_few(report.unreadable)}")
    return report


def imagefolder_fingerprint(root: Path, splits: tuple[str, ...]) -> str:
    """Content key of an ImageFolder: every image file's relative name, size and mtime (16 hex digits).

    Caches (file index, decoded arrays) keyed by it are never served stale when files are added, removed,
    renamed or rewritten. Costs one ``stat`` per file (os.scandir); ImageNet's 1.28M files take tens of seconds
    on a local disk, once per process (datasets are cached per process).
    """
    digest = hashlib.sha256(str(root.resolve()).encode())
    for split in splits:
        split_dir = root / split
        for class_entry in sorted((e for e in os.scandir(split_dir) if e.is_dir() and not e.name.startswith(".")),
                                  key=lambda e: e.name):
            entries = sorted((e for e in os.scandir(class_entry.path)
                              if e.is_file() and Path(e.name).suffix.lower() in IMAGE_SUFFIXES), key=lambda e: e.name)
            digest.update(f"{split}/{class_entry.name}\0".encode())
            for entry in entries:
                stat = entry.stat()
                digest.update(f"{entry.name}\0{stat.st_size}\0{stat.st_mtime_ns}\n".encode())
    return digest.hexdigest()[:16]


def decode_all(root: Path, files: list[str], size: int, channels: int, progress: Callable | None = None) -> np.ndarray:
    out = np.empty((len(files), channels, size, size), dtype=np.uint8)
    for i, rel in enumerate(files):
        out[i] = load_image(root / rel, size, channels)
        if progress is not None and i % 2000 == 0:
            progress(i / max(1, len(files)))
    return out


def cached_json(path: Path, build: Callable[[], dict]) -> dict:
    if path.exists():
        return json.loads(path.read_text())
    value = build()
    atomic_write_json(path, value)
    return value


def cached_npz(path: Path, build: Callable[[], dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
    if path.exists():
        with np.load(path) as data:
            return {k: data[k] for k in data.files}
    value = build()
    with atomic_output(path, suffix=".npz") as tmp:
        np.savez(tmp, **value)  # type: ignore[arg-type]  # numpy's stub types **kwds as bool (allow_pickle)
    return value


def read_bytes_image(raw: bytes) -> Image.Image:
    return Image.open(io.BytesIO(raw))
