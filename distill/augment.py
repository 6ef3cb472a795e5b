"""Differentiable Siamese augmentation (DSA, Zhao & Bilen 2021), shared by DSA, DM, MTT, DATM and evaluation.

Mode 'S' of the reference: each call draws one op family from the strategy ('color' = brightness,
saturation and contrast together). With ``siamese=True`` every sampled parameter is shared by the whole
batch, so calling twice with the same seed applies the identical transform to a real and a synthetic batch.
All ops are differentiable in the images.

Evaluation also offers ``dc``: the DC paper's own, non-differentiable MNIST augmentation (:func:`dc_augment`),
so that DC's published MNIST figures can be checked under the evaluation they were measured with.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
from scipy import ndimage
from torch.nn import functional as F

from distill.errors import DistillError

DIGITS_STRATEGY = "color_crop_cutout_scale_rotate"  # "flip augmentation is not good for digit datasets"
DEFAULT_STRATEGY = "color_crop_cutout_flip_scale_rotate"


@dataclass(frozen=True)
class DSAParams:
    prob_flip: float = 0.5
    ratio_scale: float = 1.2
    ratio_rotate: float = 15.0
    ratio_crop_pad: float = 0.125
    ratio_cutout: float = 0.5
    brightness: float = 1.0
    saturation: float = 2.0
    contrast: float = 0.5


def strategy_for(digits: bool) -> str:
    return DIGITS_STRATEGY if digits else DEFAULT_STRATEGY


@dataclass(frozen=True)
class BatchRows:
    """Which rows of a batch a tensor holds: rows ``index`` of a batch of ``size`` images. Augmenting with it
    draws every random parameter for the whole batch, in the order one call on the whole batch draws them, and
    applies those of ``index``; so processes that each augment their share of a batch give every image the
    transform one process would, and their generators stay in step."""

    size: int
    index: torch.Tensor  # int64 positions in the batch, one per row of the tensor

    @classmethod
    def strided(cls, size: int, rank: int, world: int) -> BatchRows:
        """Rows ``rank::world`` of a batch of ``size`` (a data-parallel process's share)."""
        return cls(size, torch.arange(size)[rank::world])


@dataclass(frozen=True)
class _Draw:
    """Where an op's random parameters come from: ``generator``, one per image or one for the batch (Siamese),
    for the rows ``rows`` of a larger batch or (None) for every row of ``x``."""

    generator: torch.Generator | None
    siamese: bool
    rows: BatchRows | None = None

    def _count(self, x: torch.Tensor) -> int:
        return x.shape[0] if self.rows is None else self.rows.size

    def _mine(self, draw: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        n = self._count(x)
        draw = draw.expand(n) if self.siamese else draw
        return (draw if self.rows is None else draw[self.rows.index]).to(x.device)

    def rand(self, x: torch.Tensor) -> torch.Tensor:
        return self._mine(torch.rand(1 if self.siamese else self._count(x), generator=self.generator), x)

    def randint(self, low: int, high: int, x: torch.Tensor) -> torch.Tensor:
        draw = torch.randint(low, high, (1 if self.siamese else self._count(x),), generator=self.generator)
        return self._mine(draw, x)


def _affine(x: torch.Tensor, theta: torch.Tensor) -> torch.Tensor:
    if x.shape[0] == 0:  # an empty share of a batch (affine_grid refuses an empty output)
        return x
    grid = F.affine_grid(theta.to(x.dtype), list(x.shape), align_corners=True)
    return F.grid_sample(x, grid, align_corners=True)


def aug_scale(x, p: DSAParams, d: _Draw):
    sx = d.rand(x) * (p.ratio_scale - 1.0 / p.ratio_scale) + 1.0 / p.ratio_scale
    sy = d.rand(x) * (p.ratio_scale - 1.0 / p.ratio_scale) + 1.0 / p.ratio_scale
    zeros = torch.zeros_like(sx)
    theta = torch.stack([torch.stack([sx, zeros, zeros], 1), torch.stack([zeros, sy, zeros], 1)], 1)
    return _affine(x, theta)


def aug_rotate(x, p: DSAParams, d: _Draw):
    angle = (d.rand(x) - 0.5) * 2 * p.ratio_rotate / 180 * math.pi
    cos, sin, zeros = torch.cos(angle), torch.sin(angle), torch.zeros_like(angle)
    theta = torch.stack([torch.stack([cos, sin, zeros], 1), torch.stack([-sin, cos, zeros], 1)], 1)
    return _affine(x, theta)


def aug_flip(x, p: DSAParams, d: _Draw):
    flip = d.rand(x) < p.prob_flip
    return torch.where(flip.view(-1, 1, 1, 1), x.flip(3), x)


def aug_brightness(x, p: DSAParams, d: _Draw):
    shift = d.rand(x) - 0.5
    return x + (shift * p.brightness).view(-1, 1, 1, 1)


def aug_saturation(x, p: DSAParams, d: _Draw):
    factor = d.rand(x) * p.saturation
    mean = x.mean(dim=1, keepdim=True)
    return (x - mean) * factor.view(-1, 1, 1, 1) + mean


def aug_contrast(x, p: DSAParams, d: _Draw):
    factor = d.rand(x) + p.contrast
    mean = x.mean(dim=[1, 2, 3], keepdim=True)
    return (x - mean) * factor.view(-1, 1, 1, 1) + mean


def aug_crop(x, p: DSAParams, d: _Draw):
    """Integer translation by up to ratio_crop_pad of the size, zero-filled (the reference's 'crop')."""
    n, _, h, w = x.shape
    sh, sw = int(h * p.ratio_crop_pad + 0.5), int(w * p.ratio_crop_pad + 0.5)
    tx = d.randint(-sh, sh + 1, x)
    ty = d.randint(-sw, sw + 1, x)
    gb, gx, gy = torch.meshgrid(
        torch.arange(n, device=x.device), torch.arange(h, device=x.device), torch.arange(w, device=x.device), indexing="ij"
    )
    gx = torch.clamp(gx + tx.view(-1, 1, 1) + 1, 0, h + 1)
    gy = torch.clamp(gy + ty.view(-1, 1, 1) + 1, 0, w + 1)
    padded = F.pad(x, [1, 1, 1, 1])
    return padded.permute(0, 2, 3, 1)[gb, gx, gy].permute(0, 3, 1, 2)


def aug_cutout(x, p: DSAParams, d: _Draw):
    n, _, h, w = x.shape
    ch, cw = int(h * p.ratio_cutout + 0.5), int(w * p.ratio_cutout + 0.5)
    ox = d.randint(0, h + (1 - ch % 2), x)
    oy = d.randint(0, w + (1 - cw % 2), x)
    gb, gx, gy = torch.meshgrid(
        torch.arange(n, device=x.device), torch.arange(ch, device=x.device), torch.arange(cw, device=x.device), indexing="ij"
    )
    gx = torch.clamp(gx + ox.view(-1, 1, 1) - ch // 2, 0, h - 1)
    gy = torch.clamp(gy + oy.view(-1, 1, 1) - cw // 2, 0, w - 1)
    mask = torch.ones(n, h, w, dtype=x.dtype, device=x.device)
    mask[gb, gx, gy] = 0
    return x * mask.unsqueeze(1)


OPS = {
    "color": [aug_brightness, aug_saturation, aug_contrast],
    "crop": [aug_crop],
    "cutout": [aug_cutout],
    "flip": [aug_flip],
    "scale": [aug_scale],
    "rotate": [aug_rotate],
}


def diff_augment(
    x: torch.Tensor,
    strategy: str,
    *,
    seed: int | None = None,
    generator: torch.Generator | None = None,
    params: DSAParams = DSAParams(),
    rows: BatchRows | None = None,
) -> torch.Tensor:
    """Augment a batch. ``seed`` set -> Siamese (shared parameters, reproducible across calls). ``rows``: ``x``
    holds these rows of a larger batch; the parameters are drawn for the whole batch (:class:`BatchRows`)."""
    if not strategy or strategy == "none":
        return x
    families = [s for s in strategy.split("_") if s]
    unknown = [s for s in families if s not in OPS]
    if unknown:
        raise ValueError(f"unknown DSA ops {unknown}; known: {list(OPS)}")
    if rows is not None and len(rows.index) != x.shape[0]:
        raise ValueError(f"rows name {len(rows.index)} images, the batch has {x.shape[0]}")
    siamese = seed is not None
    if seed is not None:
        generator = torch.Generator().manual_seed(int(seed))
    draw = _Draw(generator, siamese, rows)
    family = families[int(torch.randint(0, len(families), (1,), generator=generator))]
    for op in OPS[family]:
        x = op(x, params, draw)
    return x


# --- DC's evaluation augmentation (VICO-UoE/DatasetCondensation utils.py `augment` and `get_daparam`) ---
DC_AUGMENT = "dc"  # the strategy name evaluation accepts for it
DC_STRATEGY = "crop_scale_rotate"  # get_daparam's strategy for MNIST


@dataclass(frozen=True)
class DCAugParams:
    crop: int = 4  # pixels of mean-filled padding, then a random crop back to size
    scale: float = 0.2  # height and width each resized by U(1 - scale, 1 + scale)
    rotate: int = 45  # integer degrees in [-rotate, rotate)
    noise: float = 0.001  # std of additive Gaussian noise (normalised units)


def dc_augment(
    x: torch.Tensor, generator: torch.Generator, strategy: str = DC_STRATEGY, params: DCAugParams = DCAugParams(),
    rows: torch.Tensor | None = None,
) -> torch.Tensor:
    """DC's evaluation augmentation: every image gets ONE op drawn from ``strategy`` (crop, scale, rotate,
    noise), as the reference does, unlike DSA's one family per batch. Crop pads with the batch's channel means;
    scale resizes (nearest) and re-centres on a zero canvas; rotate is scipy's cubic-spline rotation with the
    mean as fill. Not differentiable (rotation goes through numpy); students only. Random draws come from
    ``generator`` (the reference uses numpy's global state).

    ``rows`` (positions in ``x``): only those images are augmented and returned, in that order, each exactly as
    in the whole batch's result: every image's parameters are still drawn (a data-parallel process's share of a
    batch, with the generator in step with the other processes')."""
    ops = [s for s in strategy.split("_") if s]
    out = x.detach().clone()
    n, channels, h, w = out.shape
    means = [float(out[:, c].mean()) for c in range(channels)]
    channel_fill = torch.tensor(means, dtype=out.dtype, device=out.device).view(-1, 1, 1)  # crop's padding
    rotate_fill = float(np.mean(means))  # scipy's cval: the mean of the channel means, as the reference
    wanted = None if rows is None else set(rows.tolist())
    for i in range(n):
        op = ops[int(torch.randint(0, len(ops), (1,), generator=generator))]
        if op == "crop":
            pad = params.crop
            r, c = (int(v) for v in torch.randint(0, 2 * pad, (2,), generator=generator))
            if wanted is None or i in wanted:
                canvas = channel_fill.repeat(1, h + 2 * pad, w + 2 * pad)
                canvas[:, pad : pad + h, pad : pad + w] = out[i]
                out[i] = canvas[:, r : r + h, c : c + w]
        elif op == "scale":
            lo, hi = 1 - params.scale, 1 + params.scale
            sh, sw = (int((lo + (hi - lo) * float(v)) * h) for v in torch.rand(2, generator=generator))
            if wanted is None or i in wanted:
                resized = F.interpolate(out[i : i + 1], [sh, sw])[0]  # nearest, as the reference
                side = max(sh, sw, h, w)
                canvas = torch.zeros(channels, side, side, dtype=out.dtype, device=out.device)
                r, c = (side - sh) // 2, (side - sw) // 2
                canvas[:, r : r + sh, c : c + sw] = resized
                r, c = (side - h) // 2, (side - w) // 2
                out[i] = canvas[:, r : r + h, c : c + w]
        elif op == "rotate":
            angle = int(torch.randint(-params.rotate, params.rotate, (1,), generator=generator))
            if wanted is None or i in wanted:
                turned = ndimage.rotate(out[i].cpu().numpy(), angle=angle, axes=(-2, -1), cval=rotate_fill)
                r, c = (turned.shape[-2] - h) // 2, (turned.shape[-1] - w) // 2
                out[i] = torch.from_numpy(np.ascontiguousarray(turned[:, r : r + h, c : c + w])).to(out)
        elif op == "noise":
            noise = torch.randn(out[i].shape, generator=generator)
            if wanted is None or i in wanted:
                out[i] = out[i] + params.noise * noise.to(out)
        else:
            raise ValueError(f"unknown DC augmentation op {op!r}")
    return out if rows is None else out[rows.to(out.device)]


def check_strategy(strategy: str) -> None:
    """One line for a bad evaluation augmentation: 'auto', 'none', 'dc' or '_'-joined DSA op families."""
    if strategy in ("auto", "none", DC_AUGMENT):
        return
    unknown = [s for s in strategy.split("_") if s not in OPS]
    if unknown or not strategy:
        raise DistillError(f"unknown augmentation {strategy!r}: use auto, none, {DC_AUGMENT} (DC's MNIST evaluation) "
                           f"or DSA op families joined by '_' ({', '.join(OPS)})")


def augment_for_training(x: torch.Tensor, strategy: str, generator: torch.Generator,
                         rows: torch.Tensor | None = None) -> torch.Tensor:
    """The evaluation students' augmentation: DC's per-image one (``dc``) or DSA's (per-sample, not Siamese).

    ``rows`` (positions in ``x``): a data-parallel process's share of the batch ``x``; the result is those
    images, each augmented as in the whole batch's result, and the generator advances as for the whole batch."""
    if strategy == DC_AUGMENT:
        return dc_augment(x, generator, rows=rows)
    if rows is None:
        return diff_augment(x, strategy, generator=generator)
    rows = rows.to(x.device)
    return diff_augment(x[rows], strategy, generator=generator, rows=BatchRows(x.shape[0], rows.cpu()))
