"""Decode latent centroids through diffusion: partial noising then class-conditional denoising (img2img).

Two paths, both returning *latents* (the caller decodes them with the VAE):

- :func:`decode_with_prior`: a class-conditional ``DiTTransformer2DModel`` from a diffusers-format directory
  (the prior trained by :mod:`quantize.prior`, or a DiT checkpoint such as ``facebook/DiT-XL-2-256`` on GPU
  hosts), DDIM or DPM-Solver, classifier-free guidance with the null class id ``num_classes`` as DiT does.
- :func:`decode_with_stable_diffusion`: D4M's recipe, Stable Diffusion img2img on the prototype latent with
  the class name as prompt (strength 0.7, 50 steps, guidance 8, negative prompt "cartoon, anime, painting").

Both follow diffusers' img2img convention: with ``steps`` inference steps and strength ``s`` the denoising
starts at step index ``steps - int(steps * s)``; strength 0 therefore runs no step and returns the input
unchanged, so a diffusion decode at strength 0 is exactly a VAE decode.

Noise comes from a CPU ``torch.Generator`` seeded per call, so a seed gives the same result on any device.
The model runs in fp16/bf16 on CUDA, fp32 on CPU; scheduler arithmetic stays in fp32.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from distill.errors import DistillError

SCHEDULERS = ("ddim", "dpm")
PRIOR_META = "prior.json"
D4M_NEGATIVE_PROMPT = "cartoon, anime, painting"

Progress = Callable[[float], None]


# ------------------------------------------------------------------------------------------ shared parts
def make_scheduler(kind: str, config: dict[str, Any]):
    """A fresh inference scheduler built from a (training) scheduler config; one per batch (they keep state)."""
    from diffusers import DDIMScheduler, DPMSolverMultistepScheduler

    if kind == "ddim":
        # DiT/SD checkpoints were trained with these; set_alpha_to_one=False is diffusers' DiT setting.
        return DDIMScheduler.from_config(config, clip_sample=False, set_alpha_to_one=False)
    if kind == "dpm":
        return DPMSolverMultistepScheduler.from_config(config, algorithm_type="dpmsolver++", solver_order=2)
    raise DistillError(f"unknown scheduler '{kind}'; known: {', '.join(SCHEDULERS)}")


def img2img_timesteps(scheduler, steps: int, strength: float, device: torch.device) -> torch.Tensor:
    """The timesteps an img2img run visits (diffusers' ``get_timesteps``); empty when strength is 0."""
    scheduler.set_timesteps(steps, device=device)
    init_timestep = min(int(steps * strength), steps)
    t_start = max(steps - init_timestep, 0)
    timesteps = scheduler.timesteps[t_start * scheduler.order :]
    if hasattr(scheduler, "set_begin_index"):
        scheduler.set_begin_index(t_start * scheduler.order)
    return timesteps


def _check_common(strength: float, steps: int, guidance: float) -> None:
    if not 0.0 <= strength <= 1.0:
        raise DistillError(f"strength must be in [0, 1], got {strength}")
    if steps < 1:
        raise DistillError(f"steps must be at least 1, got {steps}")
    if guidance < 0:
        raise DistillError(f"guidance must be >= 0, got {guidance}")


def model_dtype(device: torch.device, dtype: torch.dtype | None = None) -> torch.dtype:
    """fp32 on CPU; bf16 on CUDA when the GPU supports it, fp16 otherwise (overridable)."""
    if dtype is not None:
        return dtype
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.float32


def latent_noise(shape: tuple[int, ...], seed: int, first: int, device: torch.device) -> torch.Tensor:
    """Noise for latents ``first .. first + shape[0] - 1``: each latent's own generator, seeded by ``seed`` and its
    global index, so the noise does not depend on batch size or on how the set is split over GPUs."""
    rows = [torch.randn(shape[1:], generator=torch.Generator("cpu").manual_seed(int(seed) * 1_000_003 + first + i),
                        dtype=torch.float32) for i in range(shape[0])]
    return torch.stack(rows).to(device) if rows else torch.empty(shape, device=device)


# ------------------------------------------------------------------------------------------- DiT prior
def check_prior_dir(prior_dir: Path | str) -> Path:
    """Cheap layout check of a diffusers DiT folder (``transformer/`` + ``scheduler/``); returns its path."""
    root = Path(prior_dir).expanduser()
    if not root.is_dir():
        raise DistillError(f"prior directory not found: {root}")
    if not (root / "transformer" / "config.json").is_file():
        raise DistillError(f"not a diffusers DiT directory (no transformer/config.json): {root}")
    if not (root / "scheduler" / "scheduler_config.json").is_file():
        raise DistillError(f"not a diffusers DiT directory (no scheduler/scheduler_config.json): {root}")
    return root


@dataclass
class LatentPrior:
    """A loaded class-conditional DiT with its scheduler config and latent normalisation.

    ``mean``/``std`` (per channel) map the encoder's latents into the space the model was trained on:
    ``model_latent = (latent - mean) / std``. Directories without ``prior.json`` (a plain DiT checkpoint)
    use mean 0, std 1: their latents must already be scaled the way the checkpoint expects.
    """

    transformer: Any
    scheduler_config: dict[str, Any]
    num_classes: int
    mean: torch.Tensor
    std: torch.Tensor
    meta: dict[str, Any] = field(default_factory=dict)
    path: Path | None = None

    @property
    def in_channels(self) -> int:
        return int(self.transformer.config.in_channels)

    @property
    def learned_sigma(self) -> bool:
        return int(self.transformer.config.out_channels) == 2 * self.in_channels

    @classmethod
    def load(cls, prior_dir: Path | str, device: torch.device | str = "cpu", dtype: torch.dtype | None = None):
        """Load ``transformer/`` + ``scheduler/`` (+ optional ``prior.json``) from a diffusers-format folder."""
        from diffusers import DiTTransformer2DModel

        root = check_prior_dir(prior_dir)
        sched_file = root / "scheduler" / "scheduler_config.json"
        device = torch.device(device)
        try:
            transformer = DiTTransformer2DModel.from_pretrained(
                root / "transformer", torch_dtype=model_dtype(device, dtype), low_cpu_mem_usage=True
            )
            scheduler_config = json.loads(sched_file.read_text())
        except (OSError, ValueError, RuntimeError, KeyError) as exc:
            raise DistillError(f"cannot load the prior in {root}: {str(exc).splitlines()[0]}") from None
        num_classes = transformer.config.num_embeds_ada_norm
        if not num_classes or transformer.config.norm_type != "ada_norm_zero":
            raise DistillError(f"{root} is not a class-conditional DiT (num_embeds_ada_norm is unset)")
        meta: dict[str, Any] = {}
        channels = int(transformer.config.in_channels)
        mean, std = torch.zeros(channels), torch.ones(channels)
        meta_file = root / PRIOR_META
        if meta_file.is_file():
            try:
                meta = json.loads(meta_file.read_text())
                mean = torch.tensor(meta["latent_mean"], dtype=torch.float32)
                std = torch.tensor(meta["latent_std"], dtype=torch.float32)
            except (ValueError, KeyError, TypeError) as exc:
                raise DistillError(f"bad {PRIOR_META} in {root}: {exc}") from None
            if mean.shape != (channels,) or std.shape != (channels,) or bool((std <= 0).any()):
                raise DistillError(f"bad {PRIOR_META} in {root}: latent_mean/latent_std must have {channels} entries")
        transformer = transformer.to(device).eval().requires_grad_(False)
        return cls(transformer, scheduler_config, int(num_classes), mean, std, meta, root)

    def normalize(self, latents: torch.Tensor) -> torch.Tensor:
        shape = (1, -1, 1, 1)
        return (latents - self.mean.to(latents).view(shape)) / self.std.to(latents).view(shape)

    def denormalize(self, latents: torch.Tensor) -> torch.Tensor:
        shape = (1, -1, 1, 1)
        return latents * self.std.to(latents).view(shape) + self.mean.to(latents).view(shape)

    def predict_noise(self, x: torch.Tensor, t: torch.Tensor, labels: torch.Tensor, guidance: float) -> torch.Tensor:
        """Epsilon prediction with classifier-free guidance (one batched forward for both branches)."""
        model = self.transformer
        n = len(x)
        use_cfg = guidance != 1.0
        if use_cfg:
            x_in = torch.cat([x, x])
            labels_in = torch.cat([labels, torch.full_like(labels, self.num_classes)])
        else:
            x_in, labels_in = x, labels
        t_in = t.reshape(1).to(x.device).expand(len(x_in))
        out = model(x_in.to(model.dtype), timestep=t_in, class_labels=labels_in).sample.float()
        eps = out[:, : self.in_channels]  # learned-sigma models also output variances: drop them
        if use_cfg:
            cond, uncond = eps[:n], eps[n:]
            eps = uncond + guidance * (cond - uncond)
        return eps


def decode_with_prior(
    latents: torch.Tensor,
    labels: torch.Tensor,
    prior_dir: Path | str | LatentPrior,
    *,
    strength: float = 0.5,
    steps: int = 50,
    guidance: float = 4.0,
    scheduler: str = "ddim",
    seed: int = 0,
    device: torch.device | str = "cpu",
    batch_size: int = 64,
    dtype: torch.dtype | None = None,
    progress: Progress | None = None,
    first_index: int = 0,
) -> torch.Tensor:
    """Noise ``latents`` (N x C x h x w, encoder space) to ``strength`` and denoise them with the class prior.

    Each latent's noise comes from its own generator, seeded by ``seed`` and its global index (``first_index`` +
    its position, :func:`latent_noise`): any batch size, and a set decoded in chunks on several GPUs, get
    exactly the images of one decode in one process.

    ``labels`` are class ids in [0, num_classes). Returns float32 latents in the encoder's space on the
    input's device. Strength 0 returns the input itself, unchanged.
    """
    _check_common(strength, steps, guidance)
    if scheduler not in SCHEDULERS:
        raise DistillError(f"unknown scheduler '{scheduler}'; known: {', '.join(SCHEDULERS)}")
    if latents.ndim != 4:
        raise DistillError(f"latents must be N x C x h x w, got shape {tuple(latents.shape)}")
    labels = torch.as_tensor(labels).long().reshape(-1)
    if len(labels) != len(latents):
        raise DistillError(f"{len(latents)} latents but {len(labels)} labels")
    if strength == 0.0 and not isinstance(prior_dir, LatentPrior):
        check_prior_dir(prior_dir)  # no step runs, but a wrong path still fails at any strength
        return latents
    device = torch.device(device)
    prior = prior_dir if isinstance(prior_dir, LatentPrior) else LatentPrior.load(prior_dir, device, dtype)
    if latents.shape[1] != prior.in_channels:
        raise DistillError(f"the prior expects {prior.in_channels}-channel latents, got {latents.shape[1]}")
    patch = int(prior.transformer.config.patch_size)
    if latents.shape[2] % patch or latents.shape[3] % patch:
        raise DistillError(f"latent size {tuple(latents.shape[2:])} is not a multiple of the patch size {patch}")
    if len(labels) and (int(labels.min()) < 0 or int(labels.max()) >= prior.num_classes):
        raise DistillError(f"labels must be in [0, {prior.num_classes}) for this prior")
    probe = make_scheduler(scheduler, prior.scheduler_config)
    if len(img2img_timesteps(probe, steps, strength, device)) == 0 or len(latents) == 0:
        return latents

    model_device = next(prior.transformer.parameters()).device
    outputs = []
    total = len(latents)
    for start in range(0, total, batch_size):
        z0 = prior.normalize(latents[start : start + batch_size].to(model_device, torch.float32))
        y = labels[start : start + batch_size].to(model_device)
        sched = make_scheduler(scheduler, prior.scheduler_config)
        timesteps = img2img_timesteps(sched, steps, strength, model_device)
        noise = latent_noise(tuple(z0.shape), seed, first_index + start, model_device)
        x = sched.add_noise(z0, noise, timesteps[:1])
        with torch.inference_mode():
            for i, t in enumerate(timesteps):
                x_in = sched.scale_model_input(x, t)
                eps = prior.predict_noise(x_in, t, y, guidance)
                x = sched.step(eps, t, x, return_dict=True).prev_sample.float()
                if progress is not None:
                    progress((start + len(z0) * (i + 1) / len(timesteps)) / total)
        outputs.append(prior.denormalize(x).to(latents.device))
    return torch.cat(outputs)


# ---------------------------------------------------------------------------------- Stable Diffusion
@dataclass
class StableDiffusionParts:
    """The parts of a diffusers Stable Diffusion folder that img2img on latents needs (no VAE, no checker)."""

    unet: Any
    text_encoder: Any
    tokenizer: Any
    scheduler_config: dict[str, Any]
    scheduler_class: str

    @classmethod
    def load(cls, sd_dir: Path | str, device: torch.device | str = "cpu", dtype: torch.dtype | None = None):
        """Load ``unet/``, ``text_encoder/``, ``tokenizer/``, ``scheduler/`` from a local diffusers SD folder."""
        from diffusers import UNet2DConditionModel

        try:
            from transformers import CLIPTextModel, CLIPTokenizer
        except ImportError:
            raise DistillError("Stable Diffusion decoding needs `transformers`: pip install transformers") from None
        root = Path(sd_dir).expanduser()
        if not root.is_dir():
            raise DistillError(f"Stable Diffusion directory not found: {root}")
        for part in ("unet", "text_encoder", "tokenizer", "scheduler"):
            if not (root / part).is_dir():
                raise DistillError(f"not a diffusers Stable Diffusion directory (no {part}/): {root}")
        device = torch.device(device)
        dtype = model_dtype(device, dtype)
        try:
            unet = UNet2DConditionModel.from_pretrained(root / "unet", torch_dtype=dtype, low_cpu_mem_usage=True)
            # Any: transformers' typed .to() does not accept a torch.device
            text_encoder: Any = CLIPTextModel.from_pretrained(root / "text_encoder", torch_dtype=dtype)
            tokenizer = CLIPTokenizer.from_pretrained(root / "tokenizer")
            scheduler_config = json.loads((root / "scheduler" / "scheduler_config.json").read_text())
        except (OSError, ValueError, RuntimeError, KeyError) as exc:
            raise DistillError(f"cannot load Stable Diffusion from {root}: {str(exc).splitlines()[0]}") from None
        unet = unet.to(device).eval().requires_grad_(False)
        text_encoder = text_encoder.to(device).eval().requires_grad_(False)
        return cls(unet, text_encoder, tokenizer, scheduler_config, scheduler_config.get("_class_name", ""))

    def make_scheduler(self, kind: str | None):
        """``None``: the scheduler shipped with the checkpoint (D4M's choice: PNDM for SD v1.5)."""
        if kind is not None:
            return make_scheduler(kind, self.scheduler_config)
        import diffusers

        cls = getattr(diffusers, self.scheduler_class, None) or diffusers.DDIMScheduler
        return cls.from_config(self.scheduler_config)

    @torch.inference_mode()
    def encode_prompts(self, prompts: list[str]) -> torch.Tensor:
        tok = self.tokenizer(
            prompts, padding="max_length", max_length=self.tokenizer.model_max_length, truncation=True,
            return_tensors="pt",
        )
        device = next(self.text_encoder.parameters()).device
        return self.text_encoder(tok.input_ids.to(device))[0]


def decode_with_stable_diffusion(
    latents: torch.Tensor,
    class_names: list[str],
    sd_dir: Path | str | StableDiffusionParts,
    *,
    strength: float = 0.7,
    steps: int = 50,
    guidance: float = 8.0,
    negative_prompt: str | None = D4M_NEGATIVE_PROMPT,
    scheduler: str | None = None,
    seed: int = 0,
    device: torch.device | str = "cpu",
    batch_size: int = 16,
    dtype: torch.dtype | None = None,
    progress: Progress | None = None,
    first_index: int = 0,
) -> torch.Tensor:
    """D4M's decode: SD img2img on prototype latents (already multiplied by the VAE scaling factor).

    Noise per latent as in :func:`decode_with_prior` (seeded by ``seed`` and the latent's global index).

    ``class_names[i]`` is the prompt of ``latents[i]``. Returns denoised latents in the same (scaled) space.
    """
    _check_common(strength, steps, guidance)
    if latents.ndim != 4:
        raise DistillError(f"latents must be N x C x h x w, got shape {tuple(latents.shape)}")
    if len(class_names) != len(latents):
        raise DistillError(f"{len(latents)} latents but {len(class_names)} class names")
    if strength == 0.0 or len(latents) == 0:
        return latents
    device = torch.device(device)
    parts = sd_dir if isinstance(sd_dir, StableDiffusionParts) else StableDiffusionParts.load(sd_dir, device, dtype)
    unet = parts.unet
    if latents.shape[1] != unet.config.in_channels:
        raise DistillError(f"the UNet expects {unet.config.in_channels}-channel latents, got {latents.shape[1]}")
    if len(img2img_timesteps(parts.make_scheduler(scheduler), steps, strength, device)) == 0:
        return latents
    model_device = next(unet.parameters()).device
    use_cfg = guidance > 1.0
    outputs = []
    total = len(latents)
    for start in range(0, total, batch_size):
        z0 = latents[start : start + batch_size].to(model_device, torch.float32)
        n = len(z0)
        cond = parts.encode_prompts(list(class_names[start : start + n]))
        if use_cfg:
            uncond = parts.encode_prompts([negative_prompt or ""] * n)
            context = torch.cat([uncond, cond])
        else:
            context = cond
        sched = parts.make_scheduler(scheduler)
        timesteps = img2img_timesteps(sched, steps, strength, model_device)
        noise = latent_noise(tuple(z0.shape), seed, first_index + start, model_device)
        x = sched.add_noise(z0, noise, timesteps[:1])
        with torch.inference_mode():
            for i, t in enumerate(timesteps):
                x_in = torch.cat([x, x]) if use_cfg else x
                x_in = sched.scale_model_input(x_in, t)
                eps = unet(x_in.to(unet.dtype), t, encoder_hidden_states=context).sample.float()
                if use_cfg:
                    eps_uncond, eps_text = eps.chunk(2)
                    eps = eps_uncond + guidance * (eps_text - eps_uncond)
                x = sched.step(eps, t, x, return_dict=True).prev_sample.float()
                if progress is not None:
                    progress((start + n * (i + 1) / len(timesteps)) / total)
        outputs.append(x.to(latents.device))
    return torch.cat(outputs)
