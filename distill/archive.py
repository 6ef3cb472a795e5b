"""The one archive format: writer and reader (with integrity checks) of a distilled set.

A plain tar file whose first member is ``manifest.json``:

    manifest.json                 format version, dataset, ordered classes, method, ipc, params, seed,
                                  code version, timings, metrics and the sha256 of every other member
    images/<class>/<NNNNN>.png    the images in ImageFolder layout (a user can just unpack these)
    metadata.csv                  file,label,class,weight per image
    tensors.safetensors           exact float tensors: images, labels, soft_labels, weights, learned_lr, extras

Written to a temporary name in the target folder, then renamed: a reader never sees a partial archive.
``load_dataset(path)`` gives an archive as a torch Dataset in one call; ``preview_png`` draws the labelled grid
the API serves as a job's preview.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import re
import tarfile
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import torch
from PIL import Image
from safetensors.torch import load as load_safetensors
from safetensors.torch import save as save_safetensors

from distill import __version__
from distill.errors import ArchiveError
from distill.files import atomic_output
from distill.methods.base import DistilledSet

FORMAT_VERSION = 1
MANIFEST = "manifest.json"
TENSORS = "tensors.safetensors"
METADATA = "metadata.csv"


@dataclass
class Archive:
    manifest: dict[str, Any]
    distilled: DistilledSet

    @property
    def dataset(self) -> str:
        return self.manifest["dataset"]["name"]

    @property
    def classes(self) -> list[str]:
        return self.manifest["dataset"]["classes"]


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while block := handle.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def code_version() -> str:
    """Package version plus the git commit when running from a checkout."""
    try:
        head = Path(__file__).resolve().parents[1] / ".git" / "HEAD"
        ref = head.read_text().strip()
        if ref.startswith("ref: "):
            ref_path = head.parent / ref[5:]
            ref = ref_path.read_text().strip() if ref_path.exists() else ""
        return f"{__version__}+g{ref[:10]}" if ref else __version__
    except OSError:
        return __version__


def safe_folder_name(name: str) -> str:
    cleaned = re.sub(r"[^A-Za-z0-9._-]+", "_", name).strip("._")
    return cleaned or "class"


def to_png(image: torch.Tensor) -> bytes:
    """Float C x H x W in [0, 1] -> PNG bytes (clamped and rounded; exact values live in safetensors)."""
    array = (image.clamp(0, 1) * 255).round().to(torch.uint8).numpy()
    pil = Image.fromarray(array[0], mode="L") if array.shape[0] == 1 else Image.fromarray(array.transpose(1, 2, 0))
    buffer = io.BytesIO()
    pil.save(buffer, format="PNG")
    return buffer.getvalue()


def build_manifest(
    distilled: DistilledSet,
    *,
    dataset: dict[str, Any],
    method: str,
    ipc: int,
    params: dict[str, Any],
    seed: int,
    timings: dict[str, float] | None = None,
    extra: dict[str, Any] | None = None,
) -> dict[str, Any]:
    return {
        "format_version": FORMAT_VERSION,
        "created_at": datetime.now(UTC).isoformat(timespec="seconds"),
        "code_version": code_version(),
        "dataset": dataset,
        "method": method,
        "ipc": ipc,
        "params": params,
        "seed": seed,
        "num_images": len(distilled),
        "has_soft_labels": distilled.soft_labels is not None,
        "has_weights": distilled.weights is not None,
        "learned_lr": distilled.learned_lr,
        "timings": {k: round(v, 3) for k, v in (timings or {}).items()},
        "metrics": distilled.metrics,
        **(extra or {}),
    }


def write_archive(path: Path, distilled: DistilledSet, manifest: dict[str, Any]) -> str:
    """Write the archive atomically; returns its sha256."""
    path = Path(path)
    classes: list[str] = manifest["dataset"]["classes"]
    folders = _unique_folders(classes)
    members: list[tuple[str, bytes]] = []
    rows = []
    per_class_count: dict[int, int] = {}
    for i in range(len(distilled)):
        label = int(distilled.labels[i])
        k = per_class_count.get(label, 0)
        per_class_count[label] = k + 1
        name = f"images/{folders[label]}/{k:05d}.png"
        members.append((name, to_png(distilled.images[i])))
        weight = float(distilled.weights[i]) if distilled.weights is not None else 1.0
        rows.append((name, label, classes[label], f"{weight:.8g}"))
    table = io.StringIO()
    writer = csv.writer(table, lineterminator="\n")
    writer.writerow(["file", "label", "class", "weight"])
    writer.writerows(rows)
    members.append((METADATA, table.getvalue().encode()))
    members.append((TENSORS, _tensor_bytes(distilled)))
    manifest = dict(manifest)
    manifest["files"] = {name: sha256_bytes(data) for name, data in members}
    manifest_bytes = json.dumps(manifest, indent=2, sort_keys=False).encode()

    with atomic_output(path) as tmp:
        with tarfile.open(tmp, mode="w", format=tarfile.PAX_FORMAT) as tar:
            for name, data in [(MANIFEST, manifest_bytes), *members]:
                info = tarfile.TarInfo(name)
                info.size = len(data)
                info.mtime = int(time.time())
                info.mode = 0o644
                tar.addfile(info, io.BytesIO(data))
        digest = sha256_file(tmp)
    return digest


def _unique_folders(classes: list[str]) -> list[str]:
    seen: dict[str, int] = {}
    out = []
    for i, name in enumerate(classes):
        folder = f"{i:04d}_{safe_folder_name(name)}" if len(classes) > 1 else safe_folder_name(name)
        seen[folder] = seen.get(folder, 0) + 1
        out.append(folder)
    return out


def _tensor_bytes(distilled: DistilledSet) -> bytes:
    tensors = {"images": distilled.images, "labels": distilled.labels}
    if distilled.soft_labels is not None:
        tensors["soft_labels"] = distilled.soft_labels
    if distilled.weights is not None:
        tensors["weights"] = distilled.weights
    if distilled.learned_lr is not None:
        tensors["learned_lr"] = torch.tensor([distilled.learned_lr], dtype=torch.float64)
    for key, value in distilled.extras.items():
        tensors[f"extra.{key}"] = value
    return save_safetensors({k: v.contiguous() for k, v in tensors.items()})


def read_archive(path: Path, verify: bool = True) -> Archive:
    """Read and (by default) verify an archive: every member's sha256 must match the manifest."""
    path = Path(path)
    if not path.is_file():
        raise ArchiveError(f"{path}: no such archive")
    try:
        with tarfile.open(path, mode="r:*") as tar:
            contents: dict[str, bytes] = {}
            for member in tar.getmembers():
                if not member.isfile():
                    continue
                if member.name.startswith("/") or ".." in Path(member.name).parts:
                    raise ArchiveError(f"{path}: unsafe member name {member.name!r}")
                handle = tar.extractfile(member)
                if handle is not None:
                    contents[member.name] = handle.read()
    except (tarfile.TarError, EOFError, OSError, zlib_error()) as exc:
        raise ArchiveError(f"{path}: not a readable distilled-set archive ({exc})") from exc
    if MANIFEST not in contents:
        raise ArchiveError(f"{path}: malformed archive, no {MANIFEST}")
    try:
        manifest = json.loads(contents[MANIFEST])
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ArchiveError(f"{path}: malformed {MANIFEST} ({exc})") from exc
    if not isinstance(manifest, dict) or manifest.get("format_version") != FORMAT_VERSION:
        version = manifest.get("format_version") if isinstance(manifest, dict) else "?"
        raise ArchiveError(f"{path}: unsupported archive format {version}")
    files = manifest.get("files")
    if not isinstance(files, dict) or TENSORS not in files:
        raise ArchiveError(f"{path}: manifest lists no files")
    if verify:
        for name, expected in files.items():
            if name not in contents:
                raise ArchiveError(f"{path}: member {name} is missing")
            if sha256_bytes(contents[name]) != expected:
                raise ArchiveError(f"{path}: sha256 mismatch for {name} (the archive was modified or is corrupt)")
        unexpected = set(contents) - set(files) - {MANIFEST}
        if unexpected:
            raise ArchiveError(f"{path}: unexpected members {sorted(unexpected)[:3]}")
    try:
        tensors = load_safetensors(contents[TENSORS])
    except Exception as exc:  # safetensors raises its own error types
        raise ArchiveError(f"{path}: unreadable {TENSORS} ({exc})") from exc
    for key in ("images", "labels"):
        if key not in tensors:
            raise ArchiveError(f"{path}: {TENSORS} has no '{key}'")
    lr = tensors.get("learned_lr")
    distilled = DistilledSet(
        images=tensors["images"],
        labels=tensors["labels"],
        soft_labels=tensors.get("soft_labels"),
        weights=tensors.get("weights"),
        learned_lr=float(lr[0]) if lr is not None else None,
        extras={k[6:]: v for k, v in tensors.items() if k.startswith("extra.")},
        metrics=manifest.get("metrics", {}),
    )
    num_classes = len(manifest.get("dataset", {}).get("classes", []))
    if num_classes and (distilled.labels.min() < 0 or distilled.labels.max() >= num_classes):
        raise ArchiveError(f"{path}: labels out of range for {num_classes} classes")
    return Archive(manifest=manifest, distilled=distilled)


def zlib_error() -> type[BaseException]:
    import zlib

    return zlib.error


def read_manifest(path: Path) -> dict[str, Any]:
    """Only the manifest (the first member), without reading or verifying the rest: cheap for a summary."""
    path = Path(path)
    try:
        with tarfile.open(path, mode="r:*") as tar:
            member = tar.next()
            while member is not None and member.name != MANIFEST:
                member = tar.next()
            handle = tar.extractfile(member) if member is not None else None
            if handle is None:
                raise ArchiveError(f"{path}: malformed archive, no {MANIFEST}")
            manifest = json.loads(handle.read())
    except (tarfile.TarError, EOFError, OSError, json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ArchiveError(f"{path}: not a readable distilled-set archive ({exc})") from exc
    if not isinstance(manifest, dict):
        raise ArchiveError(f"{path}: malformed {MANIFEST}")
    manifest.pop("files", None)
    return manifest


class ArchiveDataset(torch.utils.data.Dataset):
    """A distilled set as a torch Dataset of ``(image, label, weight, soft_label)``.

    ``image`` is a float tensor in pixel scale [0, 1] (C, H, W), passed through ``transform`` if given;
    ``weight`` is the image's weight (1.0 when the method gives none); ``soft_label`` is the archive's teacher
    logits, or the one-hot label when it has none, so a default DataLoader collates every archive alike."""

    def __init__(self, archive: Archive, transform: Any = None):
        self.archive = archive
        self.transform = transform
        d = archive.distilled
        n, k = len(d), len(archive.classes)
        self.images = d.images.float()
        self.labels = d.labels.long()
        self.weights = d.weights.float() if d.weights is not None else torch.ones(n)
        if d.soft_labels is not None:
            self.soft_labels = d.soft_labels.float()
        else:
            self.soft_labels = torch.nn.functional.one_hot(self.labels, num_classes=max(k, 1)).float()

    @property
    def classes(self) -> list[str]:
        return self.archive.classes

    @property
    def manifest(self) -> dict[str, Any]:
        return self.archive.manifest

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int, float, torch.Tensor]:
        image = self.images[index]
        if self.transform is not None:
            image = self.transform(image)
        return image, int(self.labels[index]), float(self.weights[index]), self.soft_labels[index]


def load_dataset(path: Path | str, transform: Any = None, verify: bool = True) -> ArchiveDataset:
    """Read (and verify) an archive and return it as a torch Dataset, ready for a DataLoader."""
    return ArchiveDataset(read_archive(Path(path), verify=verify), transform=transform)


def preview_png(archive: Archive, max_classes: int = 10, max_per_class: int = 10, tile: int = 56) -> bytes:
    """A labelled PNG of the distilled set: one row per class with its name, each image's weight under it
    (when the method gives weights, e.g. ``oq``'s cluster masses)."""
    from PIL import ImageDraw, ImageFont

    d = archive.distilled
    classes = archive.classes
    labels = d.labels.tolist()
    present = sorted(set(labels))[:max_classes]
    font = ImageFont.load_default()
    names = [classes[c] if c < len(classes) else str(c) for c in present]
    names = [name if len(name) <= 18 else name[:17] + "…" for name in names]
    probe = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    label_w = max([int(probe.textlength(n, font=font)) for n in names] + [10]) + 12
    has_weights = d.weights is not None
    caption_h = 14 if has_weights else 0
    pad = 4
    row_h = tile + caption_h + pad
    columns = min(max_per_class, max(labels.count(c) for c in present)) if present else 1
    width = label_w + columns * (tile + pad) + pad
    height = len(present) * row_h + pad
    canvas = Image.new("RGB", (width, max(height, 1)), "white")
    draw = ImageDraw.Draw(canvas)
    for row, label in enumerate(present):
        y = pad + row * row_h
        draw.text((6, y + tile // 2 - 6), names[row], fill=(20, 20, 20), font=font)
        picks = [i for i, lab in enumerate(labels) if lab == label][:max_per_class]
        for col, i in enumerate(picks):
            x = label_w + col * (tile + pad)
            array = (d.images[i].clamp(0, 1) * 255).round().to(torch.uint8).permute(1, 2, 0).numpy()
            image = Image.fromarray(array[:, :, 0], mode="L") if array.shape[2] == 1 else Image.fromarray(array)
            canvas.paste(image.convert("RGB").resize((tile, tile), Image.Resampling.NEAREST), (x, y))
            if has_weights:
                assert d.weights is not None
                text = f"{float(d.weights[i]):.3g}"
                draw.text((x + (tile - probe.textlength(text, font=font)) / 2, y + tile + 1), text, fill=(60, 60, 60),
                          font=font)
    buffer = io.BytesIO()
    canvas.save(buffer, format="PNG")
    return buffer.getvalue()
