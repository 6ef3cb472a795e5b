"""Train a small class-conditional latent prior (a diffusers DiT) on a dataset's cached latents.

Pretrained DiT/SD checkpoints only cover ImageNet-like domains and are not available offline; this module
lets every dataset get a prior of its own so ``oq`` can decode through diffusion (method parameter
``decode=diffusion, prior=DIR``). The recipe is DiT's: ``DiTTransformer2DModel`` with adaLN-zero class
conditioning, a linear-beta ``DDPMScheduler`` with 1000 steps, the epsilon-prediction MSE objective, AdamW,
and 10% label dropout to the null class ``num_classes`` for classifier-free guidance. Latents are normalised
per channel (mean/std stored in ``prior.json``); the model only predicts epsilon (out_channels =
in_channels, no learned sigma).

Saved layout (diffusers format, loadable with ``DiTTransformer2DModel.from_pretrained(dir / "transformer")``):
``transformer/``, ``scheduler/``, ``prior.json``. Written to a temporary sibling folder, then renamed.
"""

from __future__ import annotations

import json
import math
import shutil
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from distill.errors import DistillError
from quantize.diffusion import PRIOR_META
from quantize.latent_cache import LatentRows, LatentStore

Progress = Callable[[float, str | None], None]

# DiT's training noise schedule (linear betas 1e-4 .. 0.02 over 1000 steps).
SCHEDULER_CONFIG: dict[str, Any] = {
    "num_train_timesteps": 1000,
    "beta_start": 0.0001,
    "beta_end": 0.02,
    "beta_schedule": "linear",
    "prediction_type": "epsilon",
    "clip_sample": False,
}


@dataclass
class PriorConfig:
    """Transformer size. The default is tiny (about 0.8M parameters) so that a small dataset's prior trains on a
    CPU; DiT-S/2 is ``num_layers=12, num_attention_heads=6, attention_head_dim=64``."""

    num_layers: int = 4
    num_attention_heads: int = 4
    attention_head_dim: int = 32
    patch_size: int = 2
    dropout: float = 0.0

    def transformer_kwargs(self, channels: int, size: int, num_classes: int) -> dict[str, Any]:
        return {
            "num_attention_heads": self.num_attention_heads,
            "attention_head_dim": self.attention_head_dim,
            "in_channels": channels,
            "out_channels": channels,  # epsilon only: 2 * channels would be DiT's learned sigma
            "num_layers": self.num_layers,
            "dropout": self.dropout,
            "sample_size": size,
            "patch_size": self.patch_size,
            "num_embeds_ada_norm": num_classes,  # the embedding table adds the null class row itself
            "norm_type": "ada_norm_zero",
        }


@dataclass
class PriorResult:
    path: Path
    losses: list[float]  # training loss per iteration
    eval_loss_start: float  # fixed held-out (latent, t, noise) batch, before training
    eval_loss_end: float  # the same batch after training
    seconds: float
    meta: dict[str, Any] = field(default_factory=dict)


def default_prior_dir(dataset: str, encoder: str, resolution: int) -> Path:
    """DISTILL_HOME/priors/<dataset>-<encoder>-<resolution>."""
    from distill.config import get_settings

    safe_encoder = Path(str(encoder)).name or "encoder"
    return get_settings().home_dir / "priors" / f"{dataset}-{safe_encoder}-{resolution}"


# Latents up to this many float32 bytes get their statistics in one pass (the arithmetic earlier priors were
# trained with, so they reproduce bit for bit); larger sources are read in chunks of STATS_CHUNK_BYTES.
STATS_ONE_PASS_BYTES = 1 << 30
STATS_CHUNK_BYTES = 16 << 20

# What a prior trains on: an in-memory tensor, a (memory-mapped) array, or a latent cache's rows
# (``LatentStore.latent_rows()``): anything with ``shape``, ``len`` and indexing by an index array or a slice.
LatentSource = torch.Tensor | np.ndarray | LatentRows


def _read(latents: LatentSource, index: torch.Tensor | slice) -> torch.Tensor:
    """Rows of a source as a tensor (on the source's device for a tensor, else on the CPU)."""
    if isinstance(latents, torch.Tensor):
        return latents[index.to(latents.device) if isinstance(index, torch.Tensor) else index]
    rows = np.asarray(latents[index.numpy() if isinstance(index, torch.Tensor) else index])
    return torch.from_numpy(rows if rows.flags.writeable else rows.copy())  # a slice of a read-only memmap


def latent_stats(latents: LatentSource, one_pass_bytes: int = STATS_ONE_PASS_BYTES) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-channel mean and std over (N, h, w); the std is floored so constant channels stay finite.

    Memory is bounded: beyond ``one_pass_bytes`` (float32) the rows are read in chunks and combined in float64
    (Chan et al.'s pairwise update), equal to the one-pass values to float32 rounding.
    """
    n, channels = int(latents.shape[0]), int(latents.shape[1])
    per_row = 4 * int(np.prod(latents.shape[1:]))
    if n * per_row <= one_pass_bytes:
        x = _read(latents, slice(0, n)).float().transpose(0, 1).reshape(channels, -1)
        return x.mean(1), x.std(1).clamp_min(1e-4)
    count = 0
    mean = torch.zeros(channels, dtype=torch.float64)
    m2 = torch.zeros(channels, dtype=torch.float64)
    step = max(1, STATS_CHUNK_BYTES // per_row)
    for start in range(0, n, step):
        x = _read(latents, slice(start, min(n, start + step))).cpu().double().transpose(0, 1).reshape(channels, -1)
        k = x.shape[1]
        chunk_mean = x.mean(1)
        chunk_m2 = ((x - chunk_mean[:, None]) ** 2).sum(1)
        delta = chunk_mean - mean
        total = count + k
        mean = mean + delta * (k / total)
        m2 = m2 + chunk_m2 + delta**2 * (count * k / total)
        count = total
    std = (m2 / max(1, count - 1)).sqrt()
    return mean.float(), std.float().clamp_min(1e-4)


def _freeze_label_dropout(model: torch.nn.Module) -> None:
    """diffusers' DiT gives every block its own LabelEmbedding, each dropping labels *independently* in
    train mode. We drop labels once per sample instead (as the DiT reference does), so switch theirs off."""
    from diffusers.models.embeddings import LabelEmbedding

    for module in model.modules():
        if isinstance(module, LabelEmbedding):
            module.eval()


def _diffusion_loss(model, scheduler, x0, labels, t, noise) -> torch.Tensor:
    xt = scheduler.add_noise(x0, noise, t)
    pred = model(xt, timestep=t, class_labels=labels).sample
    return F.mse_loss(pred.float(), noise)


def _checked_labels(latents: LatentSource, labels: torch.Tensor | np.ndarray, num_classes: int, iterations: int,
                    batch_size: int, lr: float, label_dropout: float, config: PriorConfig) -> torch.Tensor:
    """The labels as a flat int64 tensor, once every training input is known to be usable (else one clear error)."""
    if len(latents.shape) != 4 or len(latents) == 0:
        raise DistillError(f"need a non-empty N x C x h x w latent tensor, got shape {tuple(latents.shape)}")
    labels = torch.as_tensor(labels).long().reshape(-1)
    if len(labels) != len(latents):
        raise DistillError(f"{len(latents)} latents but {len(labels)} labels")
    if int(labels.min()) < 0 or int(labels.max()) >= num_classes:
        raise DistillError(f"labels must be in [0, {num_classes})")
    if iterations < 1 or batch_size < 1 or lr <= 0:
        raise DistillError("iterations and batch_size must be >= 1 and lr > 0")
    if not 0.0 <= label_dropout < 1.0:
        raise DistillError(f"label_dropout must be in [0, 1), got {label_dropout}")
    _, _, height, width = latents.shape
    if height != width or height % config.patch_size:
        raise DistillError(f"latents must be square with a side divisible by {config.patch_size}, got {height}x{width}")
    return labels


@dataclass
class _NormalisedRows:
    """Mini-batches of a latent source, normalised per channel and moved to the device one batch at a time."""

    latents: LatentSource
    labels: torch.Tensor
    mean: torch.Tensor
    std: torch.Tensor
    device: torch.device

    def __call__(self, index: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x = _read(self.latents, index).float()
        mu, sigma = self.mean.to(x.device).view(1, -1, 1, 1), self.std.to(x.device).view(1, -1, 1, 1)
        return ((x - mu) / sigma).to(self.device), self.labels[index].to(self.device)


def _dit_and_optimiser(config: PriorConfig, latent_shape: tuple[int, int, int], num_classes: int, lr: float,
                       weight_decay: float, iterations: int, device: torch.device) -> tuple[Any, Any, Any, Any]:
    """DiT's model, noise schedule, AdamW and learning-rate schedule (linear warm-up, then cosine to zero)."""
    from diffusers import DDPMScheduler, DiTTransformer2DModel

    channels, height, _ = latent_shape
    # Any: diffusers' ModelMixin / ConfigMixin stubs hide .to(), .config and alphas_cumprod.
    model: Any = DiTTransformer2DModel(**config.transformer_kwargs(channels, height, num_classes))
    model = model.to(device)
    scheduler: Any = DDPMScheduler(**SCHEDULER_CONFIG)
    scheduler.alphas_cumprod = scheduler.alphas_cumprod.to(device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay)
    warmup = max(1, min(100, iterations // 10))
    sched_lr = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda i: min(1.0, (i + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * min(i, iterations) / iterations))
    )
    return model, scheduler, optimizer, sched_lr


class _HeldOutLoss:
    """The loss on one fixed batch (same latents, timesteps and noise before and after training): it measures
    learning without the large per-timestep variance of the training loss."""

    def __init__(self, rows: _NormalisedRows, n: int, size: int, latent_shape: tuple[int, int, int], scheduler: Any,
                 gen: torch.Generator):
        self.x, self.y = rows(torch.randperm(n, generator=gen)[:size])
        self.t = torch.randint(0, scheduler.config.num_train_timesteps, (size,), generator=gen).to(rows.device)
        self.noise = torch.randn((size, *latent_shape), generator=gen).to(rows.device)
        self.scheduler = scheduler

    def __call__(self, model: Any) -> float:
        model.eval()
        with torch.no_grad():
            value = _diffusion_loss(model, self.scheduler, self.x, self.y, self.t, self.noise).item()
        model.train()
        _freeze_label_dropout(model)
        return value


def _training_step(model: Any, scheduler: Any, optimizer: Any, sched_lr: Any, x0: torch.Tensor, y: torch.Tensor,
                   gen: torch.Generator, num_classes: int, label_dropout: float, it: int) -> float:
    """One DiT step: drop labels to the null class, noise at random timesteps, epsilon MSE, clipped AdamW."""
    device = x0.device
    drop = (torch.rand(len(y), generator=gen) < label_dropout).to(device)
    y = torch.where(drop, torch.full_like(y, num_classes), y)
    t = torch.randint(0, scheduler.config.num_train_timesteps, (len(y),), generator=gen).to(device)
    noise = torch.randn(x0.shape, generator=gen).to(device)
    use_amp = device.type == "cuda"
    amp_dtype = torch.bfloat16 if use_amp and torch.cuda.is_bf16_supported() else torch.float16
    with torch.autocast(device.type, dtype=amp_dtype, enabled=use_amp):
        loss = _diffusion_loss(model, scheduler, x0, y, t, noise)
    if not torch.isfinite(loss):
        raise DistillError(f"prior training diverged at iteration {it} (loss {loss.item()}): lower --lr")
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    optimizer.step()
    sched_lr.step()
    return float(loss.item())


def train_prior_on_latents(
    latents: LatentSource,
    labels: torch.Tensor | np.ndarray,
    num_classes: int,
    out_dir: Path | str,
    *,
    iterations: int = 2000,
    batch_size: int = 128,
    lr: float = 1e-3,
    weight_decay: float = 0.0,
    label_dropout: float = 0.1,
    config: PriorConfig | None = None,
    seed: int = 0,
    device: torch.device | str = "cpu",
    progress: Progress | None = None,
    meta: dict[str, Any] | None = None,
    eval_size: int = 256,
) -> PriorResult:
    """Train the DiT prior on latents (N x C x h x w, encoder space) and save it to ``out_dir``.

    The latents stay where they are (CPU memory, a memory-mapped array, a latent cache's shards): each step reads
    its mini-batch, normalises it and moves it to ``device``, so device and host memory are bounded by a batch,
    not the dataset. The same seed draws the same batches (and gives the same prior) from any source.
    """
    config = config or PriorConfig()
    labels = _checked_labels(latents, labels, num_classes, iterations, batch_size, lr, label_dropout, config)
    _, channels, height, width = latents.shape
    latent_shape = (int(channels), int(height), int(width))
    device = torch.device(device)
    out_dir = Path(out_dir).expanduser()

    started = time.perf_counter()
    torch.manual_seed(seed)
    gen = torch.Generator("cpu").manual_seed(seed)
    mean, std = latent_stats(latents)
    n = len(latents)
    rows = _NormalisedRows(latents, labels, mean, std, device)
    model, scheduler, optimizer, sched_lr = _dit_and_optimiser(config, latent_shape, num_classes, lr, weight_decay,
                                                                iterations, device)
    held_out = _HeldOutLoss(rows, n, min(eval_size, n), latent_shape, scheduler, gen)
    eval_start = held_out(model)
    losses: list[float] = []
    for it in range(iterations):
        x0, y = rows(torch.randint(0, n, (min(batch_size, n),), generator=gen))
        losses.append(_training_step(model, scheduler, optimizer, sched_lr, x0, y, gen, num_classes, label_dropout, it))
        if progress is not None:
            progress((it + 1) / iterations, f"loss {np.mean(losses[-50:]):.4f}")
    eval_end = held_out(model)
    seconds = time.perf_counter() - started

    training = {
        "images": n, "iterations": iterations, "batch_size": batch_size, "lr": lr, "label_dropout": label_dropout,
        "seed": seed, "device": str(device), "seconds": round(seconds, 2), "config": asdict(config),
        "parameters": sum(p.numel() for p in model.parameters()), "eval_loss_start": eval_start,
        "eval_loss_end": eval_end, "loss_first_50": float(np.mean(losses[:50])),
        "loss_last_50": float(np.mean(losses[-50:])),
    }
    info = {**(meta or {}), "num_classes": num_classes, "null_class": num_classes, "latent_shape": list(latent_shape),
            "latent_mean": mean.tolist(), "latent_std": std.tolist(), "training": training}
    save_prior(model.eval(), scheduler, info, out_dir)
    return PriorResult(out_dir, losses, eval_start, eval_end, seconds, info)


def save_prior(model, scheduler, info: dict[str, Any], out_dir: Path) -> Path:
    """Write transformer/, scheduler/ and prior.json to a temporary sibling, then swap it into place."""
    out_dir = Path(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", dir=out_dir.parent))
    try:
        model.save_pretrained(tmp / "transformer")
        scheduler.save_pretrained(tmp / "scheduler")
        (tmp / PRIOR_META).write_text(json.dumps(info, indent=2))
        if out_dir.exists():
            old = out_dir.with_name(f".{out_dir.name}.old-{int(time.time() * 1000)}")
            out_dir.rename(old)
            tmp.rename(out_dir)
            shutil.rmtree(old, ignore_errors=True)
        else:
            tmp.rename(out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out_dir


def _dataset_store(dataset_name: str, encoder: str, resolution: int | None, max_per_class: int | None, seed: int,
                   device: torch.device | str, progress: Progress | None) -> tuple[LatentStore, int, dict[str, Any]]:
    """The shared latent cache of a dataset's training split (encoded once, then reused by ``oq``/``d4m`` runs
    with the same dataset, encoder, resolution and --max-per-class sample), its class count and prior meta."""
    from distill.data import get_dataset
    from quantize.latent_cache import latents_for_dataset

    if max_per_class is not None and max_per_class < 1:
        raise DistillError(f"max_per_class must be >= 1, got {max_per_class}")
    dataset = get_dataset(dataset_name)
    store = latents_for_dataset(
        dataset.name, encoder, resolution=resolution, device=str(torch.device(device)), max_per_class=max_per_class,
        seed=seed, progress=(lambda fraction: progress(fraction, None)) if progress is not None else None,
    )
    meta = {
        "dataset": dataset.name,
        "classes": list(dataset.classes),
        "encoder": encoder,
        "resolution": int(store.meta["resolution"]),
        "latent_cache": store.folder.name,
    }
    return store, dataset.num_classes, meta


def load_dataset_latents(
    dataset_name: str,
    encoder: str = "taef2",
    resolution: int | None = None,
    *,
    max_per_class: int | None = None,
    seed: int = 0,
    device: torch.device | str = "cpu",
    progress: Progress | None = None,
) -> tuple[torch.Tensor, torch.Tensor, int, dict[str, Any]]:
    """Latents + labels of a dataset's training split from the shared latent cache, in memory (float32; small
    datasets and inspection: :func:`train_prior` streams from the cache instead)."""
    store, num_classes, meta = _dataset_store(dataset_name, encoder, resolution, max_per_class, seed, device, progress)
    latents, labels = store.all_latents()
    return latents.float(), labels.long(), num_classes, meta


def train_prior(
    dataset_name: str,
    encoder: str = "taef2",
    resolution: int | None = None,
    out_dir: Path | str | None = None,
    *,
    iterations: int = 2000,
    batch_size: int = 128,
    lr: float = 1e-3,
    max_per_class: int | None = None,
    config: PriorConfig | None = None,
    seed: int = 0,
    device: torch.device | str = "cpu",
    progress: Progress | None = None,
) -> PriorResult:
    """Encode (or reuse the cached latents of) a dataset, train the DiT prior on them (streamed from the cache)
    and save it."""
    def encoding(fraction: float, message: str | None = None) -> None:
        if progress is not None:
            progress(0.0, f"encoding {fraction:.0%}")

    store, num_classes, meta = _dataset_store(dataset_name, encoder, resolution, max_per_class, seed, device,
                                              encoding if progress else None)
    if out_dir is None:
        out_dir = default_prior_dir(meta["dataset"], encoder, meta["resolution"])
    rows = store.latent_rows()  # streamed from the cache's shards: memory bounded by a batch, not the split
    return train_prior_on_latents(
        rows, rows.labels, num_classes, out_dir, iterations=iterations, batch_size=batch_size, lr=lr,
        config=config, seed=seed, device=device, progress=progress, meta=meta,
    )
