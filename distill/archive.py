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
Written streaming: one member at a time (each PNG is encoded, hashed and appended to a spool file, then
dropped), the manifest with every member's sha256 goes first into the final file, followed by the spool; no
list of all members is held in memory. Format 2 = format 1 with ``images`` stored as uint8 (0-255) when the
method's images are 8-bit (the latent methods: a quarter of fp32's bytes); format 1 archives read as before.
Reading verifies each member's sha256 chunk by chunk and memory-maps ``tensors.safetensors`` out of a plain
tar instead of reading it into memory.

The manifest itself is covered too: the second member, ``manifest.digest.json``, holds the sha256 of
``manifest.json`` and of each of its top-level fields, so a reader refuses an edited manifest and
``distill verify`` names the fields that changed. Archives written before it existed have no such member: they
are read with a warning (their manifest cannot be checked).

The contract every method's archive keeps (:func:`write_archive` enforces it for all of them):

- images are stored as the method produced them: float pixel scale, nominally [0, 1], or uint8 0-255. Pixel-space
  methods learn values outside [0, 1] and their published evaluations train on them, so they are not clamped;
  the manifest's ``image_range`` gives the stored [min, max] in pixel scale (PNGs are clamped, they are a view);
- weights (when a method gives them, e.g. ``oq``'s cluster masses) are scaled to mean 1.0 over the whole set, so a
  uniformly weighted set has 1.0 per image and relative weights are unchanged (``weights_mean`` in the manifest).
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import os
import re
import tarfile
import tempfile
import time
import warnings
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from safetensors.torch import load as load_safetensors

from distill import __version__
from distill.errors import ArchiveError
from distill.files import atomic_output
from distill.methods.base import DistilledSet

FORMAT_VERSION = 2
READABLE_VERSIONS = (1, 2)
MANIFEST = "manifest.json"
MANIFEST_DIGEST = "manifest.digest.json"  # sha256 of manifest.json and of each of its top-level fields
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
    """Float C x H x W in [0, 1] (or uint8) -> PNG bytes (clamped and rounded; exact values live in safetensors)."""
    array = image.numpy() if image.dtype == torch.uint8 else (image.clamp(0, 1) * 255).round().to(torch.uint8).numpy()
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


def _tar_header(name: str, size: int, mtime: int) -> bytes:
    info = tarfile.TarInfo(name)
    info.size, info.mtime, info.mode = size, mtime, 0o644
    return info.tobuf(format=tarfile.PAX_FORMAT, encoding=tarfile.ENCODING, errors="surrogateescape")


def _pad(size: int) -> bytes:
    return b"\0" * (-size % tarfile.BLOCKSIZE)


class _Spool:
    """Tar records (header, data, padding) appended one member at a time, each hashed on the way."""

    def __init__(self, handle):
        self.handle, self.hashes, self.mtime = handle, {}, int(time.time())

    def add(self, name: str, data: bytes) -> None:
        self.handle.write(_tar_header(name, len(data), self.mtime))
        self.handle.write(data)
        self.handle.write(_pad(len(data)))
        self.hashes[name] = sha256_bytes(data)

    def add_file(self, name: str, source: Path, chunk: int = 1 << 18) -> None:
        size = source.stat().st_size
        self.handle.write(_tar_header(name, size, self.mtime))
        digest = hashlib.sha256()
        with open(source, "rb") as handle:
            while block := handle.read(chunk):
                digest.update(block)
                self.handle.write(block)
        self.handle.write(_pad(size))
        self.hashes[name] = digest.hexdigest()


def normalised_weights(weights: torch.Tensor) -> torch.Tensor:
    """Weights scaled to mean 1.0 (a uniform set: 1.0 per image), their ratios unchanged. Evaluation divides by
    the mean anyway; a user's weighted loss then has the scale of an unweighted one."""
    weights = weights.double()
    if not bool(torch.isfinite(weights).all()) or bool((weights < 0).any()) or float(weights.sum()) <= 0:
        raise ValueError("weights must be finite, non-negative and not all zero")
    return (weights * (len(weights) / weights.sum())).float()


def image_range(distilled: DistilledSet) -> list[float]:
    """[min, max] of the images in pixel scale (uint8 storage divided by 255)."""
    if len(distilled) == 0:
        return [0.0, 1.0]
    lo, hi = torch.aminmax(distilled.images)
    scale = 255.0 if distilled.images.dtype == torch.uint8 else 1.0
    return [round(float(lo) / scale, 6), round(float(hi) / scale, 6)]


def manifest_digest(manifest_bytes: bytes) -> dict[str, Any]:
    """What ``manifest.digest.json`` holds: the manifest's sha256 and one per top-level field (to name edits)."""
    fields = json.loads(manifest_bytes)
    return {"sha256": sha256_bytes(manifest_bytes),
            "fields": {k: sha256_bytes(json.dumps(v, sort_keys=True).encode()) for k, v in fields.items()}}


def write_archive(path: Path, distilled: DistilledSet, manifest: dict[str, Any]) -> str:
    """Write the archive atomically and streaming (bounded memory: one PNG at a time); returns its sha256.

    Holds every method to the archive contract (module docstring): weights scaled to mean 1.0, the images'
    range recorded in the manifest, the manifest covered by ``manifest.digest.json``."""
    path = Path(path)
    if distilled.weights is not None:
        distilled = replace(distilled, weights=normalised_weights(distilled.weights))
    classes: list[str] = manifest["dataset"]["classes"]
    folders = _unique_folders(classes)
    path.parent.mkdir(parents=True, exist_ok=True)
    spool_fd, spool_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".members", dir=path.parent)
    try:
        with os.fdopen(spool_fd, "w+b") as spool_handle:
            spool = _Spool(spool_handle)
            table = io.StringIO()
            writer = csv.writer(table, lineterminator="\n")
            writer.writerow(["file", "label", "class", "weight"])
            per_class_count: dict[int, int] = {}
            for i in range(len(distilled)):
                label = int(distilled.labels[i])
                k = per_class_count.get(label, 0)
                per_class_count[label] = k + 1
                name = f"images/{folders[label]}/{k:05d}.png"
                spool.add(name, to_png(distilled.images[i]))
                weight = float(distilled.weights[i]) if distilled.weights is not None else 1.0
                writer.writerow((name, label, classes[label], f"{weight:.8g}"))
            spool.add(METADATA, table.getvalue().encode())
            with tempfile.TemporaryDirectory(prefix=".tensors-", dir=path.parent) as scratch:
                tensors_path = Path(scratch) / TENSORS
                _save_tensors(distilled, tensors_path)
                spool.add_file(TENSORS, tensors_path)
            manifest = dict(manifest)
            manifest["format_version"] = FORMAT_VERSION if distilled.images.dtype == torch.uint8 else 1
            manifest["image_range"] = image_range(distilled)
            manifest["weights_mean"] = 1.0 if distilled.weights is not None else None
            manifest["files"] = spool.hashes
            manifest_bytes = json.dumps(manifest, indent=2, sort_keys=False).encode()
            digest_bytes = json.dumps(manifest_digest(manifest_bytes), indent=1).encode()

            digest = hashlib.sha256()
            with atomic_output(path) as tmp, open(tmp, "wb") as out:
                def emit(block: bytes) -> None:
                    digest.update(block)
                    out.write(block)

                for name, data in ((MANIFEST, manifest_bytes), (MANIFEST_DIGEST, digest_bytes)):
                    emit(_tar_header(name, len(data), spool.mtime) + data + _pad(len(data)))
                spool_handle.seek(0)
                while block := spool_handle.read(1 << 18):
                    emit(block)
                end = 2 * tarfile.BLOCKSIZE
                emit(b"\0" * (end + (-(out.tell() + end) % tarfile.RECORDSIZE)))  # end-of-archive, whole records
    finally:
        Path(spool_name).unlink(missing_ok=True)
    return digest.hexdigest()


def _unique_folders(classes: list[str]) -> list[str]:
    seen: dict[str, int] = {}
    out = []
    for i, name in enumerate(classes):
        folder = f"{i:04d}_{safe_folder_name(name)}" if len(classes) > 1 else safe_folder_name(name)
        seen[folder] = seen.get(folder, 0) + 1
        out.append(folder)
    return out


def _tensor_dict(distilled: DistilledSet) -> dict[str, torch.Tensor]:
    tensors = {"images": distilled.images, "labels": distilled.labels}
    if distilled.soft_labels is not None:
        tensors["soft_labels"] = distilled.soft_labels
    if distilled.weights is not None:
        tensors["weights"] = distilled.weights
    if distilled.learned_lr is not None:
        tensors["learned_lr"] = torch.tensor([distilled.learned_lr], dtype=torch.float64)
    for key, value in distilled.extras.items():
        tensors[f"extra.{key}"] = value
    return {k: v.contiguous() for k, v in tensors.items()}


def _save_tensors(distilled: DistilledSet, path: Path) -> None:
    from safetensors.torch import save_file

    save_file(_tensor_dict(distilled), str(path))


_SAFETENSORS_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
                       "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8,
                       "U8": torch.uint8, "BOOL": torch.bool}


def _mapped_safetensors(path: Path, offset: int, size: int) -> dict[str, torch.Tensor]:
    """The tensors of a safetensors blob at ``offset`` in ``path``, memory-mapped (copy-on-write), not read."""
    with open(path, "rb") as handle:
        handle.seek(offset)
        header_len = int.from_bytes(handle.read(8), "little")
        if header_len <= 0 or 8 + header_len > size:
            raise ValueError("bad safetensors header length")
        header = json.loads(handle.read(header_len))
    body = size - 8 - header_len
    mapped = np.memmap(path, dtype=np.uint8, mode="c", offset=offset + 8 + header_len, shape=(body,)) \
        if body > 0 else np.zeros(0, dtype=np.uint8)
    out = {}
    for name, spec in header.items():
        if name == "__metadata__":
            continue
        start, stop = spec["data_offsets"]
        if not 0 <= start <= stop <= body:
            raise ValueError(f"tensor {name} lies outside the blob")
        raw = torch.from_numpy(mapped[start:stop]) if stop > start else torch.empty(0, dtype=torch.uint8)
        out[name] = raw.view(_SAFETENSORS_DTYPES[spec["dtype"]]).reshape(spec["shape"])
    return out


def _read_members(path: Path) -> tuple[dict[str, bytes], dict[str, str], dict[str, torch.Tensor] | None]:
    """Stream through the tar once: sha256 of every member, bytes of the small ones, tensors memory-mapped.

    Returns (member bytes except images and, in a plain tar, the tensors; sha256 per member; the tensors
    memory-mapped from a plain tar, else None and their bytes are among the members).
    """
    contents: dict[str, bytes] = {}
    hashes: dict[str, str] = {}
    mapped: dict[str, torch.Tensor] | None = None
    try:  # a plain tar (what write_archive writes): member data lies at known offsets of the file
        tar, plain = tarfile.open(path, mode="r:"), True
    except tarfile.ReadError:
        tar, plain = tarfile.open(path, mode="r:*"), False
    with tar:
        for member in tar:
            if not member.isfile():
                continue
            if member.name.startswith("/") or ".." in Path(member.name).parts:
                raise ArchiveError(f"{path}: unsafe member name {member.name!r}")
            handle = tar.extractfile(member)
            if handle is None:
                continue
            keep = not member.name.startswith("images/") and not (member.name == TENSORS and plain)
            digest, parts = hashlib.sha256(), []
            while block := handle.read(1 << 20):
                digest.update(block)
                if keep:
                    parts.append(block)
            hashes[member.name] = digest.hexdigest()
            if keep:
                contents[member.name] = b"".join(parts)
            elif member.name == TENSORS:
                mapped = _mapped_safetensors(path, member.offset_data, member.size)
    return contents, hashes, mapped


def read_archive(path: Path, verify: bool = True) -> Archive:
    """Read and (by default) verify an archive: every member's sha256 must match the manifest."""
    path = Path(path)
    if not path.is_file():
        raise ArchiveError(f"{path}: no such archive")
    try:
        contents, hashes, mapped = _read_members(path)
    except (tarfile.TarError, EOFError, OSError, zlib_error()) as exc:
        raise ArchiveError(f"{path}: not a readable distilled-set archive ({exc})") from exc
    except (ValueError, KeyError) as exc:
        raise ArchiveError(f"{path}: unreadable {TENSORS} ({exc})") from exc
    if MANIFEST not in contents:
        raise ArchiveError(f"{path}: malformed archive, no {MANIFEST}")
    try:
        manifest = json.loads(contents[MANIFEST])
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ArchiveError(f"{path}: malformed {MANIFEST} ({exc})") from exc
    if not isinstance(manifest, dict) or manifest.get("format_version") not in READABLE_VERSIONS:
        version = manifest.get("format_version") if isinstance(manifest, dict) else "?"
        raise ArchiveError(f"{path}: unsupported archive format {version}")
    files = manifest.get("files")
    if not isinstance(files, dict) or TENSORS not in files:
        raise ArchiveError(f"{path}: manifest lists no files")
    if verify:
        changes = _changes(contents, hashes, manifest)
        if changes:
            raise ArchiveError(f"{path}: {changes[0]} (the archive was modified or is corrupt"
                               + (f"; {len(changes) - 1} more: distill verify lists them)" if len(changes) > 1 else ")"))
        if MANIFEST_DIGEST not in contents:
            warnings.warn(f"{path.name} predates {MANIFEST_DIGEST}: its members are verified, its manifest is not",
                          stacklevel=2)
    try:
        tensors = mapped if mapped is not None else load_safetensors(contents[TENSORS])
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
    if num_classes and len(distilled.labels) and (distilled.labels.min() < 0 or distilled.labels.max() >= num_classes):
        raise ArchiveError(f"{path}: labels out of range for {num_classes} classes")
    return Archive(manifest=manifest, distilled=distilled)


def _changes(contents: dict[str, bytes], hashes: dict[str, str], manifest: dict[str, Any]) -> list[str]:
    """Every difference between an archive and what its writer recorded, one line each (empty: intact)."""
    out: list[str] = []
    recorded = contents.get(MANIFEST_DIGEST)
    if recorded is not None:
        try:
            digest = json.loads(recorded)
            expected_fields = dict(digest["fields"])
            expected_sha = str(digest["sha256"])
        except (ValueError, KeyError, TypeError):
            out.append(f"{MANIFEST_DIGEST} is unreadable")
        else:
            if sha256_bytes(contents[MANIFEST]) != expected_sha:
                now = manifest_digest(contents[MANIFEST])["fields"]
                edited = sorted(k for k in set(now) | set(expected_fields) if now.get(k) != expected_fields.get(k))
                def how(key: str) -> str:
                    return "added" if key not in expected_fields else "removed" if key not in now else "changed"

                if edited:
                    out += [f"manifest field '{k}' was {how(k)}" for k in edited]
                else:
                    out.append(f"{MANIFEST} was re-encoded (same fields, different bytes)")
    listed = manifest.get("files")
    files: dict[str, Any] = listed if isinstance(listed, dict) else {}
    for name, expected in files.items():
        if name not in hashes:
            out.append(f"member {name} is missing")
        elif hashes[name] != expected:
            out.append(f"member {name} was changed (sha256 mismatch)")
    unexpected = sorted(set(hashes) - set(files) - {MANIFEST, MANIFEST_DIGEST})
    out += [f"member {name} was added" for name in unexpected]
    return out


def verify_archive(path: Path) -> tuple[dict[str, Any] | None, list[str]]:
    """``distill verify``: the manifest (when readable) and every change found, one line each (empty: intact).
    An archive from before ``manifest.digest.json`` says so in the list's place of the manifest check."""
    path = Path(path)
    if not path.is_file():
        raise ArchiveError(f"{path}: no such archive")
    try:
        contents, hashes, _mapped = _read_members(path)
    except (tarfile.TarError, EOFError, OSError, ValueError, KeyError, zlib_error()) as exc:
        raise ArchiveError(f"{path}: not a readable distilled-set archive ({exc})") from exc
    if MANIFEST not in contents:
        raise ArchiveError(f"{path}: malformed archive, no {MANIFEST}")
    try:
        manifest = json.loads(contents[MANIFEST])
    except (json.JSONDecodeError, UnicodeDecodeError):
        return None, [f"{MANIFEST} is not valid JSON (it was modified or is corrupt)"]
    if not isinstance(manifest, dict):
        return None, [f"{MANIFEST} is not a JSON object"]
    changes = _changes(contents, hashes, manifest)
    if MANIFEST_DIGEST not in contents:
        changes.append(f"no {MANIFEST_DIGEST} (written before manifests were covered): the manifest itself is "
                       "not verifiable")
    return manifest, changes


def preview_sample(path: Path, max_classes: int = 10, max_per_class: int = 10) -> Archive:
    """The few images a preview shows, read from the archive's PNG members alone: the tar headers, the manifest
    and metadata.csv, then only the (at most ``max_classes x max_per_class``) PNGs shown; the tensors and every
    other image stay on disk. Unverified (a preview, not a download); weights come from metadata.csv."""
    path = Path(path)
    try:
        with tarfile.open(path, mode="r:*") as tar:
            members = {m.name: m for m in tar.getmembers() if m.isfile()}  # headers only (seeks past data)
            if MANIFEST not in members or METADATA not in members:
                raise ArchiveError(f"{path}: malformed archive, no {MANIFEST} or {METADATA}")

            def member(name: str) -> bytes:
                handle = tar.extractfile(members[name])
                assert handle is not None
                return handle.read()

            manifest = json.loads(member(MANIFEST))
            rows = list(csv.DictReader(io.StringIO(member(METADATA).decode())))
            shown = sorted({int(r["label"]) for r in rows})[:max_classes]
            picks = [r for label in shown for r in [r for r in rows if int(r["label"]) == label][:max_per_class]]
            tiles = []
            for row in picks:
                with Image.open(io.BytesIO(member(row["file"]))) as img:
                    array = np.asarray(img)
                tiles.append(torch.from_numpy(array[None] if array.ndim == 2 else array.transpose(2, 0, 1).copy()))
    except (tarfile.TarError, EOFError, OSError, KeyError, ValueError, zlib_error()) as exc:
        raise ArchiveError(f"{path}: not a readable distilled-set archive ({exc})") from exc
    channels = int(manifest.get("dataset", {}).get("channels", 3))
    images = torch.stack(tiles) if tiles else torch.zeros((0, channels, 1, 1), dtype=torch.uint8)
    weights = torch.tensor([float(r["weight"]) for r in picks]) if manifest.get("has_weights") and picks else None
    distilled = DistilledSet(images=images, labels=torch.tensor([int(r["label"]) for r in picks], dtype=torch.long),
                             weights=weights)
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
        self.images = d.pixels()  # float [0, 1] whether stored as float (format 1) or uint8 (format 2)
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
    """Read (and verify) an archive and return it as a torch Dataset, ready for a DataLoader.

    Verification checks every member's sha256 and the manifest's own (``manifest.digest.json``); a modified
    archive raises :class:`distill.errors.ArchiveError` (``distill verify ARCHIVE`` lists what changed).

    The contract, the same for every method: items are ``(image, label, weight, soft_label)``.

    - ``image``: float C x H x W in pixel scale. Real-image selections and decoded latents lie in [0, 1];
      pixel-space methods (dc, dsa, dm, mtt, datm, dd, oq's refinement) store their learned pixels unclamped, as
      their published evaluations train on them: ``dataset.manifest["image_range"]`` gives [min, max]. Clamp
      with ``transform=lambda x: x.clamp(0, 1)`` if your pipeline needs [0, 1].
    - ``weight``: mean 1.0 over the set (a uniform set is 1.0 per image; ``oq``'s cluster masses keep their
      ratios): a weighted loss ``(w * loss).mean()`` has the scale of an unweighted one.
    - ``soft_label``: the archive's teacher logits, or the one-hot label.
    """
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
            pixels = d.images[i] if d.images.dtype == torch.uint8 else (d.images[i].clamp(0, 1) * 255).round().to(torch.uint8)
            array = pixels.permute(1, 2, 0).numpy()
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
