"""Encode a whole training split once into latent shards on disk, reused by later jobs and resumable.

Layout: ``<cache_dir>/latents/<dataset>-<encoder>-<resolution>[-max<M>-s<seed>]/``

- ``meta.json``: what the folder holds (dataset, encoder, resolution, number of images, shard size, latent
  shape, per-class row offsets). Written first; a folder whose meta does not match is rebuilt.
- ``order.npy``: the split index of every row (class-sorted, stable). Kept out of ``meta.json`` so that the
  1.28M entries of ImageNet are not re-parsed from JSON per shard and per class; memory-mapped by readers.
- ``shard_00000.safetensors`` ...: ``latents`` (fp16, rows x C x h x w), ``labels``, ``indices`` (rows of
  the split) and ``valid`` (uint8: 0 = the image could not be decoded, its latent row is zeros and never
  read), with the skipped files' names in the shard's metadata. Each shard is written to a temporary name and
  renamed, so an existing shard is complete.
- ``complete.json``: the completion marker, written last, with the valid rows per class and the skipped files.

A ``--max-per-class`` sample of a split whose full cache (same dataset, encoder, resolution) is complete takes
its rows from that cache (:func:`copy_from_full_cache`): nothing is decoded or encoded again.

Images are decoded by the streaming loader (:class:`distill.data.loader.ImageStream`: worker processes decode
and resize ahead while this process runs the encoder), one stream over all missing shards.

Rows are ordered by class (stable), so a class is one contiguous row range and :meth:`LatentStore.class_latents`
reads only the shards it spans (ImageNet-size caches never need to fit in memory); :meth:`LatentStore.take`
gathers arbitrary rows through memory-mapped shards (prior training streams its mini-batches that way). A killed encode resumes
by encoding only the missing shards. With an executor (``executor.map(fn, items)``, e.g. Ray) the missing
shards are encoded by workers, each rebuilding the split and the encoder from small picklable specs.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np
import torch

from distill.config import get_settings
from distill.data.registry import FileSplit, Split, SubsetSplit, split_at_size
from distill.errors import DistillError
from distill.files import atomic_output, atomic_write_json
from distill.methods.base import Executor

CACHE_VERSION = 2  # 2: order in order.npy, per-row valid mask, skipped files
META = "meta.json"
COMPLETE = "complete.json"
ORDER = "order.npy"
FILES = "files.npy"  # the file names of a file-backed split (fixed-width UTF-8), memory-mapped by loader processes
# CPUs the scheduler granted the running task (set by the job layer's executor, e.g. workers.ray_executor): the
# number of loader processes a shard task decodes with.
TASK_CPUS_ENV = "DISTILL_TASK_CPUS"
DEFAULT_SHARD_SIZE = 2048
# With an executor a split is cut into at least FANOUT_SHARDS shards (each >= MIN_FANOUT_SHARD rows) so that a
# small job still spreads over several GPUs; ImageNet's 1.28M rows make 626 shards of 2,048 anyway.
FANOUT_SHARDS = 8
MIN_FANOUT_SHARD = 64


def _safe(name: str) -> str:
    safe = "".join(c if c.isalnum() or c in "-_." else "_" for c in name)
    if safe != name or len(safe) > 48:
        safe = f"{safe[:32]}_{hashlib.sha256(name.encode()).hexdigest()[:8]}"
    return safe


def cache_folder(dataset: str, encoder_key: str, resolution: int, max_per_class: int | None = None,
                 seed: int = 0) -> Path:
    """Where the latents of (dataset, encoder, resolution[, max-per-class sample]) live."""
    name = f"{_safe(dataset)}-{_safe(encoder_key)}-{resolution}"
    if max_per_class is not None:
        name += f"-max{max_per_class}-s{seed}"
    return get_settings().cache_dir / "latents" / name


def shard_path(folder: Path, shard: int) -> Path:
    return folder / f"shard_{shard:05d}.safetensors"


# ------------------------------------------------------------------------------------- specs (picklable)
@dataclass(frozen=True)
class EncoderSpec:
    """Enough to rebuild an encoder in another process."""

    name: str
    resolution: int
    image_size: int
    device: str = "cpu"
    batch_size: int = 64


@dataclass(frozen=True)
class SplitSpec:
    """Enough to rebuild a run's training split in another process (same sampling as ``RunContext.train``)."""

    dataset: str
    max_per_class: int | None = None
    seed: int = 0


def _encoder(spec: EncoderSpec):
    """The encoder of ``spec`` on the device it names; ``auto`` (a fan-out child): the GPU this task was given,
    else the CPU. Cached per concrete device, so a reused process given another GPU loads it there."""
    from quantize.encoders import resolve_task_device

    return _load_encoder(replace(spec, device=str(resolve_task_device(spec.device))))


@lru_cache(maxsize=2)
def _load_encoder(spec: EncoderSpec):
    from quantize.encoders import load_encoder

    return load_encoder(spec.name, image_size=spec.image_size, resolution=spec.resolution, device=spec.device,
                        batch_size=spec.batch_size)


@lru_cache(maxsize=2)
def _split(spec: SplitSpec) -> Split:
    from distill.data.registry import get_dataset
    from distill.data.sampling import run_train_split

    return run_train_split(get_dataset(spec.dataset), spec.max_per_class, spec.seed)


@dataclass(frozen=True)
class ShardJob:
    folder: str
    shard: int
    rows: tuple[int, int]
    split: SplitSpec
    encoder: EncoderSpec


SAFETENSORS_DTYPES: dict[str, Any] = {"F16": np.float16, "F32": np.float32, "F64": np.float64, "I64": np.int64,
                                      "I32": np.int32, "U8": np.uint8}


def shard_array(path: Path, key: str) -> np.ndarray:
    """One tensor of a shard, memory-mapped read-only: only the rows indexed are ever read.

    A safetensors file is an 8-byte little-endian header length, a JSON header giving each tensor's dtype,
    shape and byte range, then the raw little-endian data; ``safe_open`` can only slice, not gather rows.
    """
    with open(path, "rb") as handle:
        length = int.from_bytes(handle.read(8), "little")
        header = json.loads(handle.read(length))
    info = header[key]
    if info["dtype"] not in SAFETENSORS_DTYPES:
        raise DistillError(f"{path}: tensor {key} has dtype {info['dtype']}, which cannot be memory-mapped here")
    start, stop = info["data_offsets"]
    shape = tuple(int(v) for v in info["shape"])
    if stop == start:
        return np.zeros(shape, dtype=SAFETENSORS_DTYPES[info["dtype"]])
    return np.memmap(path, dtype=SAFETENSORS_DTYPES[info["dtype"]], mode="r", offset=8 + length + start, shape=shape)


def read_order(folder: Path) -> np.ndarray:
    """Split index of every cache row (memory-mapped, not parsed)."""
    return np.load(folder / ORDER, mmap_mode="r")


def task_loader_workers() -> int | None:
    """Loader processes for a task the scheduler granted CPUs (:data:`TASK_CPUS_ENV`), else None (the loader's
    own default: the ``loader_workers`` setting or every core, right for a process that owns the host)."""
    granted = os.environ.get(TASK_CPUS_ENV, "").strip()
    return max(1, int(float(granted))) if granted else None


class MappedNames:
    """A split's file names as a read-only memory-mapped array (``files.npy``).

    It pickles as its path: each loader process maps the file itself instead of receiving the whole list (an
    ImageNet split's 1.28M names) with every stream, i.e. with every shard a task encodes."""

    def __init__(self, path: Path | str):
        self.path = Path(path)
        self._array: np.ndarray | None = None

    def _names(self) -> np.ndarray:
        if self._array is None:
            self._array = np.load(self.path, mmap_mode="r")
        return self._array

    def __len__(self) -> int:
        return len(self._names())

    def __getitem__(self, index: int) -> str:
        return bytes(self._names()[index]).decode("utf-8")

    def __getstate__(self) -> dict[str, str]:
        return {"path": str(self.path)}

    def __setstate__(self, state: dict[str, str]) -> None:
        self.path, self._array = Path(state["path"]), None


class MappedFileSplit(FileSplit):
    """A :class:`FileSplit` whose names are :class:`MappedNames`; its labels stay in this process (loader
    processes only decode), so what a loader process receives does not grow with the split."""

    def __getstate__(self) -> dict[str, Any]:
        return {"root": self.root, "files": self.files, "size": self.size, "channels": self.channels,
                "labels": np.zeros(0, dtype=np.int64)}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)


def _base_file_split(split: Split) -> FileSplit | None:
    while isinstance(split, SubsetSplit):
        split = split.parent
    return split if isinstance(split, FileSplit) else None


def write_file_names(folder: Path, split: Split) -> None:
    """``files.npy`` of a file-backed split (through subset views), once per cache folder."""
    base = _base_file_split(split)
    path = folder / FILES
    if base is None or isinstance(base.files, MappedNames):
        return
    if path.exists() and len(np.load(path, mmap_mode="r")) == len(base.files):
        return
    names = np.array([name.encode("utf-8") for name in base.files], dtype=np.bytes_)
    with atomic_output(path, suffix=".npy") as tmp:
        np.save(tmp, names)


def loader_split(split: Split, folder: Path) -> Split:
    """``split`` with its file names read from ``folder``'s ``files.npy`` (when written): what loader processes
    unpickle is then a path, not the name list."""
    if isinstance(split, SubsetSplit):
        parent = loader_split(split.parent, folder)
        return split if parent is split.parent else SubsetSplit(parent, split.index)
    if isinstance(split, FileSplit) and not isinstance(split, MappedFileSplit) and (folder / FILES).exists():
        names: Any = MappedNames(folder / FILES)
        return MappedFileSplit(split.root, names, split.labels, split.size, split.channels)
    return split


def run_shard_job(job: ShardJob) -> dict[str, Any]:
    """Executor entry point: encode one shard in this process and write it; returns what ran where and when.

    A file-backed split is decoded by as many loader processes as the task was granted CPUs."""
    start = time.time()
    folder = Path(job.folder)
    order = np.array(read_order(folder)[job.rows[0] : job.rows[1]], dtype=np.int64)
    split = split_at_size(_split(job.split), job.encoder.resolution)  # files decoded at the encode resolution
    from distill.data.loader import is_file_backed

    workers = task_loader_workers() if is_file_backed(split) else None  # in-memory splits are just indexed
    encode_shards(folder, {job.shard: order}, split, _encoder(job.encoder), num_workers=workers)
    return {"shard": job.shard, "rows": job.rows[1] - job.rows[0], "start": start, "end": time.time(),
            "pid": os.getpid(), "host": os.uname().nodename}


# ------------------------------------------------------------------------------------------ encoding
def _write_shard(folder: Path, shard: int, indices: np.ndarray, labels: np.ndarray, latents: torch.Tensor,
                 valid: np.ndarray, skipped: dict[int, str]) -> Path:
    from safetensors.torch import save_file

    tensors = {
        "latents": latents.contiguous(),
        "labels": torch.from_numpy(np.asarray(labels, dtype=np.int64)),
        "indices": torch.from_numpy(np.asarray(indices, dtype=np.int64)),
        "valid": torch.from_numpy(np.asarray(valid, dtype=np.uint8)),
    }
    path = shard_path(folder, shard)
    with atomic_output(path, suffix=".safetensors") as tmp:
        save_file(tensors, str(tmp), metadata={"skipped": json.dumps({str(k): v for k, v in skipped.items()})})
    return path


def encode_shards(folder: Path, shards: dict[int, np.ndarray], split: Split, encoder,
                  progress: Callable[[int], None] | None = None, check_cancelled: Callable[[], None] | None = None,
                  num_workers: int | None = None) -> dict[int, str]:
    """Encode ``{shard: split indices}`` through one streaming loader and write each shard when it is complete.

    Decoding runs ahead in loader processes while this process encodes; a file that cannot be decoded gets a
    zero row with ``valid = 0`` instead of ending the job. Returns ``{split index: "file: reason"}`` skipped.
    """
    from distill.data.loader import ImageStream

    batch = encoder.bounded_batch(max(1, int(encoder.batch_size)))  # loader batches = encoder batches
    chunks: list[np.ndarray] = []
    owners: list[tuple[int, int]] = []  # (shard, first row within the shard) of each chunk
    for shard, indices in shards.items():
        for start in range(0, len(indices), batch):
            chunks.append(np.asarray(indices[start : start + batch], dtype=np.int64))
            owners.append((shard, start))
    latent_shape = tuple(encoder.latent_shape)
    pending: dict[int, dict[str, Any]] = {}
    skipped_all: dict[int, str] = {}
    stream = ImageStream(loader_split(split, folder), batches=chunks, num_workers=num_workers,
                         device=getattr(encoder, "device", None))
    remaining = {shard: -(-len(indices) // batch) for shard, indices in shards.items()}
    for n, ((kept, images), (shard, row0), chunk) in enumerate(zip(stream, owners, chunks, strict=True)):
        if check_cancelled is not None and (row0 == 0 or n % 16 == 0):  # at each shard start, and now and then
            check_cancelled()
        state = pending.setdefault(shard, {
            "latents": torch.zeros((len(shards[shard]), *latent_shape), dtype=torch.float16),
            "valid": np.zeros(len(shards[shard]), dtype=np.uint8)})
        rows = row0 + np.flatnonzero(np.isin(chunk, kept))
        if len(kept):
            state["latents"][torch.from_numpy(rows)] = encoder.encode(images).half()  # uint8 to the device
            state["valid"][rows] = 1
        if progress is not None:
            progress(len(chunk))
        remaining[shard] -= 1
        if remaining[shard] == 0:
            indices = np.asarray(shards[shard], dtype=np.int64)
            bad = {i: stream.skipped[i] for i in indices.tolist() if i in stream.skipped}
            _write_shard(folder, shard, indices, np.asarray(split.labels)[indices], state["latents"], state["valid"], bad)
            skipped_all.update(bad)
            del pending[shard]
    return skipped_all


def encode_shard(folder: Path, shard: int, indices: np.ndarray, split: Split, encoder,
                 progress: Callable[[int], None] | None = None) -> Path:
    """Encode ``split[indices]`` and write one shard atomically (tmp + rename)."""
    encode_shards(folder, {shard: np.asarray(indices, dtype=np.int64)}, split, encoder, progress)
    return shard_path(folder, shard)


def build_latent_cache(
    split: Split,
    *,
    split_spec: SplitSpec,
    encoder_spec: EncoderSpec,
    encoder_key: str,
    num_classes: int,
    latent_shape: tuple[int, int, int],
    shard_size: int = DEFAULT_SHARD_SIZE,
    encoder: Any = None,
    progress: Callable[[float], None] | None = None,
    check_cancelled: Callable[[], None] | None = None,
    executor: Executor | None = None,
    log: Callable[[str], None] = lambda message: None,
) -> LatentStore:
    """Return the cached latents of ``split``, encoding whatever shards are missing.

    ``encoder`` (a loaded :class:`~quantize.encoders.LatentEncoder`) is optional: it is loaded from
    ``encoder_spec`` only when something has to be encoded in this process. Steps: the folder's layout
    (:func:`_prepare_folder`, which also returns a complete cache as it is), the missing shards copied from the
    full split's cache, encoded by the executor's tasks or here (:func:`_fill_shards`), then the completion
    marker (:func:`_complete`).
    """
    folder = cache_folder(split_spec.dataset, encoder_key, encoder_spec.resolution, split_spec.max_per_class,
                          split_spec.seed)
    prepared = _prepare_folder(folder, split, split_spec, encoder_spec, encoder_key, num_classes, latent_shape,
                               shard_size, fanout=executor is not None, log=log)
    if isinstance(prepared, LatentStore):  # already encoded: say so, and the encode stage is complete
        log(f"latent cache {folder.name}: complete, {len(prepared)} latents reused")
        if progress is not None:
            progress(1.0)
        return prepared
    meta, order = prepared
    shard_size = int(meta["shard_size"])
    num_shards = max(1, -(-len(order) // shard_size))
    missing = [s for s in range(num_shards) if not shard_path(folder, s).exists()]
    if len(missing) < num_shards:
        log(f"latent cache {folder.name}: resuming, {num_shards - len(missing)}/{num_shards} shards present")
    start_time = time.perf_counter()
    filled = _fill_shards(folder, split, order, missing, shard_size, meta, split_spec, encoder_spec, encoder,
                          progress, check_cancelled, executor, log)
    _complete(folder, num_shards, num_classes, len(order), time.perf_counter() - start_time, len(missing), filled, log)
    if progress is not None:
        progress(1.0)
    return LatentStore(folder, meta)


def _prepare_folder(folder: Path, split: Split, split_spec: SplitSpec, encoder_spec: EncoderSpec, encoder_key: str,
                    num_classes: int, latent_shape: tuple[int, int, int], shard_size: int, *, fanout: bool,
                    log: Callable[[str], None]) -> LatentStore | tuple[dict[str, Any], np.ndarray]:
    """The folder's meta, row order and file names: a complete matching cache as a store, else (meta, order).

    A folder of another request is rebuilt; an incomplete one of this request keeps its shard layout (resume)."""
    labels = np.asarray(split.labels, dtype=np.int64)
    order, order_hash = _class_order(labels)
    offsets = np.concatenate([[0], np.cumsum(np.bincount(labels, minlength=num_classes))]).tolist()
    meta = {
        "version": CACHE_VERSION, "dataset": split_spec.dataset, "encoder": encoder_spec.name,
        "encoder_key": encoder_key, "resolution": encoder_spec.resolution, "images": len(labels),
        "latent_shape": list(latent_shape), "num_classes": num_classes, "class_offsets": offsets,
        "order_hash": order_hash, "shard_size": shard_size, "dtype": "float16",
    }
    if fanout:  # enough shards to spread over the workers (a resumed layout keeps its own)
        meta["shard_size"] = min(shard_size, max(MIN_FANOUT_SHARD, -(-len(labels) // FANOUT_SHARDS)))
    existing = _read_json(folder / META)
    if existing is not None:
        if all(existing.get(k) == v for k, v in meta.items() if k != "shard_size"):
            meta["shard_size"] = int(existing["shard_size"])  # resume with the same shard layout
            if (folder / COMPLETE).exists():
                return LatentStore(folder, existing)
        else:
            log(f"latent cache {folder.name} does not match this request: rebuilding it")
            shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True, exist_ok=True)
    with atomic_output(folder / ORDER, suffix=".npy") as tmp:
        np.save(tmp, order)
    write_file_names(folder, split)
    atomic_write_json(folder / META, meta)
    return meta, order


def _fill_shards(folder: Path, split: Split, order: np.ndarray, missing: list[int], shard_size: int,
                 meta: dict[str, Any], split_spec: SplitSpec, encoder_spec: EncoderSpec, encoder: Any,
                 progress: Callable[[float], None] | None, check_cancelled: Callable[[], None] | None,
                 executor: Executor | None, log: Callable[[str], None]) -> dict[str, Any]:
    """Write the ``missing`` shards: copied from the full split's complete cache, else encoded by the executor's
    tasks (one per shard), else here. Returns what the completion marker records (shard tasks, copy source)."""
    total = len(order)
    done = total - sum(min(shard_size, total - s * shard_size) for s in missing)
    tasks: list[dict[str, Any]] = []
    rows = {s: order[s * shard_size : (s + 1) * shard_size] for s in missing}
    full = _full_cache_for(split, meta) if missing else None

    def advance(count: int) -> None:
        nonlocal done
        done += count
        if progress is not None:
            progress(done / max(1, total))

    if full is not None:
        assert isinstance(split, SubsetSplit)  # _full_cache_for checked it
        log(f"latent cache {folder.name}: taking the sample's rows from the complete {full.folder.name} "
            "(nothing decoded or encoded)")
        copy_from_full_cache(folder, rows, split, full)
    elif executor is not None and missing:
        jobs = [ShardJob(str(folder), s, (s * shard_size, min(total, (s + 1) * shard_size)), split_spec,
                         encoder_spec) for s in missing]

        def finished(_: int, task: dict[str, Any]) -> None:
            tasks.append(task)
            advance(task["rows"])

        advance(0)  # the stage starts now, not when the first shard is back
        # one GPU per shard task (the executor's default); results stream back as shards finish
        executor.map(run_shard_job, jobs, on_result=finished, check_cancelled=check_cancelled)
    elif missing:
        encode_shards(folder, rows, split, encoder if encoder is not None else _encoder(encoder_spec), advance,
                      check_cancelled)
    return {"tasks": tasks, "copied_from": full.folder.name if full is not None else None}


def _complete(folder: Path, num_shards: int, num_classes: int, total: int, seconds: float, encoded: int,
              filled: dict[str, Any], log: Callable[[str], None]) -> None:
    """Survey the shards (valid rows per class, skipped files) and write the completion marker, last."""
    valid_counts, skipped = _survey_shards(folder, num_shards, num_classes)
    if skipped:
        log(f"latent cache {folder.name}: {len(skipped)} images could not be decoded and were skipped: "
            + ", ".join(list(skipped.values())[:5]) + (" ..." if len(skipped) > 5 else ""))
    atomic_write_json(folder / COMPLETE, {"shards": num_shards, "images": total, "seconds": round(seconds, 3),
                                          "encoded_shards": 0 if filled["copied_from"] else encoded,
                                          "copied_from": filled["copied_from"], "tasks": filled["tasks"],
                                          "valid_counts": valid_counts, "skipped": skipped})


def _class_order(labels: np.ndarray) -> tuple[np.ndarray, str]:
    """Cache row order of a split (class-sorted, stable) and its hash (the meta's ``order_hash``)."""
    order = np.argsort(labels, kind="stable")
    return order, hashlib.sha256(order.tobytes() + labels.tobytes()).hexdigest()[:16]


def _full_cache_for(split: Split, meta: dict[str, Any]) -> LatentStore | None:
    """For a --max-per-class sample (a view of the full split), the complete cache of the *full* split with the
    same dataset, encoder and resolution, when there is one: the sample's latents are rows of it."""
    if not isinstance(split, SubsetSplit):
        return None
    full = open_store(cache_folder(meta["dataset"], meta["encoder_key"], int(meta["resolution"])))
    if full is None:
        return None
    parent_labels = np.asarray(split.parent.labels, dtype=np.int64)
    keys = ("version", "dataset", "encoder_key", "resolution", "latent_shape", "num_classes")
    if any(full.meta.get(k) != meta[k] for k in keys) or full.meta.get("images") != len(parent_labels):
        return None
    return full if full.meta.get("order_hash") == _class_order(parent_labels)[1] else None


def copy_from_full_cache(folder: Path, shards: dict[int, np.ndarray], split: SubsetSplit,
                         full: LatentStore) -> dict[int, str]:
    """Write the sample's shards ``{shard: sample split indices}`` from the full split's cache rows (read through
    memory-mapped shards, one sample shard at a time): nothing is decoded or encoded. Images the full cache
    could not decode stay invalid here, with their reason. Returns ``{sample index: "file: reason"}``."""
    full_order = read_order(full.folder)  # full row -> full split index
    row_of = np.empty(len(full_order), dtype=np.int64)
    row_of[np.asarray(full_order)] = np.arange(len(full_order))
    labels = np.asarray(split.labels)
    skipped_all: dict[int, str] = {}
    for shard, indices in shards.items():
        indices = np.asarray(indices, dtype=np.int64)
        parents = split.index[indices]
        rows = row_of[parents]
        valid = full.take(rows, "valid")
        bad = {int(i): full.skipped.get(str(int(p)), "not decoded in the full-split cache")
               for i, p, v in zip(indices.tolist(), parents.tolist(), valid.tolist(), strict=True) if not v}
        _write_shard(folder, shard, indices, labels[indices], torch.from_numpy(full.take(rows)), valid, bad)
        skipped_all.update(bad)
    return skipped_all


def _survey_shards(folder: Path, num_shards: int, num_classes: int) -> tuple[list[int], dict[str, str]]:
    """Valid rows per class and the skipped files of all shards (small tensors and headers only)."""
    from safetensors import safe_open

    counts = np.zeros(num_classes, dtype=np.int64)
    skipped: dict[str, str] = {}
    for shard in range(num_shards):
        with safe_open(str(shard_path(folder, shard)), framework="pt") as handle:
            labels = handle.get_tensor("labels").numpy()
            valid = handle.get_tensor("valid").numpy().astype(bool)
            skipped.update(json.loads((handle.metadata() or {}).get("skipped", "{}")))
        counts += np.bincount(labels[valid], minlength=num_classes)
    return counts.tolist(), skipped


def _read_json(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def latents_for_context(ctx, encoder_name: str, *, resolution: int | None = None, batch_size: int = 64,
                        shard_size: int = DEFAULT_SHARD_SIZE, encoder: Any = None) -> LatentStore:
    """The cached latents of ``ctx.train`` (honours --max-per-class, progress, cancellation, executor)."""
    from quantize.encoders import default_resolution

    kind = encoder_name if encoder_name in ("taef2", "sd-vae") else "path"
    resolution = resolution or default_resolution(kind, ctx.dataset.image_size, ctx.dataset.source_size)
    spec = EncoderSpec(encoder_name, resolution, ctx.dataset.image_size, str(ctx.device), batch_size)
    if encoder is None:
        encoder = _encoder(spec)
    if ctx.executor is not None:  # shard tasks pick their own device (the GPU each is given)
        spec = EncoderSpec(encoder_name, resolution, ctx.dataset.image_size, ctx.executor.device, batch_size)
    with ctx.timed("encode"):
        return build_latent_cache(
            split_at_size(ctx.train, resolution),  # files are decoded straight at the encode resolution
            split_spec=SplitSpec(ctx.dataset.name, ctx.max_per_class, ctx.seed),
            encoder_spec=spec, encoder_key=encoder.key, num_classes=ctx.num_classes,
            latent_shape=encoder.latent_shape, shard_size=shard_size, encoder=encoder,
            progress=lambda fraction: ctx.progress("encode", fraction), check_cancelled=ctx.check_cancelled,
            executor=ctx.executor, log=ctx.log,
        )


def latents_for_dataset(dataset: str, encoder_name: str = "taef2", *, resolution: int | None = None,
                        device: str = "cpu", max_per_class: int | None = None, seed: int = 0,
                        batch_size: int = 64, progress: Callable[[float], None] | None = None,
                        log: Callable[[str], None] = lambda message: None) -> LatentStore:
    """Cached latents of a registered dataset's training split, without a run context (prior training)."""
    from distill.data.registry import get_dataset
    from quantize.encoders import default_resolution

    ds = get_dataset(dataset)
    kind = encoder_name if encoder_name in ("taef2", "sd-vae") else "path"
    resolution = resolution or default_resolution(kind, ds.image_size, ds.source_size)
    spec = EncoderSpec(encoder_name, resolution, ds.image_size, device, batch_size)
    split_spec = SplitSpec(dataset, max_per_class, seed)
    encoder = _encoder(spec)
    return build_latent_cache(split_at_size(_split(split_spec), resolution), split_spec=split_spec, encoder_spec=spec,
                              encoder_key=encoder.key, num_classes=ds.num_classes,
                              latent_shape=encoder.latent_shape, encoder=encoder, progress=progress, log=log)


# ------------------------------------------------------------------------------------------- reading
def open_store(folder: Path | str) -> LatentStore | None:
    """A complete cache folder as a store, or None when it is missing or incomplete."""
    folder = Path(folder)
    meta = _read_json(folder / META)
    if meta is None or not (folder / COMPLETE).exists():
        return None
    return LatentStore(folder, meta)


class LatentStore:
    """Read access to a complete latent cache folder."""

    def __init__(self, folder: Path, meta: dict):
        self.folder = folder
        self.meta = meta
        self.shard_size = int(meta["shard_size"])
        self.offsets = [int(v) for v in meta["class_offsets"]]
        complete = _read_json(folder / COMPLETE) or {}
        self.skipped: dict[str, str] = complete.get("skipped", {})  # split index -> "file: reason"
        self.valid_counts: list[int] | None = complete.get("valid_counts")
        self._maps: dict[str, list[np.ndarray]] = {}

    def __len__(self) -> int:
        return int(self.meta["images"])

    @property
    def latent_shape(self) -> tuple[int, int, int]:
        return tuple(self.meta["latent_shape"])  # type: ignore[return-value]

    @property
    def num_classes(self) -> int:
        return int(self.meta["num_classes"])

    def class_count(self, label: int) -> int:
        """Usable rows of a class (images that could not be decoded are not counted)."""
        if self.valid_counts is not None:
            return int(self.valid_counts[label])
        return self.offsets[label + 1] - self.offsets[label]

    def _valid(self, start: int, stop: int) -> torch.Tensor | None:
        """Boolean mask of rows [start, stop) when some rows were skipped, else None (nothing to filter)."""
        return self.rows(start, stop, "valid").bool() if self.skipped else None

    def rows(self, start: int, stop: int, key: str = "latents") -> torch.Tensor:
        """Rows [start, stop) of one stored tensor, reading only the shards they span."""
        from safetensors import safe_open

        parts = []
        for shard in range(start // self.shard_size, (max(stop, start + 1) - 1) // self.shard_size + 1):
            base = shard * self.shard_size
            lo, hi = max(start, base) - base, min(stop, base + self.shard_size) - base
            if hi <= lo:
                continue
            path = shard_path(self.folder, shard)
            if not path.exists():
                raise DistillError(f"latent cache {self.folder} is missing {path.name}: delete the folder")
            with safe_open(str(path), framework="pt") as handle:
                parts.append(handle.get_slice(key)[lo:hi])
        if not parts:
            return torch.empty((0, *self.latent_shape)) if key == "latents" else torch.empty(0, dtype=torch.long)
        return torch.cat(parts)

    def _select(self, start: int, stop: int, key: str) -> torch.Tensor:
        values = self.rows(start, stop, key)
        mask = self._valid(start, stop)
        return values if mask is None else values[mask]

    def class_latents(self, label: int) -> torch.Tensor:
        """float32 latents of one class, n_c x C x h x w, in split order within the class (valid rows only)."""
        return self._select(self.offsets[label], self.offsets[label + 1], "latents").float()

    def class_indices(self, label: int) -> np.ndarray:
        """Indices into the (run's) training split of one class's (valid) rows."""
        return self._select(self.offsets[label], self.offsets[label + 1], "indices").numpy()

    def _arrays(self, key: str) -> list[np.ndarray]:
        if key not in self._maps:
            shards = max(1, -(-len(self) // self.shard_size))
            paths = [shard_path(self.folder, s) for s in range(shards)]
            for path in paths:
                if not path.exists():
                    raise DistillError(f"latent cache {self.folder} is missing {path.name}: delete the folder")
            self._maps[key] = [shard_array(path, key) for path in paths]
        return self._maps[key]

    def take(self, rows: np.ndarray, key: str = "latents") -> np.ndarray:
        """Cache rows ``rows`` (any order, repeats allowed) of one stored tensor, as stored (latents: fp16), read
        through memory-mapped shards: only those rows are read, so memory is bounded by ``len(rows)``."""
        rows = np.asarray(rows, dtype=np.int64)
        arrays = self._arrays(key)
        shard, local = np.divmod(rows, self.shard_size)
        out = np.empty((len(rows), *arrays[0].shape[1:]), dtype=arrays[0].dtype)
        for s in np.unique(shard).tolist():
            hit = shard == s
            out[hit] = arrays[s][local[hit]]
        return out

    def column(self, key: str) -> np.ndarray:
        """A small per-row tensor (``labels``, ``indices``, ``valid``) of every row, in memory."""
        return np.concatenate([np.asarray(a) for a in self._arrays(key)])

    def latent_rows(self) -> LatentRows:
        """The valid latents and their labels as a row source for streaming (prior training): only the rows a
        batch draws are read, never the whole cache."""
        labels = self.column("labels")
        rows = np.flatnonzero(self.column("valid")) if self.skipped else np.arange(len(self), dtype=np.int64)
        return LatentRows(self, rows, labels[rows])

    def all_latents(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Every valid latent (float32) and label, class-ordered (small datasets: prior training)."""
        return self._select(0, len(self), "latents").float(), self._select(0, len(self), "labels")

    def describe(self) -> dict:
        return {k: v for k, v in self.meta.items() if k != "order"} | {
            "folder": str(self.folder), "skipped_images": len(self.skipped)}


class LatentRows:
    """The valid latent rows of a store as an array-like of shape N x C x h x w (fp16, as stored): indexing with
    an integer array or a slice reads just those rows through the memory-mapped shards."""

    def __init__(self, store: LatentStore, rows: np.ndarray, labels: np.ndarray):
        self.store, self.rows, self.labels = store, rows, labels

    def __len__(self) -> int:
        return len(self.rows)

    @property
    def shape(self) -> tuple[int, ...]:
        return (len(self.rows), *self.store.latent_shape)

    def __getitem__(self, index: np.ndarray | slice) -> np.ndarray:
        return self.store.take(self.rows[index])


__all__ = ["EncoderSpec", "LatentRows", "LatentStore", "ShardJob", "SplitSpec", "build_latent_cache", "cache_folder",
           "latents_for_context", "latents_for_dataset", "open_store",
           "run_shard_job"]
