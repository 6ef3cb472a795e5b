"""The real side of the pixel-space methods: per-class training images as uint8, seeded batches.

Batches come out *normalised* (what the networks see), as the references work; see :mod:`pixelspace.synthetic`
for the way back to pixel scale.

Memory is bounded by the ``realpool_cache_bytes`` setting, never by the dataset: a (capped) training split that
fits is loaded whole at the start, as the references do (MNIST, CIFAR: fastest); a larger one (ImageNet at
224 px is about 190 GB of uint8) keeps only its per-class split indices and reads each drawn batch through the
split's loader, with an LRU of recently drawn images bounded in bytes. Both modes draw the same positions from
the same generator, so a seed gives the same batches whichever mode a host ends up in (test).
"""

from __future__ import annotations

from collections import OrderedDict

import numpy as np
import torch

from distill.errors import DistillError
from distill.methods.base import RunContext


class RealPool:
    """Real training images per class, kept as uint8 (4x less memory than the reference's float copy).

    Batches are drawn like the reference's ``get_images``: a random permutation of the class, first n.
    ``cache_bytes`` (default: the ``realpool_cache_bytes`` setting) bounds the decoded images held.
    """

    def __init__(self, ctx: RunContext, cache_bytes: int | None = None):
        self.ctx = ctx
        self.split = ctx.train
        self.num_classes = ctx.num_classes
        self.device = ctx.device
        self.indices: list[np.ndarray] = []  # split indices per class: all that is kept of a large split
        for c in range(self.num_classes):
            idx = np.asarray(self.split.class_indices(c), dtype=np.int64)
            if len(idx) == 0:
                raise DistillError(f"class {c} of {ctx.dataset.name} has no training images")
            self.indices.append(idx)
        if cache_bytes is None:
            from distill.config import get_settings

            cache_bytes = get_settings().realpool_cache_bytes
        self.cache_bytes = int(cache_bytes)
        ds = ctx.dataset
        self.image_bytes = ds.channels * ds.image_size * ds.image_size
        total = sum(len(idx) for idx in self.indices) * self.image_bytes
        self.loaded_images = 0  # images read through the split's loader (whole classes or batches)
        self._cache: OrderedDict[int, np.ndarray] = OrderedDict()  # split index -> C x H x W uint8, LRU order
        self._held = 0  # bytes in _cache
        self._whole: list[torch.Tensor] | None = None
        if total <= self.cache_bytes:
            self._whole = [self._load(idx).contiguous() for idx in self.indices]
        else:
            ctx.log(f"real images: {total / 2**30:.1f} GiB exceed the {self.cache_bytes / 2**30:.2f} GiB "
                    "realpool_cache_bytes: drawn batches are read on demand")

    @property
    def whole(self) -> bool:
        """True when the whole split is held in memory (it fits the budget)."""
        return self._whole is not None

    @property
    def cached_bytes(self) -> int:
        """Bytes of decoded images held by this pool (the whole split, or the LRU)."""
        if self._whole is not None:
            return sum(t.numel() for t in self._whole)
        return self._held

    def count(self, c: int) -> int:
        return len(self.indices[c])

    def _load(self, indices: np.ndarray) -> torch.Tensor:
        self.loaded_images += len(indices)
        return self.split.load(indices)

    def _normalise(self, images: torch.Tensor) -> torch.Tensor:
        return self.ctx.normalize(images.to(self.device).float().div_(255.0))

    def _rows(self, rows: np.ndarray) -> torch.Tensor:
        """uint8 images of split rows ``rows`` (any order, repeats allowed) through the LRU; misses are read in
        one call of the split's loader and kept while they fit ``cache_bytes`` (least recently used out first)."""
        cache = self._cache
        if len(rows) == 0:
            return self._load(np.zeros(0, dtype=np.int64))
        missing = np.unique(np.asarray([r for r in rows.tolist() if r not in cache], dtype=np.int64))
        fresh: dict[int, np.ndarray] = {}
        if len(missing):
            loaded = self._load(missing).numpy()
            fresh = {int(r): loaded[k] for k, r in enumerate(missing.tolist())}
        # C-contiguous like the whole split's batches (a file split decodes HWC arrays: a stack of their CHW views
        # would carry channels-last strides, and networks would then take other kernels, other roundings)
        out = np.ascontiguousarray(np.stack([fresh[r] if r in fresh else cache[r] for r in rows.tolist()]))
        for r in rows.tolist():
            if r in cache:
                cache.move_to_end(r)
        for r, image in fresh.items():
            if image.nbytes > self.cache_bytes:
                break
            while cache and self._held + image.nbytes > self.cache_bytes:
                self._held -= cache.popitem(last=False)[1].nbytes
            cache[r] = image.copy()  # its own buffer: an entry never pins the whole loaded batch
            self._held += image.nbytes
        return torch.from_numpy(out)

    def images(self, c: int, positions: torch.Tensor | np.ndarray) -> torch.Tensor:
        """uint8 images at ``positions`` within class c (positions index ``split.class_indices(c)``)."""
        if self._whole is not None:
            return self._whole[c][positions]
        return self._rows(self.indices[c][np.asarray(positions, dtype=np.int64)])

    def sample(self, c: int, n: int, generator: torch.Generator) -> torch.Tensor:
        """n normalised images of class c (fewer if the class is smaller), without replacement."""
        return self.sample_with_positions(c, n, generator)[0]

    def sample_with_positions(self, c: int, n: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        """:meth:`sample` and the drawn positions within class c (what a per-image label such as a cell reads)."""
        pick = torch.randperm(self.count(c), generator=generator)[:n]
        return self._normalise(self.images(c, pick)), pick

    def sample_all(self, n: int, generator: torch.Generator) -> torch.Tensor:
        """Class-stacked batch C x n x ch x H x W (n is capped by the smallest class)."""
        return self.sample_all_with_positions(n, generator)[0]

    def sample_all_with_positions(self, n: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        """:meth:`sample_all` and the C x n positions drawn (the same draws from the generator)."""
        n = min(n, min(self.count(c) for c in range(self.num_classes)))
        drawn = [self.sample_with_positions(c, n, generator) for c in range(self.num_classes)]
        return torch.stack([images for images, _ in drawn]), torch.stack([pick for _, pick in drawn])

    def sample_mixed(self, n: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        """n images drawn uniformly from the whole (capped) train split with labels (DD's real loader)."""
        counts = torch.tensor([self.count(c) for c in range(self.num_classes)])
        total = int(counts.sum())
        pick = torch.randperm(total, generator=generator)[: min(n, total)].sort().values
        offsets = torch.cumsum(counts, 0) - counts
        labels = torch.bucketize(pick, torch.cumsum(counts, 0), right=True)
        positions = pick - offsets[labels]
        if self._whole is not None:
            whole = self._whole
            images = torch.stack([whole[int(c)][int(i)] for i, c in zip(positions, labels, strict=True)])
        else:
            rows = np.asarray([self.indices[int(c)][int(i)] for i, c in zip(positions, labels, strict=True)],
                              dtype=np.int64)
            images = self._rows(rows)
        return self._normalise(images), labels.to(self.device)
