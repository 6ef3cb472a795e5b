"""One prepared GPU check: every GPU-relevant rate of the product, one markdown table, within a time budget.

    python bench/gpu_check.py --out DIR            # on one H100/H200: exits within --budget-s (default 480)
    python bench/gpu_check.py --cpu-smoke          # the same code at tiny sizes on the CPU (the test suite)

``bench/gpu_run.sh`` is the whole call on a lent GPU machine (kit install, this check, environment). Each row
(section, setting, batch, dtype, result, seconds, peak memory, status) is appended to ``DIR/rows.jsonl`` the
moment it is measured and ``DIR/table.md`` is rewritten, so a run killed from outside still returns what it
measured. Every section runs under its own time limit (:data:`LIMITS`, cut to what the budget has left); a
section that overruns or fails is a row, and one whose turn comes after the budget is spent is a
``skipped`` row. Rows with a ``key`` carry a machine-readable rate that ``bench/imagenet_projection.py
--rates`` reads.

Sections, in the order they run:

1. ``encode``: an SD-VAE-shaped diffusers ``AutoencoderKL`` (random weights) at 256 px on JPEG files: the
   loader alone, the former CPU-fed input (fp32 conversion on the CPU, 4x the bytes copied), uint8 batches
   converted on the device, and the latent cache end to end.
2. ``dit``: DiT-XL/2-shaped ``DiTTransformer2DModel`` steps (classifier-free guidance 4) at batch 64 / 256.
3. ``vae-decode``: the SD-VAE-shaped decoder at batch 64 / 256.
4. ``kmeans``: 1300 x 4096 per class (an ImageNet class of SD-VAE latents), K = 10 / 50 / 100, with the torch
   Lloyd on the device (``kmeans_backend=torch``: the lent image has no FAISS) and FAISS where installed.
5. ``resnet18``: ResNet-18 training steps at 224 px, with and without channels_last.
5b. ``refine``: ``oq``'s pixel refinement (DM's class-mean step: a fresh random ConvNet, DSA, the real side
   graph-free in the device's real precision, the synthetic side with a graph) at 224 px, per class-iteration.
6. ``teacher``: teacher training (``distill.teacher.train_on_split``) on a synthetic ImageNet-shaped JPEG set,
   next to the loader's own rate on the same files.
7. ``pixel``: every pixel method for a few iterations (DC / DSA / DM with ``compile_real=on``).
8. ``dc-mnist``: DC on MNIST at IPC 1, shortened, evaluated briefly (the paper: 91.7 +- 0.5 at full length).
9. ``service``: an ``oq`` job through ``distill api`` + ``distill worker --ray-address local`` (needs Ray,
   FastAPI and SQLAlchemy: skipped, with a row, where they are not installed).

Needs DISTILL_DATA_DIR with mnist/ for sections 7 and 8. Writes only under a temporary folder (its own
DISTILL_HOME), removed at the end unless --keep. Only the standard library is imported at module level: each
section imports what it uses, so a missing package costs its sections, not the check.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import json
import os
import resource
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(REPO))

SYNTHETIC = "gpu-check-synthetic"  # the dataset name the service section registers (see register_synthetic)
# run order: the methods with a compile_real switch (whose first compile takes the longest) last, so a section cut
# at its limit has run every other method
PIXEL_METHODS = ("dd", "mtt", "datm", "dq", "dm", "dc", "dsa")
COMPILED_METHODS = ("dm", "dc", "dsa")
SERVICE_NEEDS = ("ray", "fastapi", "sqlalchemy", "uvicorn", "httpx")


@dataclass(frozen=True)
class Sizes:
    """Everything that differs between the real check and the CPU smoke run."""

    encode_images: int
    encode_px: int
    encode_batch: int
    vae: dict[str, Any]
    decode_batches: tuple[int, ...]
    dit: dict[str, Any]
    dit_batches: tuple[int, ...]
    dit_steps: int
    kmeans_n: int
    kmeans_d: int
    kmeans_ks: tuple[int, ...]
    resnet_px: int
    resnet_batch: int
    resnet_steps: int
    refine_px: int
    refine_classes: int
    refine_settings: tuple[tuple[int, int], ...]  # (IPC, real images per class)
    refine_steps: int
    teacher_classes: int
    teacher_per_class: int
    teacher_px: int
    teacher_batch: int
    service_classes: int
    service_per_class: int
    service_px: int
    service_ipc: int
    service_gpus: int
    pixel_max_per_class: int
    pixel_params: dict[str, dict[str, Any]]
    pixel_compile: bool
    dc_iterations: int
    dc_params: dict[str, Any]
    dc_max_per_class: int | None
    dc_runs: int
    dc_epochs: int
    dc_test_limit: int | None
    budget_s: float
    limit_s: float | None  # every section's limit (None: LIMITS)


SD_VAE = {  # Stable Diffusion's VAE (sd-vae-ft-mse) shape: 83.7 M parameters, 4 x 32 x 32 latents at 256 px
    "in_channels": 3, "out_channels": 3, "latent_channels": 4, "layers_per_block": 2, "norm_num_groups": 32,
    "block_out_channels": [128, 256, 512, 512], "sample_size": 256, "scaling_factor": 0.18215,
    "down_block_types": ["DownEncoderBlock2D"] * 4, "up_block_types": ["UpDecoderBlock2D"] * 4,
}
TINY_VAE = {**SD_VAE, "block_out_channels": [8, 16], "layers_per_block": 1, "norm_num_groups": 4,
            "down_block_types": ["DownEncoderBlock2D"] * 2, "up_block_types": ["UpDecoderBlock2D"] * 2}
DIT_XL2 = {  # DiT-XL/2 at 256 px (Peebles & Xie): 28 blocks, width 1152, 16 heads, patch 2, learned sigma
    "num_layers": 28, "num_attention_heads": 16, "attention_head_dim": 72, "in_channels": 4, "out_channels": 8,
    "patch_size": 2, "sample_size": 32, "num_embeds_ada_norm": 1000,
}
TINY_DIT = {**DIT_XL2, "num_layers": 2, "num_attention_heads": 2, "attention_head_dim": 8, "sample_size": 4,
            "num_embeds_ada_norm": 10}

FEW = {  # a few iterations of every pixel method (buffers, teachers: the smallest that runs)
    "dd": {"iterations": 3, "batch_real": 256},
    "dc": {"iterations": 3},
    "dsa": {"iterations": 3},
    "dm": {"iterations": 5},
    "mtt": {"iterations": 3, "experts": 2, "expert_train_epochs": 3, "max_start_epoch": 2, "expert_epochs": 2,
            "syn_steps": 5},
    "datm": {"iterations": 3, "experts": 2, "expert_train_epochs": 3, "max_start_epoch": 2, "expert_epochs": 2,
             "syn_steps": 5, "current_max_start_epoch": 1, "expansion_end_epoch": 2},
    "dq": {"teacher_epochs": 1},
}
TINY_FEW = {**FEW, "dd": {"iterations": 1, "batch_real": 32}, "dc": {"iterations": 1, "batch_real": 16},
            "dsa": {"iterations": 1, "batch_real": 16}, "dm": {"iterations": 1, "batch_real": 16},
            "mtt": {**FEW["mtt"], "iterations": 1, "syn_steps": 2},
            "datm": {**FEW["datm"], "iterations": 1, "syn_steps": 2}}

FULL = Sizes(encode_images=2048, encode_px=256, encode_batch=128, vae=SD_VAE, decode_batches=(64, 256), dit=DIT_XL2,
             dit_batches=(64, 256), dit_steps=4, kmeans_n=1300, kmeans_d=4096, kmeans_ks=(10, 50, 100),
             resnet_px=224, resnet_batch=256, resnet_steps=10, refine_px=224, refine_classes=10,
             refine_settings=((10, 64), (10, 256), (50, 64)), refine_steps=5, teacher_classes=100,
             teacher_per_class=20, teacher_px=224, teacher_batch=256, service_classes=100, service_per_class=40, service_px=256,
             service_ipc=10, service_gpus=0, pixel_max_per_class=500, pixel_params=FEW, pixel_compile=True,
             dc_iterations=200, dc_params={}, dc_max_per_class=None, dc_runs=2, dc_epochs=300, dc_test_limit=None,
             budget_s=480.0, limit_s=None)
SMOKE = Sizes(encode_images=12, encode_px=32, encode_batch=4, vae=TINY_VAE, decode_batches=(2, 4), dit=TINY_DIT,
              dit_batches=(2, 4), dit_steps=2, kmeans_n=60, kmeans_d=32, kmeans_ks=(2, 4), resnet_px=32,
              resnet_batch=2, resnet_steps=1, refine_px=32, refine_classes=2, refine_settings=((2, 4),), refine_steps=1,
              teacher_classes=2, teacher_per_class=4, teacher_px=32,
              teacher_batch=4, service_classes=3, service_per_class=4, service_px=32, service_ipc=2,
              service_gpus=1, pixel_max_per_class=10, pixel_params=TINY_FEW, pixel_compile=False, dc_iterations=2,
              dc_params={"batch_real": 16}, dc_max_per_class=10, dc_runs=1, dc_epochs=2, dc_test_limit=100,
              budget_s=900.0, limit_s=300.0)

SECTIONS = ("encode", "dit", "vae-decode", "kmeans", "resnet18", "refine", "teacher", "pixel", "dc-mnist", "service")
# Each section's own limit in seconds on one H100 (together within the default budget; cut to the budget left).
LIMITS = {"encode": 70, "dit": 45, "vae-decode": 25, "kmeans": 20, "resnet18": 30, "refine": 20, "teacher": 50, "pixel": 130,
          "dc-mnist": 50, "service": 90}
MIN_START_S = 10.0  # a section is not started with less than this left of the budget


# -------------------------------------------------------------------------------------------- the table
class SectionTimeout(Exception):
    """Raised inside a section when its own time limit is reached (SIGALRM)."""


@dataclass
class Row:
    section: str
    setting: str
    result: str
    seconds: float | None = None
    batch: int | str = ""
    dtype: str = ""
    peak_gib: float | None = None
    status: str = "ok"
    key: str = ""  # a machine-readable rate for bench/imagenet_projection.py (with value, unit)
    value: float | None = None
    unit: str = ""


@dataclass
class Table:
    budget_s: float
    out: Path | None = None
    header: str = ""
    rows: list[Row] = field(default_factory=list)
    started: float = field(default_factory=time.perf_counter)
    deadline: float = float("inf")  # the running section's own end

    def left(self) -> float:
        return self.budget_s - (time.perf_counter() - self.started)

    def section_left(self) -> float:
        return min(self.left(), self.deadline - time.perf_counter())

    def add(self, row: Row) -> None:
        self.rows.append(row)
        print(f"[gpu_check] {row.section} | {row.setting} | {row.result} | {row.status}", file=sys.stderr, flush=True)
        if self.out is not None:  # as measured: a run killed from outside keeps every finished row
            with open(self.out / "rows.jsonl", "a") as handle:
                handle.write(json.dumps(row.__dict__) + "\n")
            (self.out / "table.md").write_text(self.markdown() + "\n")

    def guarded(self, section: str, limit_s: float, fn: Callable[[], None]) -> None:
        """Run one section under min(its limit, the budget left); an exception or the limit becomes a row."""
        left = self.left()
        if left < MIN_START_S:
            self.add(Row(section, "-", f"skipped: {left:.0f} s of the {self.budget_s:.0f} s budget left", status="skipped"))
            return
        limit = max(1.0, min(limit_s, left - 2.0))
        start = time.perf_counter()
        self.deadline = start + limit

        def expire(_signum: int, _frame: Any) -> None:
            raise SectionTimeout(f"stopped at its {limit:.0f} s limit (rows above it were measured)")

        previous = signal.signal(signal.SIGALRM, expire)
        signal.setitimer(signal.ITIMER_REAL, limit)
        try:
            fn()
        except SectionTimeout as exc:
            self.add(Row(section, "-", str(exc), time.perf_counter() - start, status="timeout"))
        except Exception as exc:  # one section's failure must not hide the others
            traceback.print_exc(file=sys.stderr)
            message = " ".join(f"{type(exc).__name__}: {exc}".split())[:200]  # one line in the table
            self.add(Row(section, "-", message.replace("|", "/"), time.perf_counter() - start, status="error"))
        finally:
            signal.setitimer(signal.ITIMER_REAL, 0)
            signal.signal(signal.SIGALRM, previous)
            self.deadline = float("inf")
            free_device_memory()

    def markdown(self) -> str:
        lines = [self.header, "", "| section | setting | batch | dtype | result | seconds | peak GiB | status |",
                 "|---|---|---:|---|---|---:|---:|---|"]
        for r in self.rows:
            cells = [r.section, r.setting, str(r.batch), r.dtype, r.result,
                     "" if r.seconds is None else f"{r.seconds:.2f}", "" if r.peak_gib is None else f"{r.peak_gib:.2f}",
                     r.status]
            lines.append("| " + " | ".join(c.replace("|", "/") for c in cells) + " |")
        return "\n".join(lines)


def free_device_memory() -> None:
    torch = sys.modules.get("torch")
    if torch is not None and torch.cuda.is_available():
        torch.cuda.empty_cache()


def sync(device: Any) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


@contextlib.contextmanager
def measured(device: Any) -> Iterator[dict[str, float]]:
    """Time a block (device synchronised at both ends) and read its peak memory: CUDA's peak allocation on a
    GPU, the process's peak resident set so far on the CPU. Yields a dict filled on exit."""
    import torch

    out: dict[str, float] = {}
    sync(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    start = time.perf_counter()
    yield out
    sync(device)
    out["seconds"] = time.perf_counter() - start
    if device.type == "cuda":
        out["peak_gib"] = torch.cuda.max_memory_allocated(device) / 2**30
    else:
        out["peak_gib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB -> GiB


def dtype_name(dtype: Any) -> str:
    return str(dtype).replace("torch.", "")


def missing_modules(names: tuple[str, ...]) -> list[str]:
    return [name for name in names if importlib.util.find_spec(name) is None]


# --------------------------------------------------------------------------------------- synthetic data
def write_jpegs(root: Path, classes: int, per_class: int, px: int, *, val_per_class: int = 1, seed: int = 0,
                wnids: bool = True) -> Path:
    """An ImageFolder of smooth random JPEGs (train/ and val/), ImageNet-like file names; returns ``root``."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(seed)
    for split, count in (("train", per_class), ("val", val_per_class)):
        for c in range(classes):
            name = f"n{c:08d}" if wnids else f"class{c:03d}"
            folder = root / split / name
            folder.mkdir(parents=True, exist_ok=True)
            base = rng.integers(0, 256, size=3)
            for i in range(count):
                # a low-resolution colour field upsampled: compresses like a photo, not like noise
                small = np.clip(base + rng.normal(0, 60, size=(8, 8, 3)), 0, 255).astype(np.uint8)
                image = Image.fromarray(small).resize((px + px // 4, px), Image.Resampling.BICUBIC)
                image.save(folder / f"{name}_{i:05d}.JPEG", quality=90)
    return root


def register_synthetic(root: Path, classes: int) -> None:
    """Register the synthetic JPEG set as a named dataset (ImageNet's normalisation and 224 px reads)."""
    from distill.data import registry

    if SYNTHETIC in registry.DATASETS:
        return
    size = int(os.environ.get("GPU_CHECK_SYNTHETIC_PX", "224"))
    registry.DATASETS[SYNTHETIC] = registry.DatasetSpec(
        SYNTHETIC, "gpu_check: synthetic ImageNet-shaped JPEGs", 3, size, classes, registry.IMAGENET_MEAN,
        registry.IMAGENET_STD,
        lambda: registry._imagefolder_dataset(SYNTHETIC, root, channels=3, image_size=size,
                                              mean=registry.IMAGENET_MEAN, std=registry.IMAGENET_STD),
    )


# As a DISTILL_PLUGINS module (PYTHONPATH=bench, DISTILL_PLUGINS=gpu_check) the service's processes register
# the synthetic dataset when GPU_CHECK_SYNTHETIC_ROOT says where it is.
if os.environ.get("GPU_CHECK_SYNTHETIC_ROOT"):
    register_synthetic(Path(os.environ["GPU_CHECK_SYNTHETIC_ROOT"]), int(os.environ["GPU_CHECK_SYNTHETIC_CLASSES"]))


def save_random_vae(folder: Path, config: dict[str, Any], seed: int = 0) -> Path:
    import torch
    from diffusers import AutoencoderKL

    if not (folder / "config.json").exists():
        torch.manual_seed(seed)
        model: Any = AutoencoderKL(**config)  # diffusers' stubs hide ModelMixin's methods
        model.save_pretrained(folder)
    return folder


# ------------------------------------------------------------------------------------------- sections
@dataclass
class Context:
    table: Table
    sizes: Sizes
    device: Any
    work: Path

    def add(self, *args: Any, **kwargs: Any) -> None:
        self.table.add(Row(*args, **kwargs))

    def enough(self, section: str, what: str, need_s: float) -> bool:
        """False (and a row saying so) when the section's own limit leaves less than ``need_s`` for ``what``."""
        left = self.table.section_left()
        if left >= need_s:
            return True
        self.add(section, what, f"skipped: {left:.0f} s of the section's limit left", status="skipped")
        return False


def _encode_cpu_fed(encoder: Any, images: Any) -> Any:
    """The former input path: fp32 conversion (and resize) on the CPU, then 4 bytes per value to the device."""
    import torch

    from quantize.encoders import resize

    out = []
    with torch.inference_mode():
        for part in images.split(encoder.batch_size):
            x = part.float().div(255.0)
            x = x.repeat(1, 3, 1, 1) if x.shape[1] == 1 else x
            if x.shape[-1] != encoder.resolution:
                x = resize(x, encoder.resolution)
            x = x.clamp(0, 1).mul(2).sub(1).to(encoder.device, encoder.dtype)
            out.append(encoder.encode_fn(x).float().cpu())
    return torch.cat(out)


def section_encode(c: Context) -> None:
    import torch

    from distill.data import get_dataset
    from distill.data.loader import ImageStream
    from distill.data.registry import split_at_size
    from quantize.encoders import load_encoder
    from quantize.latent_cache import latents_for_dataset

    s, device = c.sizes, c.device
    per_class = max(1, s.encode_images // 8)
    root = write_jpegs(c.work / "encode-jpegs", 8, per_class, s.encode_px + s.encode_px // 8, wnids=False)
    vae_dir = save_random_vae(c.work / "sd-vae-random", s.vae)
    name = f"imagefolder:{root}"
    split = split_at_size(get_dataset(name).train, s.encode_px)
    n = len(split)
    encoder = load_encoder(str(vae_dir), image_size=s.encode_px, resolution=s.encode_px, device=device,
                           batch_size=s.encode_batch)
    dtype = dtype_name(encoder.dtype)
    stream = ImageStream(split, batch_size=s.encode_batch, device=device)
    with measured(device) as m:
        batches = [images for _, images in stream]
    c.add("encode", f"loader alone: {n} JPEGs -> {s.encode_px} px, {stream.num_workers} processes",
          f"{n / m['seconds']:.0f} img/s", m["seconds"], s.encode_batch, "uint8", key="loader_img_s",
          value=n / m["seconds"], unit="img/s")
    images = torch.cat(batches)
    encoder.encode(images[: s.encode_batch])  # warm-up (cuDNN autotune, allocator)
    with measured(device) as m:
        _encode_cpu_fed(encoder, images)
    c.add("encode", "SD-VAE encoder, CPU-fed (fp32 made on the CPU, then copied)", f"{n / m['seconds']:.0f} img/s",
          m["seconds"], s.encode_batch, dtype, m["peak_gib"], key="encode_cpu_fed_img_s", value=n / m["seconds"],
          unit="img/s")
    pinned = [b.pin_memory() for b in images.split(s.encode_batch)] if device.type == "cuda" else [images]
    with measured(device) as m:
        for part in pinned:
            encoder.encode(part)
    c.add("encode", "SD-VAE encoder, uint8 batches converted on the device", f"{n / m['seconds']:.0f} img/s",
          m["seconds"], s.encode_batch, dtype, m["peak_gib"], key="encode_img_s", value=n / m["seconds"],
          unit="img/s")
    del images, pinned, batches
    with measured(device) as m:
        store = latents_for_dataset(name, str(vae_dir), resolution=s.encode_px, device=str(device),
                                    batch_size=s.encode_batch)
    c.add("encode", f"latent cache end to end (loader + encoder + shards), latents {tuple(store.latent_shape)}",
          f"{n / m['seconds']:.0f} img/s", m["seconds"], s.encode_batch, dtype, m["peak_gib"],
          key="latent_cache_img_s", value=n / m["seconds"], unit="img/s")


def section_vae_decode(c: Context) -> None:
    import torch

    from quantize.encoders import load_encoder

    s, device = c.sizes, c.device
    vae_dir = save_random_vae(c.work / "sd-vae-random", s.vae)
    encoder = load_encoder(str(vae_dir), image_size=s.encode_px, resolution=s.encode_px, device=device,
                           batch_size=max(s.decode_batches))
    side = s.encode_px // encoder.downsample
    encoder.decode(torch.randn(2, encoder.latent_channels, side, side), batch_size=2)  # warm-up
    for batch in s.decode_batches:
        if not c.enough("vae-decode", f"batch {batch}", 3.0):
            continue
        z = torch.randn(batch, encoder.latent_channels, side, side)
        with measured(device) as m:
            encoder.decode(z, batch_size=batch)
        c.add("vae-decode", f"SD-VAE decoder, {side} x {side} latents -> {s.encode_px} px (to CPU float)",
              f"{batch / m['seconds']:.0f} img/s", m["seconds"], batch, dtype_name(encoder.dtype), m["peak_gib"],
              key=f"vae_decode_img_s_b{batch}", value=batch / m["seconds"], unit="img/s")


def section_dit(c: Context) -> None:
    import torch
    from diffusers import DDPMScheduler, DiTTransformer2DModel

    from quantize.diffusion import LatentPrior, decode_with_prior, model_dtype

    s, device = c.sizes, c.device
    torch.manual_seed(0)
    dtype = model_dtype(device)
    model: Any = DiTTransformer2DModel(**s.dit)
    model = model.to(device, dtype).eval().requires_grad_(False)
    params = sum(p.numel() for p in model.parameters()) / 1e6
    channels, side = s.dit["in_channels"], s.dit["sample_size"]
    scheduler: Any = DDPMScheduler()
    prior = LatentPrior(model, dict(scheduler.config), s.dit["num_embeds_ada_norm"],
                        torch.zeros(channels), torch.ones(channels))
    decode_with_prior(torch.randn(2, channels, side, side), torch.zeros(2, dtype=torch.long), prior, strength=1.0,
                      steps=1, device=device, batch_size=2)  # warm-up
    for batch in s.dit_batches:
        if not c.enough("dit", f"batch {batch}", 5.0):
            continue
        latents = torch.randn(batch, channels, side, side)
        labels = torch.arange(batch) % s.dit["num_embeds_ada_norm"]
        with measured(device) as m:
            decode_with_prior(latents, labels, prior, strength=1.0, steps=s.dit_steps, guidance=4.0, device=device,
                              batch_size=batch)
        per_step = m["seconds"] / s.dit_steps
        c.add("dit", f"DiT-XL/2 shape ({params:.0f} M params), cfg 4 (2 passes per step), {s.dit_steps} steps",
              f"{1000 * per_step:.0f} ms/step = {batch / per_step:.0f} latent-steps/s; "
              f"{batch / (35 * per_step):.1f} img/s at 35 steps", m["seconds"], batch, dtype_name(dtype),
              m["peak_gib"], key=f"dit_latent_steps_s_b{batch}", value=batch / per_step, unit="latent-steps/s")
        del latents


def section_kmeans(c: Context) -> None:
    import numpy as np

    from quantize.kmeans import faiss_available, faiss_has_gpu, kmeans

    s, device = c.sizes, c.device
    rng = np.random.default_rng(0)
    # a class-like cloud: 20 modes with spread, in 4096 dims (SD-VAE 4 x 32 x 32 latents)
    modes = rng.standard_normal((20, s.kmeans_d)).astype(np.float32) * 2.0
    x = (modes[rng.integers(0, 20, s.kmeans_n)] + rng.standard_normal((s.kmeans_n, s.kmeans_d))).astype(np.float32)
    variants: list[tuple[str, dict[str, Any]]] = [(f"torch Lloyd on {device.type}", {"backend": "torch",
                                                                                     "device": str(device)})]
    if faiss_available():
        variants.append(("faiss CPU", {"backend": "faiss", "gpu": False}))
        if faiss_has_gpu():
            variants.append(("faiss GPU", {"backend": "faiss", "gpu": True}))
    else:
        c.add("kmeans", "faiss", "not installed here: jobs use kmeans_backend=auto -> torch (this row's torch Lloyd)",
              status="skipped")
    for _, kwargs in variants:
        kmeans(x, s.kmeans_ks[0], seed=0, **kwargs)  # warm-up (CUDA context, BLAS, GPU resources)
    for k in s.kmeans_ks:
        reference = None
        for label, kwargs in variants:
            if not c.enough("kmeans", f"{label}, K = {k}", 2.0):
                continue
            with measured(device) as m:
                result = kmeans(x, k, seed=0, **kwargs)
            reference = reference if reference is not None else result.error
            key = "kmeans_torch_s_per_class" if kwargs["backend"] == "torch" else ""
            c.add("kmeans", f"{label}, {s.kmeans_n} x {s.kmeans_d}, K = {k}, 25 iterations",
                  f"W2² {result.error:.2f} ({100 * (result.error / reference - 1):+.2f} % vs first row)",
                  m["seconds"], s.kmeans_n, "float32", m["peak_gib"],
                  key=f"{key}_k{k}" if key else "", value=m["seconds"] if key else None, unit="s/class")


def _train_steps(model: Any, inputs: Any, targets: Any, dtype: Any, steps: int) -> None:
    """``steps`` SGD steps of ``model`` on one fixed batch under autocast to ``dtype`` (fp32: none)."""
    import torch
    from torch.nn import functional as F

    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    for _ in range(steps):
        with torch.autocast(inputs.device.type, dtype=dtype, enabled=dtype != torch.float32):
            loss = F.cross_entropy(model(inputs), targets)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()


def section_resnet18(c: Context) -> None:
    import torch

    from distill.nets import build_network

    s, device = c.sizes, c.device
    dtype = torch.bfloat16 if device.type == "cuda" and torch.cuda.is_bf16_supported() else torch.float32
    x = torch.randn(s.resnet_batch, 3, s.resnet_px, s.resnet_px, device=device)
    y = torch.randint(0, 1000, (s.resnet_batch,), device=device)
    for layout in ("contiguous", "channels_last"):
        if not c.enough("resnet18", layout, 5.0):
            continue
        fmt = torch.channels_last if layout == "channels_last" else torch.contiguous_format
        model: Any = build_network("resnet18", 3, 1000, s.resnet_px, seed=0).to(device)
        model = model.to(memory_format=fmt)
        inputs = x.contiguous(memory_format=fmt)
        _train_steps(model, inputs, y, dtype, 2)  # warm-up (cuDNN autotune)
        with measured(device) as m:
            _train_steps(model, inputs, y, dtype, s.resnet_steps)
        rate = s.resnet_batch * s.resnet_steps / m["seconds"]
        c.add("resnet18", f"ResNet-18 train steps at {s.resnet_px} px, {layout}, SGD, {s.resnet_steps} steps",
              f"{rate:.0f} img/s", m["seconds"], s.resnet_batch, f"{dtype_name(dtype)} autocast", m["peak_gib"],
              key=f"resnet18_train_img_s_{layout}", value=rate, unit="img/s")


def _refine_step(seed: int, real: Any, syn: Any, optimizer: Any, real_dtype: Any) -> None:
    """One refinement iteration over every class of ``real`` / ``syn`` (C x n x 3 x H x W): DM's class-mean step
    (the functions :class:`pixelspace.dm.DistributionMatching` runs each iteration, on a fresh ConvNet-3)."""
    from distill.nets import build_network
    from pixelspace.dm import augment_classes, matching_loss

    net = build_network("convnet", 3, 1000, real.shape[-1], seed=seed).to(real.device)
    for p in net.parameters():
        p.requires_grad_(False)
    real_aug, syn_aug = augment_classes(real, syn, "color_crop_cutout_flip_scale_rotate",
                                        [seed + k for k in range(len(real))])
    optimizer.zero_grad(set_to_none=True)
    matching_loss(net, real_aug, syn_aug, 512, real_dtype).backward()
    optimizer.step()


def section_refine(c: Context) -> None:
    """Seconds per class-iteration of ``oq``'s refinement (what ``refine_iterations`` multiplies by the classes)."""
    import torch

    from pixelspace.precision import real_autocast_dtype

    s, device = c.sizes, c.device
    real_dtype = real_autocast_dtype("auto", device)
    for ipc, batch_real in s.refine_settings:
        if not c.enough("refine", f"ipc {ipc}, batch_real {batch_real}", 5.0):
            continue
        px, classes = s.refine_px, s.refine_classes
        real = torch.rand(classes, batch_real, 3, px, px, device=device)
        syn = torch.rand(classes, ipc, 3, px, px, device=device, requires_grad=True)
        optimizer = torch.optim.SGD([syn], lr=1.0, momentum=0.5)
        _refine_step(0, real, syn, optimizer, real_dtype)  # warm-up (cuDNN autotune)
        with measured(device) as m:
            for it in range(s.refine_steps):
                _refine_step(it + 1, real, syn, optimizer, real_dtype)
        per_class_iter = m["seconds"] / (s.refine_steps * classes)
        c.add("refine", f"DM class-mean step at {px} px, ConvNet-3, IPC {ipc}, {batch_real} real/class, "
              f"{classes} classes x {s.refine_steps} iterations", f"{per_class_iter * 1000:.1f} ms per class-iteration",
              m["seconds"], batch_real, f"real {dtype_name(real_dtype or torch.float32)}, synthetic float32",
              m["peak_gib"], key=f"refine_s_per_class_iter_ipc{ipc}_real{batch_real}", value=per_class_iter, unit="s")

def section_teacher(c: Context) -> None:
    from distill.data import get_dataset
    from distill.data.loader import ImageStream
    from distill.teacher import train_on_split

    s, device = c.sizes, c.device
    root = write_jpegs(c.work / "teacher-jpegs", s.teacher_classes, s.teacher_per_class,
                       s.teacher_px + s.teacher_px // 8)
    dataset = get_dataset(f"imagefolder:{root}@{s.teacher_px}")
    n = len(dataset.train)
    stream = ImageStream(dataset.train, batch_size=s.teacher_batch, device=device)
    with measured(device) as m:
        for _ in stream:
            pass
    loader_rate = n / m["seconds"]
    c.add("teacher", f"loader alone: {n} JPEGs -> {s.teacher_px} px, {stream.num_workers} processes",
          f"{loader_rate:.0f} img/s", m["seconds"], s.teacher_batch, "uint8", key="teacher_loader_img_s",
          value=loader_rate, unit="img/s")
    with measured(device) as m:
        train_on_split(dataset, "resnet18", 1, 0, device, batch_size=s.teacher_batch)
    rate = n / m["seconds"]
    c.add("teacher", f"teacher training (train_on_split, ResNet-18, 1 epoch, augmentation) on the same {n} JPEGs",
          f"{rate:.0f} img/s ({rate / loader_rate:.2f} x the loader)", m["seconds"], s.teacher_batch,
          "auto precision", m["peak_gib"], key="teacher_train_img_s", value=rate, unit="img/s")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@contextlib.contextmanager
def process(args: list[str], env: dict[str, str], log: Path) -> Iterator[subprocess.Popen]:
    with open(log, "wb") as out:
        proc = subprocess.Popen(args, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        yield proc
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()


def _wait_healthy(client: Any, api: subprocess.Popen, log: Path) -> None:
    import httpx

    deadline = time.perf_counter() + 120
    while True:
        if api.poll() is not None:
            raise RuntimeError(f"distill api exited: {log.read_text()[-300:]}")
        with contextlib.suppress(httpx.TransportError):
            if client.get("/healthz").status_code == 200:
                return
        if time.perf_counter() > deadline:
            raise TimeoutError("distill api did not come up")
        time.sleep(0.2)


def section_service(c: Context) -> None:
    missing = missing_modules(SERVICE_NEEDS)
    if missing:
        c.add("service", "oq via distill api + distill worker --ray-address local",
              f"skipped: {', '.join(missing)} not installed here", status="skipped")
        return
    import httpx

    s, work = c.sizes, c.work
    start = time.perf_counter()
    root = write_jpegs(work / "synthetic-imagenet", s.service_classes, s.service_per_class, s.service_px)
    vae_dir = save_random_vae(work / "sd-vae-service", s.vae)
    prep_s = time.perf_counter() - start
    px = 224 if s.service_px >= 224 else s.service_px
    env = {**os.environ, "DISTILL_HOME": str(work / "service-home"),
           "DISTILL_DATABASE_URL": f"sqlite:///{work / 'service.sqlite3'}",
           "GPU_CHECK_SYNTHETIC_ROOT": str(root), "GPU_CHECK_SYNTHETIC_CLASSES": str(s.service_classes),
           "GPU_CHECK_SYNTHETIC_PX": str(px), "DISTILL_PLUGINS": "gpu_check", "DISTILL_POLL_SECONDS": "0.2",
           "DISTILL_HEARTBEAT_SECONDS": "1", "PYTHONPATH": os.pathsep.join([str(HERE), str(REPO)]),
           "RAY_USAGE_STATS_ENABLED": "0",
           # over HTTP a model parameter names a registered model, never a path (the operator's registry)
           "DISTILL_MODELS": json.dumps({"gpu-check-vae": str(vae_dir)})}
    env.pop("DISTILL_API_KEYS", None)
    port = free_port()
    # The API validates dataset names against the registry when it is imported: register first, then start it.
    api_cmd = [sys.executable, "-c", "import gpu_check, sys; from distill.cli import main; "
               f"sys.argv = ['distill', 'api', '--port', '{port}']; main()"]
    worker_cmd = [sys.executable, "-m", "distill.cli", "worker", "--ray-address", "local"]
    if s.service_gpus:
        worker_cmd += ["--ray-num-gpus", str(s.service_gpus)]
    request = {"dataset": SYNTHETIC, "method": "oq", "ipc": s.service_ipc, "seed": 0,
               "params": {"encoder": "gpu-check-vae", "resolution": s.service_px, "w2_uniform": False,
                          "refine_iterations": 0,  # the same job at smoke (32 px, auto = 200) and full size
                          "batch_size": 64 if s.service_px >= 224 else 4}}
    with process(api_cmd, env, work / "api.log") as api, process(worker_cmd, env, work / "worker.log") as worker:
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=30) as client:
            _wait_healthy(client, api, work / "api.log")
            submitted = time.perf_counter()
            response = client.post("/jobs", json=request)
            if response.status_code != 202:
                raise RuntimeError(f"POST /jobs -> {response.status_code}: {response.text[:200]}")
            job_id = response.json()["id"]
            while True:
                job = client.get(f"/jobs/{job_id}").json()
                if job["status"] in ("succeeded", "failed", "cancelled"):
                    break
                if worker.poll() is not None:
                    raise RuntimeError(f"distill worker exited: {(work / 'worker.log').read_text()[-300:]}")
                time.sleep(0.5)
            wall = time.perf_counter() - submitted
            if job["status"] != "succeeded":
                raise RuntimeError(f"job {job['status']}: {job.get('error')}")
            archive = work / "service.tar"
            archive.write_bytes(client.get(f"/jobs/{job_id}/artifact").content)
    from distill.archive import read_archive

    manifest = read_archive(archive).manifest  # sha256-verified
    timings = manifest.get("timings", {})
    stages = ", ".join(f"{k} {v:.1f} s" for k, v in timings.items() if k in ("encode", "quantize", "decode"))
    images = s.service_classes * s.service_per_class
    backend = manifest.get("metrics", {}).get("kmeans_backend", "?")
    c.add("service", f"oq via distill api + distill worker --ray-address local, {s.service_classes} classes x "
          f"{s.service_per_class} JPEGs at {px} px, SD-VAE (random), ipc {s.service_ipc} (data prep {prep_s:.0f} s)",
          f"succeeded, {images / wall:.1f} img/s end to end; {stages}; k-means {backend}; archive verified", wall,
          s.service_ipc)


def section_pixel(c: Context) -> None:
    from distill.runner import RunRequest, run_to_archive

    s, device = c.sizes, c.device
    for method in PIXEL_METHODS:
        params = dict(s.pixel_params[method])
        if method in COMPILED_METHODS:
            params["compile_real"] = "on" if s.pixel_compile else "off"
        if not c.enough("pixel", method, 10.0):
            continue
        start = time.perf_counter()
        try:
            with measured(device) as m:
                run_to_archive(RunRequest("mnist", method, 1, params, seed=0, max_per_class=s.pixel_max_per_class,
                                          device=str(device)), c.work / f"pixel-{method}.tar")
        except SectionTimeout:
            raise
        except Exception as exc:
            traceback.print_exc(file=sys.stderr)
            c.add("pixel", f"{method} {params}", f"{type(exc).__name__}: {str(exc)[:150]}",
                  time.perf_counter() - start, status="error")
            continue
        c.add("pixel", f"{method}, MNIST ipc 1 (max {s.pixel_max_per_class}/class), {params}",
              f"ran on {device}", m["seconds"], params.get("batch_real", ""), "auto precision", m["peak_gib"])


def section_dc_mnist(c: Context) -> None:
    from distill.data import get_dataset
    from distill.evaluate import EvalConfig, evaluate_distilled
    from distill.runner import RunRequest, run_to_archive

    s, device = c.sizes, c.device
    start = time.perf_counter()
    # reference-exact arithmetic for a comparison with the paper: fp32 real side, no compile, fp32 students
    params = {"iterations": s.dc_iterations, "real_precision": "fp32", "compile_real": "off", **s.dc_params}
    result = run_to_archive(RunRequest("mnist", "dc", 1, params, seed=0, max_per_class=s.dc_max_per_class,
                                       device=str(device)), c.work / "dc-mnist.tar")
    distill_s = time.perf_counter() - start
    config = EvalConfig(runs=s.dc_runs, epochs=s.dc_epochs, test_limit=s.dc_test_limit, device=str(device),
                        precision="fp32")
    evaluated = evaluate_distilled(result.distilled, get_dataset("mnist"), config)
    accuracies = list(evaluated.accuracies)  # percent
    mean = sum(accuracies) / len(accuracies)
    std = (sum((a - mean) ** 2 for a in accuracies) / len(accuracies)) ** 0.5
    c.add("dc-mnist", f"DC (fp32), MNIST ipc 1, {s.dc_iterations} iterations (shortened; the paper: 1000); eval "
          f"{s.dc_runs} x {s.dc_epochs} epochs (distill {distill_s:.0f} s, eval {evaluated.wall_seconds:.0f} s)",
          f"{mean:.2f} ± {std:.2f} % (paper, full length: 91.7 ± 0.5)", time.perf_counter() - start, 1, "float32",
          key="dc_mnist_distill_s_per_iteration", value=distill_s / max(1, s.dc_iterations), unit="s/iteration")


BODIES: dict[str, Callable[[Context], None]] = {
    "encode": section_encode, "dit": section_dit, "vae-decode": section_vae_decode, "kmeans": section_kmeans,
    "resnet18": section_resnet18, "refine": section_refine, "teacher": section_teacher, "pixel": section_pixel,
    "dc-mnist": section_dc_mnist,
    "service": section_service,
}


# ---------------------------------------------------------------------------------------------- main
def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--cpu-smoke", action="store_true", help="tiny sizes on the CPU (the test suite runs this)")
    parser.add_argument("--sections", default=",".join(SECTIONS), help="comma-separated subset, run in this order")
    parser.add_argument("--budget-s", type=float, default=None,
                        help="total time budget in seconds; the check exits within it (default 480; smoke 900)")
    parser.add_argument("--device", default=None, help="default: cuda when available (cpu with --cpu-smoke)")
    parser.add_argument("--out", type=Path, default=None,
                        help="folder for rows.jsonl (appended as measured) and table.md (rewritten per row)")
    parser.add_argument("--keep", action="store_true", help="keep the temporary folder")
    return parser.parse_args(argv)


def header_for(device: Any, cpu_smoke: bool, budget_s: float) -> str:
    import torch

    if device.type == "cuda":
        head = (f"GPU check: {torch.cuda.get_device_name(device)}, torch {torch.__version__}, "
                f"CUDA {torch.version.cuda}")
    else:
        head = f"GPU check on the CPU ({'smoke sizes' if cpu_smoke else 'full sizes'}), torch {torch.__version__}"
    return head + f", {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, budget {budget_s:.0f} s"


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    sizes = SMOKE if args.cpu_smoke else FULL
    wanted = [name.strip() for name in args.sections.split(",") if name.strip()]
    unknown = set(wanted) - set(SECTIONS)
    if unknown:
        print(f"error: unknown section(s) {', '.join(sorted(unknown))}; known: {', '.join(SECTIONS)}", file=sys.stderr)
        return 2
    if args.budget_s is not None and args.budget_s <= 0:
        print("error: --budget-s must be positive", file=sys.stderr)
        return 2
    table = Table(args.budget_s if args.budget_s is not None else sizes.budget_s)
    if args.out is not None:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "rows.jsonl").write_text("")
        table.out = args.out
    work = Path(tempfile.mkdtemp(prefix="gpu-check-"))
    os.environ["DISTILL_HOME"] = str(work / "home")  # caches, teachers, experts: never the operator's
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    import torch

    from distill.config import reload_settings

    reload_settings()
    device = torch.device(args.device or ("cpu" if args.cpu_smoke else "cuda" if torch.cuda.is_available() else "cpu"))
    table.header = header_for(device, args.cpu_smoke, table.budget_s)
    context = Context(table, sizes, device, work)
    try:
        for name in wanted:
            body = BODIES[name]
            table.guarded(name, sizes.limit_s or LIMITS[name], lambda body=body: body(context))  # type: ignore[misc]
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
    table.header += f", total {time.perf_counter() - table.started:.0f} s"
    print(table.markdown())
    if args.out is not None:
        (args.out / "table.md").write_text(table.markdown() + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
