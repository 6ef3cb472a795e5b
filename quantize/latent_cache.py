"""Encode a whole training split once into latent shards on disk, reused by later jobs and resumable.

Layout: ``<cache_dir>/latents/<dataset>-<encoder>-<resolution>[-max<M>-s<seed>]/``

- ``meta.json``: what the folder holds (dataset, encoder, resolution, number of images, shard size, latent
  shape, per-class row offsets). Written first; a folder whose meta does not match is rebuilt.
- ``shard_00000.safetensors`` ...: ``latents`` (fp16, rows x C x h x w), ``labels`` and ``indices`` (rows of
  the split). Each shard is written to a temporary name and renamed, so an existing shard is complete.
- ``complete.json``: the completion marker, written last.

Rows are ordered by class (stable), so a class is one contiguous row range and :meth:`LatentStore.class_latents`
reads only the shards it spans (ImageNet-size caches never need to fit in memory). A killed encode resumes
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
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np
import torch

from distill.config import get_settings
from distill.data.registry import Split
from distill.errors import DistillError
from distill.files import atomic_output, atomic_write_json
from distill.methods.base import Executor

CACHE_VERSION = 1
META = "meta.json"
COMPLETE = "complete.json"
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


@lru_cache(maxsize=2)
def _encoder(spec: EncoderSpec):
    from distill.runner import resolve_device
    from quantize.encoders import load_encoder

    # "auto" (a fan-out child): the GPU this process was given, else the CPU
    return load_encoder(spec.name, image_size=spec.image_size, resolution=spec.resolution,
                        device=resolve_device(spec.device), batch_size=spec.batch_size)


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


def run_shard_job(job: ShardJob) -> dict[str, Any]:
    """Executor entry point: encode one shard in this process and write it; returns what ran where and when."""
    start = time.time()
    folder = Path(job.folder)
    meta = json.loads((folder / META).read_text())
    order = np.asarray(meta["order"], dtype=np.int64)
    encode_shard(folder, job.shard, order[job.rows[0] : job.rows[1]], _split(job.split), _encoder(job.encoder))
    return {"shard": job.shard, "rows": job.rows[1] - job.rows[0], "start": start, "end": time.time(),
            "pid": os.getpid(), "host": os.uname().nodename}


# ------------------------------------------------------------------------------------------ encoding
def encode_shard(folder: Path, shard: int, indices: np.ndarray, split: Split, encoder,
                 progress: Callable[[int], None] | None = None) -> Path:
    """Encode ``split[indices]`` and write one shard atomically (tmp + rename)."""
    from safetensors.torch import save_file

    chunks = []
    for start in range(0, len(indices), encoder.batch_size):
        chunk = indices[start : start + encoder.batch_size]
        images = split.load(chunk).float().div_(255.0)
        chunks.append(encoder.encode(images).half())
        if progress is not None:
            progress(len(chunk))
    tensors = {
        "latents": torch.cat(chunks).contiguous(),
        "labels": torch.from_numpy(np.asarray(split.labels[indices], dtype=np.int64)),
        "indices": torch.from_numpy(np.asarray(indices, dtype=np.int64)),
    }
    path = shard_path(folder, shard)
    with atomic_output(path, suffix=".safetensors") as tmp:
        save_file(tensors, str(tmp))
    return path


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
    ``encoder_spec`` only when something has to be encoded in this process.
    """
    folder = cache_folder(split_spec.dataset, encoder_key, encoder_spec.resolution, split_spec.max_per_class,
                          split_spec.seed)
    labels = np.asarray(split.labels, dtype=np.int64)
    order = np.argsort(labels, kind="stable")
    offsets = np.concatenate([[0], np.cumsum(np.bincount(labels, minlength=num_classes))]).tolist()
    order_hash = hashlib.sha256(order.tobytes() + labels.tobytes()).hexdigest()[:16]
    meta = {
        "version": CACHE_VERSION, "dataset": split_spec.dataset, "encoder": encoder_spec.name,
        "encoder_key": encoder_key, "resolution": encoder_spec.resolution, "images": len(labels),
        "latent_shape": list(latent_shape), "num_classes": num_classes, "class_offsets": offsets,
        "order_hash": order_hash, "shard_size": shard_size, "dtype": "float16",
    }
    if executor is not None:  # enough shards to spread over the workers (a resumed layout keeps its own)
        shard_size = min(shard_size, max(MIN_FANOUT_SHARD, -(-len(labels) // FANOUT_SHARDS)))
        meta["shard_size"] = shard_size
    existing = _read_json(folder / META)
    if existing is not None:
        same = all(existing.get(k) == v for k, v in meta.items() if k != "shard_size")
        if same:
            meta["shard_size"] = shard_size = int(existing["shard_size"])  # resume with the same shard layout
            if (folder / COMPLETE).exists():
                return LatentStore(folder, existing)
        else:
            log(f"latent cache {folder.name} does not match this request: rebuilding it")
            shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True, exist_ok=True)
    meta["order"] = order.tolist()
    atomic_write_json(folder / META, meta)

    num_shards = max(1, -(-len(order) // shard_size))
    missing = [s for s in range(num_shards) if not shard_path(folder, s).exists()]
    if len(missing) < num_shards:
        log(f"latent cache {folder.name}: resuming, {num_shards - len(missing)}/{num_shards} shards present")
    total = len(order)
    done = total - sum(min(shard_size, total - s * shard_size) for s in missing)
    start_time = time.perf_counter()
    tasks: list[dict[str, Any]] = []
    if executor is not None and missing:
        jobs = [ShardJob(str(folder), s, (s * shard_size, min(total, (s + 1) * shard_size)), split_spec,
                         encoder_spec) for s in missing]

        def finished(_: int, task: dict[str, Any]) -> None:
            nonlocal done
            done += task["rows"]
            tasks.append(task)
            if progress is not None:
                progress(done / max(1, total))

        if progress is not None:
            progress(done / max(1, total))  # the stage starts now, not when the first shard is back
        # one GPU per shard task (the executor's default); results stream back as shards finish
        executor.map(run_shard_job, jobs, on_result=finished, check_cancelled=check_cancelled)
    elif missing:
        encoder = encoder if encoder is not None else _encoder(encoder_spec)

        def advance(count: int) -> None:
            nonlocal done
            done += count
            if progress is not None:
                progress(done / max(1, total))

        for s in missing:
            if check_cancelled is not None:
                check_cancelled()
            encode_shard(folder, s, order[s * shard_size : (s + 1) * shard_size], split, encoder, advance)
    atomic_write_json(folder / COMPLETE, {"shards": num_shards, "images": total,
                                    "seconds": round(time.perf_counter() - start_time, 3),
                                    "encoded_shards": len(missing), "tasks": tasks})
    if progress is not None:
        progress(1.0)
    return LatentStore(folder, meta)


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
    resolution = resolution or default_resolution(kind, ctx.dataset.image_size)
    spec = EncoderSpec(encoder_name, resolution, ctx.dataset.image_size, str(ctx.device), batch_size)
    if encoder is None:
        encoder = _encoder(spec)
    if ctx.executor is not None:  # shard tasks pick their own device (the GPU each is given)
        spec = EncoderSpec(encoder_name, resolution, ctx.dataset.image_size, ctx.executor.device, batch_size)
    with ctx.timed("encode"):
        return build_latent_cache(
            ctx.train,
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
    resolution = resolution or default_resolution(kind, ds.image_size)
    spec = EncoderSpec(encoder_name, resolution, ds.image_size, device, batch_size)
    split_spec = SplitSpec(dataset, max_per_class, seed)
    encoder = _encoder(spec)
    return build_latent_cache(_split(split_spec), split_spec=split_spec, encoder_spec=spec,
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

    def __len__(self) -> int:
        return int(self.meta["images"])

    @property
    def latent_shape(self) -> tuple[int, int, int]:
        return tuple(self.meta["latent_shape"])  # type: ignore[return-value]

    @property
    def num_classes(self) -> int:
        return int(self.meta["num_classes"])

    def class_count(self, label: int) -> int:
        return self.offsets[label + 1] - self.offsets[label]

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

    def class_latents(self, label: int) -> torch.Tensor:
        """float32 latents of one class, n_c x C x h x w, in split order within the class."""
        return self.rows(self.offsets[label], self.offsets[label + 1]).float()

    def class_indices(self, label: int) -> np.ndarray:
        """Indices into the (run's) training split of one class's rows."""
        return self.rows(self.offsets[label], self.offsets[label + 1], "indices").numpy()

    def all_latents(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Every latent (float32) and label, class-ordered (small datasets: prior training)."""
        return self.rows(0, len(self)).float(), self.rows(0, len(self), "labels")

    def describe(self) -> dict:
        return {k: v for k, v in self.meta.items() if k != "order"} | {"folder": str(self.folder)}


__all__ = ["EncoderSpec", "LatentStore", "ShardJob", "SplitSpec", "build_latent_cache", "cache_folder",
           "latents_for_context", "latents_for_dataset", "open_store",
           "run_shard_job"]
