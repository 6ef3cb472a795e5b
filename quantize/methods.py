"""``oq`` (DDOQ-style latent optimal quantization) and ``d4m`` (D4M's unweighted prototypes).

Both compose the same stages, each checkpointed for resume:

1. ``encode``: the run's training split -> latents, through the shared on-disk cache (:mod:`quantize.latent_cache`).
2. ``quantize``: per class, K = IPC centroids (:func:`quantize.kmeans.kmeans`), their Voronoi masses and the
   squared W2 errors (weighted = with the masses, uniform = with weights 1/K). Classes fan out through
   ``ctx.executor.map`` when an executor is present.
3. ``decode``: centroids -> images, with the VAE decoder (``decode=vae``), through a class-conditional latent
   DiT prior (``decode=diffusion``, :func:`quantize.diffusion.decode_with_prior`) or, for ``d4m``, D4M's Stable
   Diffusion img2img (``decode=sd-img2img``, needs an SD-v1.5 directory and ``encoder=sd-vae``: GPU hosts).
   Images are resized back to the dataset's resolution and channels. ``oq``'s default instead takes each
   cell's W2-best member (``decode=nearest``: the training image whose latent is nearest the centroid;
   replacing the centroid by a point m of its cell costs n_k * |c_k - m|^2 of transport, least for that
   member), quantizing each image's latent grid standardised per channel (``latent_norm=instance``).
   Defaults per host (docs/BENCHMARKS.md, section 1): no pretrained decoder, or only a
   self-trained prior -> ``nearest`` (real images beat the VAE's blurry decoded averages on CIFAR-10 and
   Fashion-MNIST, and the small CPU-trained prior lowered accuracy); a pretrained diffusion decoder (GPU host)
   -> ``decode=diffusion prior=PATH``, DDOQ's own setting (not measured here).
4. ``refine`` (``refine_iterations``; ``oq``'s default ``auto`` = 200 up to 64 px without a diffusion decode): a
   short DM run from the decoded set (:func:`refine_with_dm`), the measured winner on such hosts. It matches the
   class mean as DM does (``refine_match=class``); matching each image to its own cell's mean (``cell``) or the
   mass-weighted mean (``mass``) measured worse on Imagenette (docs/BENCHMARKS.md).

``oq`` returns the per-class normalised cluster masses as image weights (DDOQ), to the power ``weight_power``
(``auto``: 1, or 0.5 on a class-refined set, whose images no longer stand for their cells alone); ``d4m`` returns
none.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, ClassVar, Literal

import numpy as np
import torch
from pydantic import Field, model_validator

from distill.data.registry import as_pixels
from distill.errors import DistillError
from distill.methods.base import DistilledSet, Method, MethodParams, ModelName, NetworkName, RunContext
from quantize.encoders import RESOLUTION_POLICY

if TYPE_CHECKING:
    from pixelspace.dm import CellTargets

KMeansBackend = Literal["auto", "faiss", "sklearn-minibatch", "sklearn-partial-fit", "sklearn", "torch"]
RefineIterations = Annotated[int, Field(ge=0, le=100_000)] | Literal["auto"]

# refine_iterations=auto: where the refinement was measured to win (docs/BENCHMARKS.md: the CIFAR-10,
# Fashion-MNIST and Imagenette tables, oq with refine_iterations 0 and 200).
REFINE_AUTO_ITERATIONS = 200
REFINE_AUTO_MAX_PX = 64
# A teacher-labelled set (labels=teacher) is refined only from this IPC: under a teacher's labels (protocol
# softlabel) the DM-matched images lost to their cells' real images at IPC 1 and 3, tied with them at IPC 5 and
# won from IPC 10 (docs/BENCHMARKS.md, Imagenette soft labels).
REFINE_AUTO_MIN_IPC_TEACHER = 10
REFINE_AUTO_HELP = (
    f"{REFINE_AUTO_ITERATIONS} on images up to {REFINE_AUTO_MAX_PX} px unless the decode is a diffusion model "
    f"or labels=teacher below IPC {REFINE_AUTO_MIN_IPC_TEACHER} "
    "(there it was measured to beat the plain quantizer and herding: docs/BENCHMARKS.md), else 0 (a diffusion "
    "decode is DDOQ's own setting, not measured with the refinement; at 128 px it helped ConvNet students but not "
    "ResNet-18, and each iteration reads refine_batch_real real images per class, so its cost grows with pixels "
    "times classes: far more than the rest of the job at ImageNet scale, see docs/BENCHMARKS.md)")
REFINE_HELP = ("pixel-space refinement of the decoded set: this many DM iterations (distribution matching in random "
               "ConvNet features, the `dm` method's defaults), cell masses kept as weights (see weight_power); 0 = off; "
               "auto = "
               + REFINE_AUTO_HELP)
WeightPower = Annotated[float, Field(gt=0.0)] | Literal["auto"]
# weight_power=auto: the refinement (DM's uniform class mean) moves images off their cells' centres, and the raw
# masses then cost accuracy (docs/BENCHMARKS.md, Imagenette: the same refined set under powers 1, 0.5 and 0).
REFINED_WEIGHT_POWER = 0.5
WEIGHT_POWER_HELP = ("weights proportional to mass**power (1 = DDOQ's masses, 0.5 = the square-root variance-reduction "
                     f"variant); auto = {REFINED_WEIGHT_POWER} on a refined set (refine_match=class, which moves the "
                     "images off their cells' centres), else 1")
RefineMatch = Literal["class", "mass", "cell", "class+cell"]
REFINE_MATCH_HELP = ("what the refinement matches: class (DM: the class's mean embedding), mass (the class's mean, the "
                     "synthetic side weighted by the cell masses as the student's loss weighs it), cell (each image the "
                     "mean embedding of its own k-means cell's real images, weighted by the cell's mass) or class+cell "
                     "(both terms)")
# refine_batch_real=auto: from 64 px, 64 real images per class per iteration matched 256 (Imagenette at 64 px, IPC 10
# from 500 per class: 46.40 vs 46.30) at 2.3x less refinement time; below, DM's 256, with which the 28-32 px
# figures were measured and whose real pass costs little there (docs/BENCHMARKS.md).
REFINE_BATCH_AUTO_SMALL, REFINE_BATCH_AUTO_LARGE, REFINE_BATCH_AUTO_FROM_PX = 256, 64, 64
RefineBatchReal = Annotated[int, Field(ge=1, le=100_000)] | Literal["auto"]
REFINE_BATCH_HELP = ("real images per class each refinement iteration reads (DM's batch_real; at low IPC their forward "
                     "pass is most of an iteration's cost, at IPC 50 the synthetic images' pass is); auto = "
                     f"{REFINE_BATCH_AUTO_LARGE} from {REFINE_BATCH_AUTO_FROM_PX} px (measured to match "
                     f"{REFINE_BATCH_AUTO_SMALL} there at less than half the time), else {REFINE_BATCH_AUTO_SMALL}")


class LatentParams(MethodParams):
    """What every latent method takes; the stages below read only these (each method narrows the last four)."""


    encoder: ModelName = Field("taef2", description="taef2 (shared weights), sd-vae (weights_dir/sd-vae) or a model "
                                                    "registered on the server (GET /models); from the CLI also an "
                                                    "autoencoder directory or a hub id")
    resolution: int | None = Field(None, ge=8, description="encode resolution in px (multiple of 8); default: "
                                                           + RESOLUTION_POLICY)
    prior: ModelName | None = Field(None, description="a diffusers DiT registered on the server (GET /models; from the "
                                                      "CLI also a directory, e.g. from `distill prior train`); "
                                                      "required with decode=diffusion")
    strength: float = Field(0.7, ge=0.0, le=1.0, description="img2img noise strength of the diffusion decode "
                                                             "(D4M: 0.7; 0 = plain VAE decode)")
    steps: int = Field(50, ge=1, description="diffusion inference steps (about strength*steps are run)")
    refine_iterations: RefineIterations = Field(0, description=REFINE_HELP)
    refine_match: RefineMatch = Field("class", description=REFINE_MATCH_HELP)
    refine_batch_real: RefineBatchReal = Field("auto", description=REFINE_BATCH_HELP)
    scheduler: Literal["ddim", "dpm"] = Field("ddim", description="diffusion sampler")
    restarts: int = Field(1, ge=1, description="k-means restarts (k-means++ seeded), the best inertia is kept")
    labels: Literal["hard", "teacher"] = Field("hard", description="hard labels, or teacher logits stored as "
                                                                   "soft labels (teacher trained once and cached)")
    teacher_model: NetworkName = Field("convnet", description="teacher network for labels=teacher")
    teacher_epochs: int = Field(15, ge=1, description="teacher training epochs (full train split)")
    teacher_max_per_class: int | None = Field(None, ge=1, description="cap the teacher's training images per class")
    batch_size: int = Field(64, ge=1, description="encode/decode batch size")
    w2_uniform: bool = Field(True, description="also measure the squared W2 to the uniformly weighted centroids "
                                               "(an OT solve per class)")
    # Declared here for the shared stages; each method redeclares them with its own choices, defaults and help.
    decode: str = "vae"
    guidance: float = 4.0
    kmeans_backend: KMeansBackend = "auto"
    iterations: int = 25

    @property
    def kmeans_expand(self) -> int:
        """partial_fit chunk = kmeans_expand x IPC latents (D4M's km_expand; 1 for a method without it)."""
        return 1


class LatentOQParams(LatentParams):
    decode: Literal["vae", "diffusion", "nearest"] = Field(
        "nearest", description="nearest (default; hosts without a pretrained diffusion decoder, and with a self-"
                               "trained prior): each cell's W2-best member, the real training image nearest the "
                               "centroid, masses kept; diffusion (hosts with a pretrained decoder, prior=PATH): "
                               "through the latent diffusion prior; vae: the VAE decoder (blurry averages)")
    guidance: float = Field(4.0, ge=0.0, description="classifier-free guidance scale (DiT's 4.0)")
    kmeans_backend: KMeansBackend = Field("auto", description="auto (faiss when installed, else torch; the "
                                                              "manifest records which ran), faiss (exact Lloyd, "
                                                              "k-means++ init), torch (the same Lloyd on the "
                                                              "task's device), "
                                                               "sklearn-minibatch, sklearn-partial-fit (D4M) or "
                                                               "sklearn (Lloyd)")
    iterations: int = Field(25, ge=0, description="k-means iterations (faiss/sklearn Lloyd; epochs for "
                                                   "sklearn-minibatch; passes for sklearn-partial-fit)")
    latent_norm: Literal["none", "instance"] = Field(
        "instance", description="instance (default; better on CIFAR-10 and Fashion-MNIST, docs/BENCHMARKS.md): quantize "
                                "each image's latent grid standardised per channel, cells blind to offset and gain "
                                "(mostly brightness / contrast / colour cast; W2 figures are then in that space); "
                                "none: the latents as they are")
    refine_iterations: RefineIterations = Field("auto", description=REFINE_HELP)
    weighted: bool = Field(True, description="store the cluster masses as per-image weights (DDOQ)")
    weight_power: WeightPower = Field("auto", description=WEIGHT_POWER_HELP)

    @model_validator(mode="after")
    def _need_prior(self) -> LatentOQParams:
        if self.decode == "diffusion" and not self.prior:
            raise ValueError("decode=diffusion needs prior=PATH (a diffusers DiT directory)")
        return self


class D4MParams(LatentParams):
    decode: Literal["vae", "diffusion", "sd-img2img"] = Field(
        "vae", description="vae; diffusion (latent DiT prior); sd-img2img (D4M's SD-v1.5 img2img with class-name "
                           "prompts: set sd=PATH and encoder=sd-vae, GPU hosts)")
    sd: ModelName | None = Field(None, description="Stable Diffusion v1.5 pipeline registered on the server (GET "
                                                   "/models; from the CLI also a directory) for decode=sd-img2img")
    guidance: float = Field(8.0, ge=0.0, description="classifier-free guidance (D4M: 8)")
    kmeans_backend: KMeansBackend = Field("sklearn-partial-fit", description="D4M streams MiniBatchKMeans."
                                                                             "partial_fit; others for comparison")
    iterations: int = Field(1, ge=0, description="passes over the class stream (D4M: 1); k-means iterations for "
                                                 "the other backends")
    km_expand: int = Field(1, ge=1, description="D4M's partial_fit chunk = km_expand*IPC latents (its scripts: 1)")

    @property
    def kmeans_expand(self) -> int:
        return self.km_expand

    @model_validator(mode="after")
    def _need_models(self) -> D4MParams:
        if self.decode == "diffusion" and not self.prior:
            raise ValueError("decode=diffusion needs prior=PATH (a diffusers DiT directory)")
        if self.decode == "sd-img2img" and not self.sd:
            raise ValueError("decode=sd-img2img needs sd=PATH (a Stable Diffusion v1.5 pipeline directory)")
        return self


# ------------------------------------------------------------------------------------------- stages
def instance_standardise(flat: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``latent_norm=instance``: each image's latent grid (n x C x positions) standardised per channel, so the
    cells are blind to a channel's offset and gain -> (standardised, mean, std)."""
    mean, std = flat.mean(2, keepdim=True), flat.std(2, keepdim=True).clamp_min(1e-3)
    return (flat - mean) / std, mean, std


def _quantize_job(job: dict[str, Any]) -> dict[str, Any]:
    """One class: k-means on its cached latents (picklable entry point for ``executor.map``)."""
    from quantize.kmeans import kmeans, w2_uniform, w2_weighted
    from quantize.latent_cache import open_store

    store = open_store(job["folder"])
    if store is None:
        raise DistillError(f"latent cache {job['folder']} is incomplete")
    z = store.class_latents(job["label"])
    flat = z.flatten(2)  # n x C x positions
    if job.get("latent_norm") == "instance":
        flat, mean, std = instance_standardise(flat)
    x = flat.reshape(len(z), -1).numpy()
    result = kmeans(x, job["k"], iterations=job["iterations"], restarts=job["restarts"], seed=job["seed"],
                    backend=job["backend"], km_expand=job["km_expand"])
    members = cell_members(x, result.centroids, result.assignments)
    centroids = torch.from_numpy(result.centroids)
    if job.get("latent_norm") == "instance":  # back to latents: the cell's average offset and gain
        cells = torch.from_numpy(result.assignments)
        shape = (len(centroids), *flat.shape[1:])
        gain = torch.stack([std[cells == k].mean(0) if (cells == k).any() else std.mean(0) for k in range(len(centroids))])
        offset = torch.stack([mean[cells == k].mean(0) if (cells == k).any() else mean.mean(0)
                              for k in range(len(centroids))])
        centroids = (centroids.reshape(shape) * gain + offset).reshape(len(centroids), -1)
    out = {
        "label": job["label"], "centroids": centroids, "counts": result.counts.tolist(), "backend": result.backend,
        "w2_weighted": result.error, "seconds": result.seconds, "n": len(x),
        "members": store.class_indices(job["label"])[members].tolist(),
        "w2_members": w2_weighted(x, x[members]),
        "cells": result.assignments.tolist(),  # the cell of each row above (a cell-matched refinement reads them)
    }
    if job["w2_uniform"]:
        value, method = w2_uniform(x, result.centroids)
        out["w2_uniform"], out["w2_uniform_method"] = value, method
    return out


def cell_members(x: np.ndarray, centroids: np.ndarray, assignments: np.ndarray) -> np.ndarray:
    """Row of each cell's W2-best member: the member nearest its centroid (an empty cell: the nearest point)."""
    rows = np.empty(len(centroids), dtype=np.int64)
    for k, centroid in enumerate(centroids):
        cell = np.flatnonzero(assignments == k)
        if len(cell) == 0:
            cell = np.arange(len(x))
        rows[k] = cell[int(((x[cell] - centroid) ** 2).sum(1).argmin())]
    return rows


def quantize_classes(ctx: RunContext, store, params: LatentParams, *, seed_per_class: bool) -> dict[str, Any]:
    """Per-class k-means over the cache (``executor.map`` over classes when present)."""
    for c in range(ctx.num_classes):
        n = store.class_count(c)
        need = ctx.ipc * params.kmeans_expand if params.kmeans_backend == "sklearn-partial-fit" else ctx.ipc
        if n < need:
            raise DistillError(f"class {c} has {n} training images, fewer than the {need} that ipc {ctx.ipc} "
                               f"needs with kmeans_backend={params.kmeans_backend}")
    jobs = [{
        "folder": str(store.folder), "label": c, "k": ctx.ipc, "iterations": params.iterations,
        "restarts": params.restarts, "seed": ctx.seed * 1000 + c if seed_per_class else ctx.seed,
        "backend": params.kmeans_backend, "km_expand": params.kmeans_expand,
        "w2_uniform": params.w2_uniform, "latent_norm": getattr(params, "latent_norm", "none"),
    } for c in range(ctx.num_classes)]
    if ctx.executor is not None:  # CPU tasks (no GPU), streamed back with progress and cancellation
        finished = iter(range(1, len(jobs) + 1))
        with ctx.timed("quantize"):
            results = list(ctx.executor.map(
                _quantize_job, jobs, num_gpus=0, check_cancelled=ctx.check_cancelled,
                on_result=lambda _i, _r: ctx.progress("quantize", next(finished) / len(jobs))))
    else:  # ctx.track times the stage
        results = [_quantize_job(job) for job in ctx.track(jobs, "quantize", total=len(jobs), every=1)]
    results.sort(key=lambda r: r["label"])
    return {
        "centroids": torch.cat([r["centroids"] for r in results]).reshape(-1, *store.latent_shape),
        "labels": torch.repeat_interleave(torch.arange(ctx.num_classes), ctx.ipc),
        "counts": [r["counts"] for r in results],
        "class_sizes": [r["n"] for r in results],
        "w2_weighted": [r["w2_weighted"] for r in results],
        "w2_uniform": [r.get("w2_uniform") for r in results],
        "w2_uniform_method": sorted({r["w2_uniform_method"] for r in results if "w2_uniform_method" in r}),
        "kmeans_seconds": [r["seconds"] for r in results],
        # the backend(s) that ran (kmeans_backend=auto resolves per process: FAISS may exist on some hosts only)
        "kmeans_backends": sorted({r.get("backend", params.kmeans_backend) for r in results}),
        "members": [r["members"] for r in results],
        "w2_members": [r["w2_members"] for r in results],
        "cells": [r["cells"] for r in results],  # per class, in the cache's row order (class_indices)
        "cell_rows": [store.class_indices(r["label"]).tolist() for r in results],
    }


DECODE_BATCHES_PER_TASK = 4  # with an executor: one decode task per 4 batches (>= 1 model load per worker)


def decode_latents(ctx: RunContext, encoder, latents: torch.Tensor, labels: torch.Tensor,
                   params: LatentParams) -> torch.Tensor:
    """Centroid latents -> [0, 1] images at the dataset's channels and size.

    With an executor the chunks are decoded by GPU tasks (the job's driver holds no GPU); noise is seeded per
    batch index, so the images are those of a decode in one process.
    """
    with ctx.timed("decode"):
        if ctx.executor is None:
            images = decode_chunk(encoder, latents, labels, params, device=ctx.device, seed=ctx.seed,
                                  channels=ctx.dataset.channels, size=ctx.dataset.image_size,
                                  class_names=ctx.dataset.classes,
                                  progress=lambda f: ctx.progress("decode", 0.9 * f))
        else:
            from quantize.latent_cache import EncoderSpec

            spec = EncoderSpec(params.encoder, encoder.resolution, ctx.dataset.image_size, ctx.executor.device,
                               params.batch_size)
            step = params.batch_size * DECODE_BATCHES_PER_TASK
            jobs = [{"encoder": spec, "params": params, "latents": latents[i : i + step], "labels": labels[i : i + step],
                     "first_index": i, "seed": ctx.seed, "channels": ctx.dataset.channels,
                     "size": ctx.dataset.image_size, "class_names": list(ctx.dataset.classes)}
                    for i in range(0, len(latents), step)]
            finished = iter(range(1, len(jobs) + 1))
            images = torch.cat(ctx.executor.map(
                _decode_job, jobs, check_cancelled=ctx.check_cancelled,
                on_result=lambda _i, _r: ctx.progress("decode", 0.9 * next(finished) / len(jobs))))
        ctx.progress("decode", 1.0)
        return images


def _decode_job(job: dict[str, Any]) -> torch.Tensor:
    """One chunk of centroids decoded in this process (picklable entry point for ``executor.map``, one GPU)."""
    from quantize.encoders import resolve_task_device
    from quantize.latent_cache import _encoder

    spec = job["encoder"]
    return decode_chunk(_encoder(spec), job["latents"], job["labels"], job["params"],
                        device=resolve_task_device(spec.device),
                        seed=job["seed"], channels=job["channels"], size=job["size"],
                        class_names=job["class_names"], first_index=job["first_index"]).cpu()


def decode_chunk(encoder, latents: torch.Tensor, labels: torch.Tensor, params: LatentParams, *, device: torch.device,
                 seed: int, channels: int, size: int, class_names: list[str], first_index: int = 0,
                 progress=None) -> torch.Tensor:
    """Latents -> images: the diffusion prior or SD img2img first when asked, then the VAE decoder."""
    sampling: dict[str, Any] = {"strength": params.strength, "steps": params.steps, "guidance": params.guidance,
                                "seed": seed, "device": device, "progress": progress, "first_index": first_index,
                                "batch_size": params.batch_size}
    if params.decode == "diffusion":
        from quantize.diffusion import decode_with_prior

        assert params.prior is not None  # the params' validator requires it
        latents = decode_with_prior(latents, labels, Path(params.prior).expanduser(), scheduler=params.scheduler,
                                    **sampling)
    elif params.decode == "sd-img2img":
        from quantize.diffusion import decode_with_stable_diffusion

        assert isinstance(params, D4MParams) and params.sd is not None  # only D4M decodes so; its validator checks sd

        names = [class_names[int(c)] for c in labels]
        latents = decode_with_stable_diffusion(latents, names, Path(params.sd).expanduser(), **sampling)
    # kept as uint8 (what the PNGs hold anyway): the decode-stage checkpoint and the archive then need a quarter
    # of fp32's memory
    parts = [(encoder.decode(part.float(), channels=channels, size=size).clamp(0, 1) * 255).round().to(torch.uint8)
             for part in latents.split(max(1, params.batch_size))]
    return torch.cat(parts) if parts else torch.empty((0, channels, size, size), dtype=torch.uint8)


def teacher_logits(ctx: RunContext, images: torch.Tensor, params: LatentParams) -> torch.Tensor:
    """Logits of the evaluation teacher (``distill.evaluate.get_teacher``, trained once and cached).

    With an executor the teacher is trained (or loaded) and run by one GPU task: the driver holds no GPU.
    """
    job = {"dataset": ctx.dataset.name, "params": params, "images": images,
           "device": ctx.executor.device if ctx.executor is not None else str(ctx.device)}
    if ctx.executor is None:
        return _teacher_job(job, progress=lambda stage, f: ctx.progress("teacher", f), check_cancelled=ctx.check_cancelled)
    ctx.progress("teacher", 0.0)
    (logits,) = ctx.executor.map(_teacher_job, [job], check_cancelled=ctx.check_cancelled)
    return logits


def _teacher_job(job: dict[str, Any], progress=None, check_cancelled=None) -> torch.Tensor:
    from distill.data import get_dataset
    from distill.evaluate import EvalConfig, get_teacher
    from quantize.encoders import resolve_task_device

    params, device = job["params"], resolve_task_device(job["device"])
    dataset = get_dataset(job["dataset"])
    config = EvalConfig(protocol="softlabel", teacher_model=params.teacher_model, teacher_epochs=params.teacher_epochs,
                        teacher_max_per_class=params.teacher_max_per_class, device=str(device))
    teacher = get_teacher(dataset, config, progress=progress, check_cancelled=check_cancelled).to(device)
    with torch.no_grad():
        return torch.cat([teacher(dataset.normalize(as_pixels(chunk).to(device))).cpu() for chunk in job["images"].split(256)])


def class_weights(counts: list[list[int]], power: float) -> torch.Tensor:
    """Per-image weights: mass**power normalised to sum 1 within each class."""
    out = []
    for row in counts:
        mass = np.asarray(row, dtype=np.float64) ** power
        total = mass.sum()
        out.append(mass / total if total > 0 else np.full(len(row), 1.0 / len(row)))
    return torch.from_numpy(np.concatenate(out)).float()


def run_latent_pipeline(ctx: RunContext, params: LatentParams, *, weighted: bool, weight_power: float | str = 1.0,
                        seed_per_class: bool = True) -> DistilledSet:
    from quantize.encoders import load_encoder
    from quantize.latent_cache import latents_for_context, open_store

    if params.decode == "sd-img2img" and params.encoder != "sd-vae" and not Path(params.encoder).is_dir():
        raise DistillError("decode=sd-img2img needs Stable Diffusion's own VAE latents: set encoder=sd-vae (or its "
                           "directory)")
    encoder = load_encoder(params.encoder, image_size=ctx.dataset.image_size, resolution=params.resolution,
                           device=ctx.device, batch_size=params.batch_size, source_size=ctx.dataset.source_size)

    def encode() -> dict:
        store = latents_for_context(ctx, params.encoder, resolution=encoder.resolution,
                                    batch_size=params.batch_size, encoder=encoder)
        return {"folder": str(store.folder)}

    info = ctx.checkpoints.stage("encode", encode)
    store = open_store(info["folder"]) or open_store(encode()["folder"])
    assert store is not None
    quant = ctx.checkpoints.stage("quantize", lambda: quantize_classes(ctx, store, params,
                                                                        seed_per_class=seed_per_class))
    if params.decode == "nearest" and "members" not in quant:
        raise DistillError("this run's quantize checkpoint predates decode=nearest: start a new run")

    def decode() -> torch.Tensor:
        if params.decode != "nearest":
            return decode_latents(ctx, encoder, quant["centroids"], quant["labels"], params)
        with ctx.timed("decode"):
            return ctx.train.load(np.concatenate(quant["members"]))  # the real images, uint8 as stored

    images = ctx.checkpoints.stage("decode", decode)
    refine_iterations = resolve_refine_iterations(params, ctx.dataset.image_size, ctx.ipc)
    batch_real = resolve_refine_batch_real(params.refine_batch_real, ctx.dataset.image_size)
    if refine_iterations:
        if params.refine_match != "class" and "cells" not in quant:
            raise DistillError("this run's quantize checkpoint predates refine_match: start a new run")
        cells = None if params.refine_match == "class" else cell_targets(ctx, quant, params.refine_match)
        images = ctx.checkpoints.stage("refine", lambda: refine_with_dm(ctx, images, refine_iterations, cells, batch_real))
    power = resolve_weight_power(weight_power, refine_iterations, params.refine_match)
    soft = teacher_logits(ctx, images, params) if params.labels == "teacher" else None
    w_weighted = np.asarray(quant["w2_weighted"], dtype=np.float64)
    metrics: dict[str, Any] = {
        "encoder": params.encoder, "resolution": encoder.resolution, "latent_shape": list(store.latent_shape),
        "resolution_policy": "explicit (resolution=N)" if params.resolution else RESOLUTION_POLICY,
        "latent_cache": store.folder.name, "decode": params.decode,
        "kmeans_backend": ",".join(quant.get("kmeans_backends", [params.kmeans_backend])),
        "kmeans_backend_requested": params.kmeans_backend,
        "refine_iterations": refine_iterations,
        "refine_match": params.refine_match if refine_iterations else None,
        "refine_batch_real": batch_real if refine_iterations else None,
        "weight_power": power if weighted else None,
        "class_sizes": quant["class_sizes"], "counts": quant["counts"],
        "w2_weighted": [round(v, 6) for v in quant["w2_weighted"]],
        "w2_weighted_mean": round(float(w_weighted.mean()), 6),
        "kmeans_seconds": round(float(sum(quant["kmeans_seconds"])), 4),
        "skipped_images": len(store.skipped),  # training files that could not be decoded (left out, not fatal)
        "skipped_files": sorted(store.skipped.values())[:100],
    }
    if params.decode == "nearest":
        # The stored set's own quantization error: the members with their Voronoi masses.
        metrics["w2_members_mean"] = round(float(np.mean(quant["w2_members"])), 6)
    if params.w2_uniform and all(v is not None for v in quant["w2_uniform"]):
        w_uniform = np.asarray(quant["w2_uniform"], dtype=np.float64)
        metrics["w2_uniform"] = [round(v, 6) for v in quant["w2_uniform"]]
        metrics["w2_uniform_mean"] = round(float(w_uniform.mean()), 6)
        metrics["w2_uniform_method"] = ",".join(quant["w2_uniform_method"])
        metrics["w2_reduction_pct"] = round(float(100 * (1 - w_weighted.mean() / w_uniform.mean())), 3)
    return DistilledSet(
        images=images,
        labels=quant["labels"],
        soft_labels=soft,
        weights=class_weights(quant["counts"], power) if weighted else None,
        extras={"latents": quant["centroids"].float()}
        | ({"source_indices": torch.from_numpy(np.concatenate(quant["members"]))} if params.decode == "nearest" else {}),
        metrics=metrics,
    )


def resolve_refine_iterations(params: LatentParams, image_size: int, ipc: int) -> int:
    """``refine_iterations`` as a number: ``auto`` refines where the refinement was measured to win.

    That is real images (``decode=nearest``) or VAE decodes of images up to ``REFINE_AUTO_MAX_PX`` (the sizes of
    docs/BENCHMARKS.md's tables, Imagenette's included): no pretrained diffusion decoder, the situation of a CPU
    host and of this project's measurements. A diffusion decode, or larger images, get none unless asked: unmeasured
    there, and the refinement's cost grows with pixels times classes (at ImageNet scale it would dominate the job).
    A set made for a teacher's labels (``labels=teacher``) below ``REFINE_AUTO_MIN_IPC_TEACHER`` keeps its real
    images: a teacher labels the few images it is shown, and images moved off the data to match a class's mean
    embedding carry less of its knowledge than the real ones they started from."""
    if params.refine_iterations != "auto":
        return params.refine_iterations
    pretrained_style_decode = params.decode in ("diffusion", "sd-img2img")
    few_teacher_labelled = params.labels == "teacher" and ipc < REFINE_AUTO_MIN_IPC_TEACHER
    if pretrained_style_decode or image_size > REFINE_AUTO_MAX_PX or few_teacher_labelled:
        return 0
    return REFINE_AUTO_ITERATIONS


def cell_targets(ctx: RunContext, quant: dict[str, Any], match: str) -> CellTargets:
    """The k-means cells of every training image, by its position within its class in the run's split (the order
    the refinement's real pool draws from), with the cells' masses: a cell-matched refinement's targets."""
    from pixelspace.dm import CellTargets

    cells = []
    for c in range(ctx.num_classes):
        lookup = dict(zip(quant["cell_rows"][c], quant["cells"][c], strict=True))
        cells.append(torch.tensor([lookup.get(int(i), -1) for i in ctx.train.class_indices(c)], dtype=torch.long))
    weights = class_weights(quant["counts"], 1.0).view(ctx.num_classes, ctx.ipc)
    return CellTargets(cells=cells, weights=weights, class_term=match == "class+cell", cell_term=match != "mass")


def resolve_refine_batch_real(batch_real: int | str, image_size: int) -> int:
    """``refine_batch_real`` as a number: ``auto`` reads fewer real images per iteration where their pass is
    costly and fewer were measured to do as well (from ``REFINE_BATCH_AUTO_FROM_PX``)."""
    if batch_real != "auto":
        return int(batch_real)
    return REFINE_BATCH_AUTO_LARGE if image_size >= REFINE_BATCH_AUTO_FROM_PX else REFINE_BATCH_AUTO_SMALL


def resolve_weight_power(weight_power: float | str, refine_iterations: int, refine_match: str) -> float:
    """``weight_power`` as a number: ``auto`` tempers the masses of a set the class-mean refinement moved (its
    images no longer stand for their cells alone); the raw masses otherwise (DDOQ)."""
    if weight_power != "auto":
        return float(weight_power)
    return REFINED_WEIGHT_POWER if refine_iterations and refine_match == "class" else 1.0


def refine_with_dm(ctx: RunContext, images: torch.Tensor, iterations: int,
                   cells: CellTargets | None = None, batch_real: int = 256) -> torch.Tensor:
    """A short DM run from the decoded set (class-ordered, IPC per class): refined [0, 1] pixels, same order;
    ``cells`` (:func:`cell_targets`) match each image to its own cell too.

    DM lives with the pixel-space methods; the latent pipeline borrows it here (the two families are siblings
    over the core, neither imports the job layer)."""
    from distill.methods.registry import parse_params
    from pixelspace.dm import DistributionMatching, DMParams

    params = parse_params(DistributionMatching, {"iterations": iterations, "batch_real": batch_real})  # DM's defaults otherwise
    assert isinstance(params, DMParams)
    return DistributionMatching().run(ctx, params, initial=as_pixels(images), cells=cells).images  # stage "refine"


class LatentOptimalQuantization(Method[LatentOQParams]):
    name: ClassVar[str] = "oq"
    summary: ClassVar[str] = ("Latent optimal quantization (DDOQ): encode, per-class k-means with cluster-mass "
                              "weights; each cell's nearest real image, or a VAE / latent diffusion decode")
    family: ClassVar[str] = "latent"
    fans_out: ClassVar[bool] = True
    Params = LatentOQParams

    def run(self, ctx: RunContext, params: LatentOQParams) -> DistilledSet:
        return run_latent_pipeline(ctx, params, weighted=params.weighted, weight_power=params.weight_power)


class D4M(Method[D4MParams]):
    name: ClassVar[str] = "d4m"
    summary: ClassVar[str] = ("D4M: per-class MiniBatchKMeans prototypes of latents (streamed partial_fit), "
                              "unweighted, decoded by VAE, latent prior or SD img2img")
    family: ClassVar[str] = "latent"
    fans_out: ClassVar[bool] = True
    Params = D4MParams

    def run(self, ctx: RunContext, params: D4MParams) -> DistilledSet:
        # D4M creates every class's MiniBatchKMeans with random_state=0: one seed for all classes.
        return run_latent_pipeline(ctx, params, weighted=False, seed_per_class=False)
