"""The real side of the pixel-space methods: per-class training images kept as uint8, seeded batches.

Batches come out *normalised* (what the networks see), as the references work; see :mod:`pixelspace.synthetic`
for the way back to pixel scale.
"""

from __future__ import annotations

import torch

from distill.errors import DistillError
from distill.methods.base import RunContext


class RealPool:
    """Real training images per class, kept as uint8 (4x less memory than the reference's float copy).

    Batches are drawn like the reference's ``get_images``: a random permutation of the class, first n.
    """

    def __init__(self, ctx: RunContext):
        self.ctx = ctx
        split = ctx.train
        self.num_classes = ctx.num_classes
        self.by_class: list[torch.Tensor] = []
        for c in range(self.num_classes):
            idx = split.class_indices(c)
            if len(idx) == 0:
                raise DistillError(f"class {c} of {ctx.dataset.name} has no training images")
            self.by_class.append(split.load(idx).contiguous())
        self.device = ctx.device

    def count(self, c: int) -> int:
        return len(self.by_class[c])

    def _normalise(self, images: torch.Tensor) -> torch.Tensor:
        return self.ctx.normalize(images.to(self.device).float().div_(255.0))

    def sample(self, c: int, n: int, generator: torch.Generator) -> torch.Tensor:
        """n normalised images of class c (fewer if the class is smaller), without replacement."""
        pick = torch.randperm(self.count(c), generator=generator)[:n]
        return self._normalise(self.by_class[c][pick])

    def sample_all(self, n: int, generator: torch.Generator) -> torch.Tensor:
        """Class-stacked batch C x n x ch x H x W (n is capped by the smallest class)."""
        n = min(n, min(self.count(c) for c in range(self.num_classes)))
        return torch.stack([self.sample(c, n, generator) for c in range(self.num_classes)])

    def sample_mixed(self, n: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        """n images drawn uniformly from the whole (capped) train split with labels (DD's real loader)."""
        counts = torch.tensor([self.count(c) for c in range(self.num_classes)])
        total = int(counts.sum())
        pick = torch.randperm(total, generator=generator)[: min(n, total)].sort().values
        offsets = torch.cumsum(counts, 0) - counts
        labels = torch.bucketize(pick, torch.cumsum(counts, 0), right=True)
        images = torch.stack([self.by_class[int(c)][int(i - offsets[c])] for i, c in zip(pick, labels, strict=True)])
        return self._normalise(images), labels.to(self.device)
