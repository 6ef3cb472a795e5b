"""The one streaming input pipeline: decode and resize images in worker processes, overlapped with the consumer.

Why: ``FileSplit.load`` decodes one JPEG at a time in the job's own thread, so an encoder, a teacher or an
evaluation over ImageNet would wait on PIL while the accelerator idles (docs/BENCHMARKS.md has the loader's
rates). :class:`ImageStream` wraps a split in a ``torch.utils.data.DataLoader`` whose items are
whole batches (``batch_size=None``): each worker process decodes a batch of indices with the same
:func:`distill.data.readers.try_load_image` the serial path uses, batches come back *in order* with
``prefetch`` batches per worker in flight, in pinned memory when the consumer is on CUDA. The output is
identical to ``split.load(indices)`` for the same indices (test), except that files that cannot be decoded
are left out of their batch and recorded in :attr:`ImageStream.skipped` (index -> reason) instead of ending the
job.

``num_workers``: ``None`` = the cores available to this process (``DISTILL_LOADER_WORKERS`` overrides), 0 =
decode in this process (no worker start-up; what small in-memory splits use anyway). Array-backed splits are
just indexed - processes would only add copies - unless ``num_workers`` is given explicitly.

GPU JPEG decode hook: a ``decode`` other than ``"pil"`` is where nvJPEG (``torchvision.io.decode_jpeg(...,
device="cuda")``, batched) would go: the worker would read file bytes only and the consumer would decode
on the device. It is not implemented: the project does not depend on torchvision, and the PIL workers are the
path the benches measure.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Iterator, Sequence

import numpy as np
import torch

from distill.data import readers

DEFAULT_BATCH_SIZE = 64
DECODERS = ("pil",)


def available_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - not Linux
        return os.cpu_count() or 1


def default_num_workers() -> int:
    """Loader processes when none are asked for: the ``loader_workers`` setting (``DISTILL_LOADER_WORKERS``) or
    the cores available."""
    from distill.config import get_settings

    configured = get_settings().loader_workers
    return available_cores() if configured is None else configured


def _is_file_split(split) -> bool:
    return hasattr(split, "files") and hasattr(split, "root")


def _resolve(split, indices: np.ndarray):
    """Follow subset views (``SubsetSplit``) down to the split that holds the data; map the indices along."""
    while hasattr(split, "parent") and hasattr(split, "index"):
        indices = split.index[indices]
        split = split.parent
    return split, indices


def is_file_backed(split) -> bool:
    """True when loading ``split`` decodes files (worth worker processes), also through subset views."""
    return _is_file_split(_resolve(split, np.zeros(0, dtype=np.int64))[0])


def load_batch(split, indices: np.ndarray) -> tuple[np.ndarray, torch.Tensor, dict[int, str]]:
    """Decode ``split[indices]``; return (kept indices, uint8 images, {skipped index: "file: reason"})."""
    indices = np.array(indices, dtype=np.int64)  # a writable copy (callers may pass memory-mapped rows)
    base, mapped = _resolve(split, indices)
    if not _is_file_split(base):
        return indices, base.load(mapped), {}
    arrays, kept, skipped = [], [], {}
    for i, j in zip(indices.tolist(), mapped.tolist(), strict=True):
        array, reason = readers.try_load_image(base.root / base.files[j], base.size, base.channels)
        if array is None:
            skipped[i] = f"{base.files[j]}: {reason}"
        else:
            arrays.append(array)
            kept.append(i)
    if arrays:
        images = torch.from_numpy(np.stack(arrays))
    else:
        images = torch.empty((0, base.channels, base.size, base.size), dtype=torch.uint8)
    return np.asarray(kept, dtype=np.int64), images, skipped


class _Batches(torch.utils.data.Dataset):
    """Item ``b`` = index chunk ``b``: what one worker decodes at a time."""

    def __init__(self, split, chunks: list[np.ndarray]):
        self.split, self.chunks = split, chunks

    def __len__(self) -> int:
        return len(self.chunks)

    def __getitem__(self, b: int):
        kept, images, skipped = load_batch(self.split, self.chunks[b])
        return torch.from_numpy(kept), images, skipped


def _worker_init(_: int) -> None:
    torch.set_num_threads(1)  # one core per worker: decode is the work, not torch ops


def _collate(item):
    return item


class ImageStream:
    """Iterate ``(indices, uint8 N x C x H x W)`` over ``split`` in order, decoding ahead in worker processes.

    ``skipped`` collects ``{index: "file: reason"}`` of files that could not be decoded (also filled when a
    batch is read in-process). Iterating again restarts the stream (new workers).
    """

    def __init__(self, split, indices: Sequence[int] | np.ndarray | None = None, *, batch_size: int = DEFAULT_BATCH_SIZE,
                 num_workers: int | None = None, prefetch: int = 2, device: str | torch.device | None = None,
                 pin_memory: bool | None = None, decode: str = "pil", batches: Sequence[np.ndarray] | None = None):
        """``batches`` (explicit index chunks, e.g. aligned to cache shards) replaces ``indices``/``batch_size``."""
        if batch_size < 1:
            raise ValueError("batch_size must be >= 1")
        if decode not in DECODERS:
            raise ValueError(f"decode '{decode}' is not available (known: {', '.join(DECODERS)})")
        self.split = split
        if batches is not None:
            self.chunks = [np.asarray(b, dtype=np.int64) for b in batches if len(b)]
        else:
            order = np.arange(len(split), dtype=np.int64) if indices is None else np.asarray(indices, dtype=np.int64)
            self.chunks = [order[s : s + batch_size] for s in range(0, len(order), batch_size)]
        if num_workers is None:
            num_workers = default_num_workers() if is_file_backed(split) else 0
        self.num_workers = max(0, int(num_workers))
        self.prefetch = max(1, prefetch)
        on_cuda = device is not None and torch.device(device).type == "cuda"
        self.pin_memory = (on_cuda and torch.cuda.is_available()) if pin_memory is None else pin_memory
        self.skipped: dict[int, str] = {}

    def __len__(self) -> int:
        """Number of batches."""
        return len(self.chunks)

    def _loader(self) -> torch.utils.data.DataLoader:
        workers = min(self.num_workers, len(self))
        kwargs: dict = {}
        if workers > 0:
            # fork is cheap (no re-import of torch, no pickling of a 1.28M-file index) but unsafe once other
            # threads run (a service worker, a progress thread): then forkserver.
            context = "fork" if threading.active_count() == 1 else "forkserver"
            kwargs = {"prefetch_factor": self.prefetch, "worker_init_fn": _worker_init,
                      "multiprocessing_context": context}
        return torch.utils.data.DataLoader(
            _Batches(self.split, self.chunks), batch_size=None, shuffle=False,
            num_workers=workers, collate_fn=_collate, pin_memory=self.pin_memory, **kwargs,
        )

    def __iter__(self) -> Iterator[tuple[np.ndarray, torch.Tensor]]:
        for kept, images, skipped in self._loader():
            self.skipped.update(skipped)
            yield kept.numpy(), images


def stream(split, indices=None, **kwargs) -> ImageStream:
    """Shorthand for :class:`ImageStream`."""
    return ImageStream(split, indices, **kwargs)


__all__ = ["DECODERS", "ImageStream", "available_cores", "default_num_workers", "is_file_backed", "load_batch", "stream"]
