"""Latent encoders: images in [0, 1] <-> latents, through diffusers autoencoders.

Backends (``load_encoder(name)``):

- ``taef2``: TAEF2, a tiny trained autoencoder for the FLUX.2 latent space (32 channels, /8), loaded strictly
  from ``<weights_dir>/taef2``. diffusers' ``AutoencoderTiny`` lacks TAEF2's "pool" branch (a residual
  ``Conv1x1 -> GroupNorm(4) -> ReLU -> Conv1x1`` in encoder blocks 11-13 and decoder blocks 3-5), so we add
  it; without it the weights load only non-strictly and reconstruct far worse.
- ``sd-vae``: Stable Diffusion's ``AutoencoderKL`` (4 channels, scaling 0.18215) from ``<weights_dir>/sd-vae``.
- ``PATH``: a diffusers directory holding an ``AutoencoderKL`` or ``AutoencoderTiny`` (``config.json``; a full
  pipeline directory with a ``vae/`` sub-folder works too), or a folder with ``taef2_{encoder,decoder}.pth``.
- ``org/name``: a hub id, for hosts whose Hugging Face cache holds it.

Small images are upsampled before encoding: these autoencoders downsample by 8 and were trained on large
images (TAEF2 reconstructs CIFAR much better at 64 px than at 32 px), so 28/32 px datasets encode at 64 px by
default.
Grayscale images are repeated to RGB and decoded back to one channel by averaging.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F

from distill.config import get_settings
from distill.errors import DistillError

BUILTIN_ENCODERS = ("taef2", "sd-vae")
SD_VAE_SCALE = 0.18215
TAEF2_ENCODER_POOL_LAYERS = (11, 12, 13)  # diffusers EncoderTiny.layers indices (same as the .pth indices)
TAEF2_DECODER_POOL_LAYERS = (2, 3, 4)  # diffusers DecoderTiny.layers indices (.pth index - 1: no clamp module)


# --------------------------------------------------------------------------------------------- TAEF2
class PoolBranch(nn.Sequential):
    """TAEF2's extra residual branch: Conv1x1 (x4 channels) -> GroupNorm(4) -> ReLU -> Conv1x1."""

    def __init__(self, channels: int, expansion: int = 4, groups: int = 4):
        hidden = channels * expansion
        super().__init__(
            nn.Conv2d(channels, hidden, 1, bias=False),
            nn.GroupNorm(groups, hidden),
            nn.ReLU(),
            nn.Conv2d(hidden, channels, 1, bias=False),
        )


class PooledTinyBlock(nn.Module):
    """An ``AutoencoderTinyBlock`` preceded by ``x + pool(x)``; keeps the block's ``conv``/``skip``/``fuse``
    attribute names so the original state-dict keys (``layers.k.conv.*``, ``layers.k.pool.*``) load as is."""

    def __init__(self, block: nn.Module, channels: int):
        super().__init__()
        self.conv: nn.Module = block.get_submodule("conv")
        self.skip: nn.Module = block.get_submodule("skip")
        self.fuse: nn.Module = block.get_submodule("fuse")
        self.pool = PoolBranch(channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.pool(x)
        return self.fuse(self.conv(x) + self.skip(x))


def build_taef2(weights: Path | None = None):
    """diffusers ``AutoencoderTiny(latent_channels=32)`` patched with the pool branch; loads weights strictly."""
    from diffusers import AutoencoderTiny

    model: Any = AutoencoderTiny(latent_channels=32)  # diffusers' stubs hide encoder/decoder/load_state_dict
    for index in TAEF2_ENCODER_POOL_LAYERS:
        model.encoder.layers[index] = PooledTinyBlock(model.encoder.layers[index], 64)
    for index in TAEF2_DECODER_POOL_LAYERS:
        model.decoder.layers[index] = PooledTinyBlock(model.decoder.layers[index], 64)
    if weights is not None:
        state = taef2_state_dict(weights)
        model.load_state_dict(state, strict=True)
    return model


def taef2_state_dict(folder: Path) -> dict[str, torch.Tensor]:
    """TAEF2's two ``nn.Sequential`` state dicts mapped onto ``AutoencoderTiny`` keys (fp32).

    Encoder ``k.rest`` -> ``encoder.layers.k.rest``; decoder ``i.rest`` -> ``decoder.layers.(i-1).rest``
    (the reference decoder's index 0 is a parameter-free clamp, which diffusers applies in ``forward``).
    """
    enc_path, dec_path = folder / "taef2_encoder.pth", folder / "taef2_decoder.pth"
    for path in (enc_path, dec_path):
        if not path.is_file():
            raise DistillError(f"missing TAEF2 weights: {path} (see weights/taef2/README.md)")
    state: dict[str, torch.Tensor] = {}
    for key, value in torch.load(enc_path, map_location="cpu", weights_only=True).items():
        state[f"encoder.layers.{key}"] = value.float()
    for key, value in torch.load(dec_path, map_location="cpu", weights_only=True).items():
        index, rest = key.split(".", 1)
        state[f"decoder.layers.{int(index) - 1}.{rest}"] = value.float()
    return state


# --------------------------------------------------------------------------------------------- wrapper
def default_dtype(device: torch.device) -> torch.dtype:
    """fp32 on CPU (half precision is slow there); bf16 on CUDA when supported, else fp16."""
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.float32


def resolve_task_device(name: str | torch.device = "auto") -> torch.device:
    """A device name as a concrete device: ``auto`` is this process's current CUDA device (the GPU its task was
    given) or the CPU, and an index-less ``cuda`` gets the current index (models cached per device stay put)."""
    from distill.runner import resolve_device

    device = resolve_device(str(name))
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    return device


def round_to_multiple(value: int, multiple: int = 8) -> int:
    return max(multiple, int(round(value / multiple)) * multiple)


@dataclass
class LatentEncoder:
    """An autoencoder with a fixed encode resolution. ``encode``/``decode`` are batched and run without grad.

    ``encode_fn(x)`` maps [-1, 1] RGB at ``resolution`` to latents; ``decode_fn(z)`` maps back to [-1, 1].
    """

    name: str
    key: str  # short filesystem-safe identity (cache keys)
    latent_channels: int
    downsample: int
    resolution: int
    device: torch.device
    dtype: torch.dtype
    encode_fn: Callable[[torch.Tensor], torch.Tensor]
    decode_fn: Callable[[torch.Tensor], torch.Tensor]
    batch_size: int = 64
    module: nn.Module | None = None
    activation_bytes_per_image: int = 0  # estimated peak activations of one image (0: not bounded)

    @property
    def latent_shape(self) -> tuple[int, int, int]:
        side = self.resolution // self.downsample
        return (self.latent_channels, side, side)

    def bounded_batch(self, batch_size: int) -> int:
        """``batch_size`` lowered so that one batch's activations fit the memory budget (CPU: the
        ``autoencoder_memory_gb`` setting; CUDA: half the free device memory)."""
        if self.activation_bytes_per_image <= 0:
            return batch_size
        if self.device.type == "cuda":
            budget = torch.cuda.mem_get_info(self.device)[0] / 2
        else:
            from distill.config import get_settings

            budget = get_settings().autoencoder_memory_gb * 2**30
        return max(1, min(batch_size, int(budget // self.activation_bytes_per_image)))

    def prepare(self, images: torch.Tensor) -> torch.Tensor:
        """Images -> float32 [-1, 1] RGB at the encode resolution, on the encoder's device.

        ``uint8`` batches (0-255, what the loader yields) travel as uint8, a quarter of fp32's bytes (without
        blocking when pinned), and are converted, scaled, repeated to RGB and resized on the device; float
        batches are [0, 1]. N x C x H x W, C = 1 or 3, any size."""
        if images.ndim != 4:
            raise DistillError(f"images must be N x C x H x W, got shape {tuple(images.shape)}")
        if images.shape[1] not in (1, 3):
            raise DistillError(f"encoders take 1- or 3-channel images, got {images.shape[1]} channels")
        x = images.to(self.device, non_blocking=images.device.type == "cpu" and images.is_pinned())
        x = x.float().div_(255.0) if images.dtype == torch.uint8 else x.float()
        if x.shape[1] == 1:
            x = x.repeat(1, 3, 1, 1)
        if x.shape[-2:] != (self.resolution, self.resolution):
            x = resize(x, self.resolution)
        return x.clamp(0, 1).mul(2).sub(1)

    @torch.inference_mode()
    def encode(self, images: torch.Tensor, batch_size: int | None = None) -> torch.Tensor:
        """Images (uint8 0-255 or float [0, 1], see :meth:`prepare`) -> float32 CPU latents N x C x R/8 x R/8."""
        batch_size = self.bounded_batch(batch_size or self.batch_size)
        out = []
        for start in range(0, len(images), batch_size):
            x = self.prepare(images[start : start + batch_size]).to(self.dtype)
            out.append(self.encode_fn(x).float().cpu())
        if not out:
            return torch.empty((0, *self.latent_shape))
        return torch.cat(out)

    @torch.inference_mode()
    def decode(
        self,
        latents: torch.Tensor,
        channels: int = 3,
        size: int | None = None,
        batch_size: int | None = None,
    ) -> torch.Tensor:
        """Latents -> float32 CPU images in [0, 1] with ``channels`` (1: channel mean) at ``size`` px."""
        batch_size = self.bounded_batch(batch_size or self.batch_size)
        out = []
        for start in range(0, len(latents), batch_size):
            z = latents[start : start + batch_size].to(self.device, self.dtype)
            x = self.decode_fn(z).float().cpu().add(1).div(2)
            if channels == 1:
                x = x.mean(1, keepdim=True)
            if size is not None and x.shape[-1] != size:
                x = resize(x, size)
            out.append(x.clamp(0, 1))
        if not out:
            side = size or self.resolution
            return torch.empty((0, channels, side, side))
        return torch.cat(out)


def resize(x: torch.Tensor, size: int) -> torch.Tensor:
    """Bilinear resize; antialiased when shrinking (decoded images back to 28/32 px)."""
    shrink = x.shape[-1] > size
    return F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False, antialias=shrink)


POLICY_SOURCE_SIZE = 256  # files at least this large (short side) encode at this resolution (DiT / ADM)
RESOLUTION_POLICY = (
    "ImageNet / ImageFolder sets whose files are >= 256 px encode at 256 px (short-side resize + centre crop of "
    "each file, DiT/ADM's preprocessing: SD-VAE 4x32x32, TAEF2 32x32x32 latents); otherwise TAEF2 uses 64 px "
    "for <= 32 px sets and the image size rounded to a multiple of 8 (>= 64) above, SD-VAE 256 px for <= 64 px "
    "sets and the image size rounded to 8 above; resolution=N overrides"
)


def default_resolution(encoder: str, image_size: int, source_size: int | None = None) -> int:
    """Encode resolution by :data:`RESOLUTION_POLICY` (``source_size``: short side of the dataset's files when
    they are larger than ``image_size``, as for ImageNet and big ImageFolders)."""
    if source_size is not None and source_size >= POLICY_SOURCE_SIZE:
        return POLICY_SOURCE_SIZE
    if encoder == "sd-vae":
        return 256 if image_size <= 64 else round_to_multiple(image_size)
    if image_size <= 32:
        return 64
    return max(64, round_to_multiple(image_size))


def _path_key(path: Path) -> str:
    digest = hashlib.sha256(str(path.resolve()).encode()).hexdigest()[:8]
    safe = "".join(c if c.isalnum() or c in "-_" else "_" for c in path.name)[:24] or "vae"
    return f"{safe}-{digest}"


def _weights_dir() -> Path:
    settings = get_settings()
    if settings.weights_dir is None:
        raise DistillError("DISTILL_WEIGHTS_DIR is not set: point it at the folder holding taef2/, sd-vae/ ...")
    return settings.weights_dir.expanduser()


def _to(model: nn.Module, device: torch.device, dtype: torch.dtype) -> nn.Module:
    model = model.to(device)
    if next(model.parameters()).dtype != dtype:
        model = model.to(dtype=dtype)
    return model.eval().requires_grad_(False)


def _wrap_taef2(model, name: str, key: str, resolution: int, device: torch.device, dtype: torch.dtype,
                batch_size: int) -> LatentEncoder:
    model = _to(model, device, dtype)
    # EncoderTiny maps [-1, 1] -> [0, 1] itself; DecoderTiny clamps and maps back to [-1, 1].
    return LatentEncoder(
        name=name, key=key, latent_channels=model.config.latent_channels, downsample=8, resolution=resolution,
        device=device, dtype=dtype, encode_fn=model.encoder, decode_fn=model.decoder, batch_size=batch_size,
        module=model,
    )


def wrap_autoencoder_kl(vae, name: str, key: str, resolution: int, device: torch.device,
                        dtype: torch.dtype, batch_size: int) -> LatentEncoder:
    """AutoencoderKL: posterior mean (deterministic, cacheable) times the scaling factor; decode divides it.
    (D4M samples the posterior; its std is tiny for SD's VAE.)"""
    vae = _to(vae, device, dtype)
    scale = float(getattr(vae.config, "scaling_factor", None) or SD_VAE_SCALE)
    shift = float(getattr(vae.config, "shift_factor", None) or 0.0)
    downsample = 2 ** (len(vae.config.block_out_channels) - 1)

    def encode_fn(x: torch.Tensor) -> torch.Tensor:
        return (vae.encode(x).latent_dist.mean - shift) * scale

    def decode_fn(z: torch.Tensor) -> torch.Tensor:
        return vae.decode(z / scale + shift).sample

    # About 5 full-resolution activations of the first stage's width live at the peak of encode and of decode
    # (SD's VAE shape; docs/IMAGENET.md).
    element = torch.finfo(dtype).bits // 8
    per_image = 5 * resolution**2 * int(vae.config.block_out_channels[0]) * element
    return LatentEncoder(
        name=name, key=key, latent_channels=vae.config.latent_channels, downsample=downsample,
        resolution=resolution, device=device, dtype=dtype, encode_fn=encode_fn, decode_fn=decode_fn,
        batch_size=batch_size, module=vae, activation_bytes_per_image=per_image,
    )


def _load_diffusers_dir(folder: Path, name: str, key: str, resolution: int, device, dtype, batch_size):
    if (folder / "taef2_encoder.pth").is_file():
        return _wrap_taef2(build_taef2(folder), name, key, resolution, device, dtype, batch_size)
    if not (folder / "config.json").is_file() and (folder / "vae" / "config.json").is_file():
        folder = folder / "vae"
    config_path = folder / "config.json"
    if not config_path.is_file():
        raise DistillError(f"{folder}: not a diffusers autoencoder directory (no config.json, no vae/config.json)")
    class_name = json.loads(config_path.read_text()).get("_class_name", "")
    from diffusers import AutoencoderKL, AutoencoderTiny

    try:
        if class_name == "AutoencoderTiny":
            model = AutoencoderTiny.from_pretrained(folder)
            return _wrap_taef2(model, name, key, resolution, device, dtype, batch_size)
        if class_name == "AutoencoderKL":
            vae = AutoencoderKL.from_pretrained(folder)
            return wrap_autoencoder_kl(vae, name, key, resolution, device, dtype, batch_size)
    except (OSError, ValueError, RuntimeError) as exc:
        raise DistillError(f"{folder}: cannot load {class_name}: {str(exc).splitlines()[0]}") from exc
    raise DistillError(f"{folder}: unsupported autoencoder class '{class_name}' (AutoencoderKL or AutoencoderTiny)")


def load_encoder(
    name: str,
    *,
    image_size: int = 32,
    resolution: int | None = None,
    device: torch.device | str = "cpu",
    dtype: torch.dtype | None = None,
    batch_size: int = 64,
    source_size: int | None = None,
) -> LatentEncoder:
    """Load an encoder by name (``taef2``, ``sd-vae``), directory path or hub id; see the module docstring."""
    device = torch.device(device)
    dtype = dtype or default_dtype(device)
    kind = name if name in BUILTIN_ENCODERS else "path"
    resolution = resolution or default_resolution(kind, image_size, source_size)
    if resolution < 8 or resolution % 8:
        raise DistillError(f"encode resolution must be a positive multiple of 8, got {resolution}")
    if name == "taef2":
        folder = _weights_dir() / "taef2"
        if not folder.is_dir():
            raise DistillError(f"missing weights directory for taef2: {folder}")
        return _wrap_taef2(build_taef2(folder), "taef2", "taef2", resolution, device, dtype, batch_size)
    if name == "sd-vae":
        folder = _weights_dir() / "sd-vae"
        if not folder.is_dir():
            raise DistillError(
                f"missing weights directory for sd-vae: {folder} (put a diffusers AutoencoderKL there, "
                "e.g. stabilityai/sd-vae-ft-mse, or pass encoder=PATH)"
            )
        return _load_diffusers_dir(folder, "sd-vae", "sd-vae", resolution, device, dtype, batch_size)
    path = Path(name).expanduser()
    if path.is_dir():
        return _load_diffusers_dir(path, str(path), _path_key(path), resolution, device, dtype, batch_size)
    looks_like_hub_id = name.count("/") == 1 and not name.startswith((".", "/", "~")) and " " not in name
    if not looks_like_hub_id:
        raise DistillError(f"unknown encoder '{name}': use {', '.join(BUILTIN_ENCODERS)}, a directory or a hub id")
    from diffusers import AutoencoderKL

    try:
        vae = AutoencoderKL.from_pretrained(name)
    except Exception as exc:  # hub/network errors come in many types
        raise DistillError(f"unknown encoder '{name}': not a directory and not loadable from the hub cache "
                           f"({type(exc).__name__})") from exc
    key = "hub-" + "".join(c if c.isalnum() or c in "-_" else "_" for c in name)[:40]
    return wrap_autoencoder_kl(vae, name, key, resolution, device, dtype, batch_size)


def psnr(a: torch.Tensor, b: torch.Tensor) -> float:
    """Peak signal-to-noise ratio (dB) between two [0, 1] image batches."""
    mse = float(F.mse_loss(a.float(), b.float()))
    return float("inf") if mse == 0 else 10.0 * torch.log10(torch.tensor(1.0 / mse)).item()
