"""One prepared GPU check: every GPU-relevant rate of the product in one markdown table.

    python bench/gpu_check.py                 # on one H100/H200: <= 10 minutes (global --budget-s 540)
    python bench/gpu_check.py --cpu-smoke     # the same code at tiny sizes on the CPU (part of the test suite)

Sections (each guarded: a failure or an exhausted time budget is a row in the table, never a crash):

1. ``encode``: an SD-VAE-shaped diffusers ``AutoencoderKL`` (random weights) at 256 px, fed by the real input
   pipeline (``imagefolder:`` dataset -> ``Split.load`` JPEG decode -> :mod:`quantize.latent_cache` shards).
   Rows: JPEG loading alone, the encoder alone on preloaded images, and the two together through the cache.
2. ``dit``: DiT-XL/2-shaped ``DiTTransformer2DModel`` (random weights) decoding through
   :func:`quantize.diffusion.decode_with_prior` (bf16 on CUDA, classifier-free guidance 4, strength 0.7 of 50
   steps as ``oq``'s default) at batch 64 / 128 / 256.
3. ``kmeans``: 1300 x 4096 per class (ImageNet class size, SD-VAE 4x32x32 latents), K = 10 / 50 / 100:
   FAISS GPU, FAISS CPU, the torch Lloyd on the device, MiniBatchKMeans: seconds and squared W2 (the k-means
   error) relative to FAISS CPU.
4. ``service``: an ``oq`` job on a synthetic ImageNet-shaped JPEG set (100 classes) submitted over HTTP to
   ``distill api`` and run by ``distill worker --ray-address local`` (Ray on this host's GPUs).
5. ``pixel``: every pixel method for a few iterations on the device (MNIST, IPC 1).
6. ``dc-mnist``: DC on MNIST at IPC 1 with the paper's budget (1000 iterations), evaluated 5 x 1000 epochs,
   against the paper's 91.7 +- 0.5.

Needs DISTILL_DATA_DIR with mnist/ for sections 5 and 6. Writes only under a temporary folder (its own
DISTILL_HOME), removed at the end unless --keep.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
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
PIXEL_METHODS = ("dd", "dc", "dsa", "dm", "mtt", "datm", "dq")


@dataclass(frozen=True)
class Sizes:
    """Everything that differs between the real check and the CPU smoke run."""

    encode_images: int
    encode_px: int
    encode_batch: int
    vae: dict[str, Any]
    dit: dict[str, Any]
    dit_batches: tuple[int, ...]
    dit_steps: int
    kmeans_n: int
    kmeans_d: int
    kmeans_ks: tuple[int, ...]
    service_classes: int
    service_per_class: int
    service_px: int
    service_ipc: int
    service_gpus: int
    pixel_max_per_class: int
    pixel_params: dict[str, dict[str, Any]]
    dc_iterations: int
    dc_params: dict[str, Any]
    dc_max_per_class: int | None
    dc_runs: int
    dc_epochs: int
    dc_test_limit: int | None
    budget_s: float


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

FULL = Sizes(encode_images=2048, encode_px=256, encode_batch=128, vae=SD_VAE, dit=DIT_XL2,
             dit_batches=(64, 128, 256), dit_steps=50, kmeans_n=1300, kmeans_d=4096, kmeans_ks=(10, 50, 100),
             service_classes=100, service_per_class=40, service_px=256, service_ipc=10, service_gpus=0,
             pixel_max_per_class=500, pixel_params=FEW, dc_iterations=1000, dc_params={}, dc_max_per_class=None,
             dc_runs=5, dc_epochs=1000, dc_test_limit=None, budget_s=540.0)
SMOKE = Sizes(encode_images=12, encode_px=32, encode_batch=4, vae=TINY_VAE, dit=TINY_DIT, dit_batches=(2, 4),
              dit_steps=2, kmeans_n=60, kmeans_d=32, kmeans_ks=(2, 4), service_classes=3, service_per_class=4,
              service_px=32, service_ipc=2, service_gpus=1, pixel_max_per_class=10, pixel_params=TINY_FEW,
              dc_iterations=2, dc_params={"batch_real": 16}, dc_max_per_class=10, dc_runs=1, dc_epochs=2,
              dc_test_limit=100, budget_s=600.0)


# -------------------------------------------------------------------------------------------- the table
@dataclass
class Table:
    budget_s: float
    rows: list[tuple[str, str, str, str, str]] = field(default_factory=list)
    started: float = field(default_factory=time.perf_counter)

    def left(self) -> float:
        return self.budget_s - (time.perf_counter() - self.started)

    def add(self, section: str, setting: str, result: str, seconds: float | None, status: str = "ok") -> None:
        self.rows.append((section, setting, result, "" if seconds is None else f"{seconds:.2f}", status))
        print(f"[gpu_check] {section} | {setting} | {result} | {status}", file=sys.stderr, flush=True)

    def guarded(self, section: str, need_s: float, fn: Callable[[], None]) -> None:
        """Run one section; an exception or a missing time budget becomes a row."""
        if self.left() < need_s:
            self.add(section, "-", f"skipped: {self.left():.0f} s of the budget left, needs ~{need_s:.0f}", None,
                     "skipped")
            return
        start = time.perf_counter()
        try:
            fn()
        except Exception as exc:  # one section's failure must not hide the others
            traceback.print_exc(file=sys.stderr)
            message = " ".join(f"{type(exc).__name__}: {exc}".split())[:200]  # one line in the table
            self.add(section, "-", message.replace("|", "/"), time.perf_counter() - start, "error")

    def markdown(self, header: str) -> str:
        lines = [header, "", "| section | setting | result | seconds | status |", "|---|---|---|---:|---|"]
        lines += [f"| {' | '.join(row)} |" for row in self.rows]
        return "\n".join(lines)


def sync(device: Any) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize()


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

    torch.manual_seed(seed)
    AutoencoderKL(**config).save_pretrained(folder)
    return folder


# ------------------------------------------------------------------------------------------- sections
def section_encode(table: Table, sizes: Sizes, device: Any, work: Path) -> None:
    import numpy as np
    import torch

    from distill.data import get_dataset
    from quantize.encoders import load_encoder
    from quantize.latent_cache import latents_for_dataset

    per_class = max(1, sizes.encode_images // 8)
    root = write_jpegs(work / "encode-jpegs", 8, per_class, sizes.encode_px + sizes.encode_px // 8, wnids=False)
    vae_dir = save_random_vae(work / "sd-vae-random", sizes.vae)
    name = f"imagefolder:{root}"
    split = get_dataset(name).train
    n = len(split)
    encoder = load_encoder(str(vae_dir), image_size=sizes.encode_px, resolution=sizes.encode_px, device=device,
                           batch_size=sizes.encode_batch)
    setting = f"{n} JPEGs -> {sizes.encode_px} px, batch {sizes.encode_batch}, {encoder.dtype}".replace("torch.", "")

    start = time.perf_counter()
    images = torch.cat([split.load(chunk) for chunk in np.array_split(np.arange(n), max(1, n // 64))])
    load_s = time.perf_counter() - start
    table.add("encode", f"JPEG decode + resize ({setting.split(',')[0]}), 1 process", f"{n / load_s:.0f} img/s", load_s)

    encoder.encode(images[: sizes.encode_batch].float() / 255.0)  # warm-up (cuDNN autotune, allocator)
    sync(device)
    start = time.perf_counter()
    encoder.encode(images.float() / 255.0)
    sync(device)
    enc_s = time.perf_counter() - start
    table.add("encode", f"SD-VAE encoder alone, {setting}", f"{n / enc_s:.0f} img/s", enc_s)

    start = time.perf_counter()
    store = latents_for_dataset(name, str(vae_dir), resolution=sizes.encode_px, device=str(device),
                                batch_size=sizes.encode_batch)
    sync(device)
    both_s = time.perf_counter() - start
    table.add("encode", f"latent cache end to end, {setting}", f"{n / both_s:.0f} img/s "
              f"(latents {tuple(store.latent_shape)})", both_s)


def section_dit(table: Table, sizes: Sizes, device: Any) -> None:
    import torch
    from diffusers import DDPMScheduler, DiTTransformer2DModel

    from quantize.diffusion import LatentPrior, decode_with_prior, model_dtype

    torch.manual_seed(0)
    dtype = model_dtype(device)
    model = DiTTransformer2DModel(**sizes.dit).to(device, dtype).eval().requires_grad_(False)
    params = sum(p.numel() for p in model.parameters()) / 1e6
    channels, side = sizes.dit["in_channels"], sizes.dit["sample_size"]
    prior = LatentPrior(model, dict(DDPMScheduler().config), sizes.dit["num_embeds_ada_norm"],
                        torch.zeros(channels), torch.ones(channels))
    decode_with_prior(torch.randn(2, channels, side, side), torch.zeros(2, dtype=torch.long), prior, strength=1.0,
                      steps=1, device=device, batch_size=2)  # warm-up
    for batch in sizes.dit_batches:
        latents = torch.randn(batch, channels, side, side)
        labels = torch.arange(batch) % sizes.dit["num_embeds_ada_norm"]
        sync(device)
        start = time.perf_counter()
        decode_with_prior(latents, labels, prior, strength=0.7, steps=sizes.dit_steps, guidance=4.0, device=device,
                          batch_size=batch)
        sync(device)
        seconds = time.perf_counter() - start
        steps_run = round(0.7 * sizes.dit_steps)
        table.add("dit", f"DiT ({params:.0f} M params, {str(dtype).replace('torch.', '')}), batch {batch}, "
                  f"cfg 4, {steps_run} of {sizes.dit_steps} steps",
                  f"{batch / seconds:.1f} img/s ({1000 * seconds / max(1, steps_run):.0f} ms/step)", seconds)
        del latents
    del model, prior
    if device.type == "cuda":
        torch.cuda.empty_cache()


def section_kmeans(table: Table, sizes: Sizes, device: Any) -> None:
    import numpy as np

    from quantize.kmeans import faiss_has_gpu, kmeans

    rng = np.random.default_rng(0)
    # a class-like cloud: 20 modes with spread, in 4096 dims (SD-VAE 4 x 32 x 32 latents)
    modes = rng.standard_normal((20, sizes.kmeans_d)).astype(np.float32) * 2.0
    x = (modes[rng.integers(0, 20, sizes.kmeans_n)] + rng.standard_normal((sizes.kmeans_n, sizes.kmeans_d))
         ).astype(np.float32)
    variants: list[tuple[str, dict[str, Any]]] = [("faiss CPU", {"backend": "faiss", "gpu": False})]
    if faiss_has_gpu():
        variants.insert(0, ("faiss GPU", {"backend": "faiss", "gpu": True}))
    variants += [(f"torch Lloyd ({device.type})", {"backend": "torch", "device": str(device)}),
                 ("MiniBatchKMeans", {"backend": "sklearn-minibatch", "iterations": 100})]
    if not faiss_has_gpu():
        table.add("kmeans", "faiss GPU", "not available (faiss without GPU support or no GPU)", None, "skipped")
    kmeans(x, sizes.kmeans_ks[0], seed=0, **variants[0][1])  # warm-up (GPU resources, BLAS)
    for k in sizes.kmeans_ks:
        reference = None
        for label, kwargs in sorted(variants, key=lambda v: v[0] != "faiss CPU"):
            result = kmeans(x, k, seed=0, **kwargs)
            if reference is None:
                reference = result.error
            table.add("kmeans", f"{label}, {sizes.kmeans_n} x {sizes.kmeans_d}, K = {k}",
                      f"W2² {result.error:.2f} ({100 * (result.error / reference - 1):+.2f} % vs faiss CPU)",
                      result.seconds)


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


def section_service(table: Table, sizes: Sizes, device: Any, work: Path) -> None:
    import httpx

    start = time.perf_counter()
    root = write_jpegs(work / "synthetic-imagenet", sizes.service_classes, sizes.service_per_class,
                       sizes.service_px)
    vae_dir = save_random_vae(work / "sd-vae-service", sizes.vae)
    prep_s = time.perf_counter() - start
    px = 224 if sizes.service_px >= 224 else sizes.service_px
    env = {**os.environ, "DISTILL_HOME": str(work / "service-home"),
           "DISTILL_DATABASE_URL": f"sqlite:///{work / 'service.sqlite3'}",
           "GPU_CHECK_SYNTHETIC_ROOT": str(root), "GPU_CHECK_SYNTHETIC_CLASSES": str(sizes.service_classes),
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
    if sizes.service_gpus:
        worker_cmd += ["--ray-num-gpus", str(sizes.service_gpus)]
    request = {"dataset": SYNTHETIC, "method": "oq", "ipc": sizes.service_ipc, "seed": 0,
               "params": {"encoder": "gpu-check-vae", "resolution": sizes.service_px, "w2_uniform": False,
                          "refine_iterations": 0,  # the same job at smoke (32 px, auto = 200) and full size
                          "batch_size": 64 if sizes.service_px >= 224 else 4}}
    with process(api_cmd, env, work / "api.log") as api, process(worker_cmd, env, work / "worker.log") as worker:
        base = f"http://127.0.0.1:{port}"
        with httpx.Client(base_url=base, timeout=30) as client:
            deadline = time.perf_counter() + 120
            while True:
                if api.poll() is not None:
                    raise RuntimeError(f"distill api exited: {(work / 'api.log').read_text()[-300:]}")
                with contextlib.suppress(httpx.TransportError):
                    if client.get("/healthz").status_code == 200:
                        break
                if time.perf_counter() > deadline:
                    raise TimeoutError("distill api did not come up")
                time.sleep(0.2)
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
                if table.left() < 5:
                    client.post(f"/jobs/{job_id}/cancel")
                    raise TimeoutError(f"the job was still {job['status']} at {job.get('stage')} when the budget ran out")
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
    images = sizes.service_classes * sizes.service_per_class
    table.add("service", f"oq via distill api + distill worker --ray-address local, {sizes.service_classes} classes x "
              f"{sizes.service_per_class} JPEGs at {px} px, SD-VAE (random), ipc {sizes.service_ipc} (data prep "
              f"{prep_s:.0f} s)", f"succeeded, {images / wall:.1f} img/s end to end; {stages}; archive verified", wall)


def section_pixel(table: Table, sizes: Sizes, device: Any, work: Path) -> None:
    from distill.runner import RunRequest, run_to_archive

    for method in PIXEL_METHODS:
        if table.left() < 10:
            table.add("pixel", method, "skipped: budget", None, "skipped")
            continue
        params = sizes.pixel_params[method]
        start = time.perf_counter()
        try:
            run_to_archive(RunRequest("mnist", method, 1, dict(params), seed=0, max_per_class=sizes.pixel_max_per_class,
                                      device=str(device)), work / f"pixel-{method}.tar")
        except Exception as exc:
            traceback.print_exc(file=sys.stderr)
            table.add("pixel", f"{method} {params}", f"{type(exc).__name__}: {str(exc)[:150]}",
                      time.perf_counter() - start, "error")
            continue
        table.add("pixel", f"{method}, MNIST ipc 1 (max {sizes.pixel_max_per_class}/class), {params}",
                  "ran on " + str(device), time.perf_counter() - start)


def section_dc_mnist(table: Table, sizes: Sizes, device: Any, work: Path) -> None:
    from distill.data import get_dataset
    from distill.evaluate import EvalConfig, evaluate_distilled
    from distill.runner import RunRequest, run_to_archive

    start = time.perf_counter()
    # reference-exact arithmetic for a comparison with the paper: fp32 real side and fp32 students
    params = {"iterations": sizes.dc_iterations, "real_precision": "fp32", **sizes.dc_params}
    result = run_to_archive(RunRequest("mnist", "dc", 1, params,
                                       seed=0, max_per_class=sizes.dc_max_per_class, device=str(device)),
                            work / "dc-mnist.tar")
    distill_s = time.perf_counter() - start
    config = EvalConfig(runs=sizes.dc_runs, epochs=sizes.dc_epochs, test_limit=sizes.dc_test_limit,
                        device=str(device), precision="fp32")
    evaluated = evaluate_distilled(result.distilled, get_dataset("mnist"), config)
    accuracies = list(evaluated.accuracies)  # percent
    mean = sum(accuracies) / len(accuracies)
    std = (sum((a - mean) ** 2 for a in accuracies) / len(accuracies)) ** 0.5
    table.add("dc-mnist", f"DC (fp32), MNIST ipc 1, {sizes.dc_iterations} iterations; eval {sizes.dc_runs} x "
              f"{sizes.dc_epochs} epochs (distill {distill_s:.0f} s, eval {evaluated.wall_seconds:.0f} s)",
              f"{mean:.2f} ± {std:.2f} % (paper: 91.7 ± 0.5)", time.perf_counter() - start)


# ---------------------------------------------------------------------------------------------- main
SECTIONS = ("encode", "dit", "kmeans", "service", "pixel", "dc-mnist")
# rough wall seconds each section needs on one H100 (for the budget check before it starts)
NEEDS = {"encode": 30, "dit": 60, "kmeans": 30, "service": 90, "pixel": 60, "dc-mnist": 150}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cpu-smoke", action="store_true", help="tiny sizes on the CPU (the test suite runs this)")
    parser.add_argument("--sections", default=",".join(SECTIONS), help="comma-separated subset")
    parser.add_argument("--budget-s", type=float, default=None, help="global time budget (default 540 s)")
    parser.add_argument("--device", default=None, help="default: cuda when available (cpu with --cpu-smoke)")
    parser.add_argument("--keep", action="store_true", help="keep the temporary folder")
    parser.add_argument("--json", type=Path, default=None, help="also write the rows as JSON here")
    args = parser.parse_args(argv)
    sizes = SMOKE if args.cpu_smoke else FULL
    wanted = [s.strip() for s in args.sections.split(",") if s.strip()]
    unknown = set(wanted) - set(SECTIONS)
    if unknown:
        print(f"error: unknown section(s) {', '.join(sorted(unknown))}; known: {', '.join(SECTIONS)}", file=sys.stderr)
        return 2

    work = Path(tempfile.mkdtemp(prefix="gpu-check-"))
    os.environ["DISTILL_HOME"] = str(work / "home")  # caches, teachers, experts: never the operator's
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    import torch

    from distill.config import reload_settings

    reload_settings()
    device = torch.device(args.device or ("cpu" if args.cpu_smoke else "cuda" if torch.cuda.is_available() else "cpu"))
    table = Table(args.budget_s if args.budget_s is not None else sizes.budget_s)
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        header = f"GPU check: {name}, torch {torch.__version__}, CUDA {torch.version.cuda}"
    else:
        header = f"GPU check on the CPU ({'smoke sizes' if args.cpu_smoke else 'full sizes'}), torch {torch.__version__}"
    header += f", {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, budget {table.budget_s:.0f} s"
    bodies: dict[str, Callable[[], None]] = {
        "encode": lambda: section_encode(table, sizes, device, work),
        "dit": lambda: section_dit(table, sizes, device),
        "kmeans": lambda: section_kmeans(table, sizes, device),
        "service": lambda: section_service(table, sizes, device, work),
        "pixel": lambda: section_pixel(table, sizes, device, work),
        "dc-mnist": lambda: section_dc_mnist(table, sizes, device, work),
    }
    try:
        for name in wanted:
            table.guarded(name, 0 if args.cpu_smoke else NEEDS[name], bodies[name])
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
    total = time.perf_counter() - table.started
    print(table.markdown(header + f", total {total:.0f} s"))
    if args.json:
        args.json.write_text(json.dumps({"header": header, "total_s": total, "rows": table.rows}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
