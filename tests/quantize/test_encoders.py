"""Encoders on real images: TAEF2 (real pretrained weights) round trips at the README's measured quality, the
AutoencoderKL path through a small random diffusers config saved to disk, and the user errors."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import torch

from distill.errors import DistillError
from quantize.encoders import build_taef2, default_resolution, load_encoder, psnr, taef2_state_dict


def _images(dataset, n: int = 24) -> torch.Tensor:
    idx = np.linspace(0, len(dataset.train) - 1, n).astype(np.int64)  # spread over all classes
    return dataset.train.load(idx).float() / 255.0


@pytest.fixture(scope="module")
def taef2():
    return load_encoder("taef2", image_size=32)


def test_taef2_loads_strictly_with_the_pool_branch():
    folder = Path(os.environ["DISTILL_WEIGHTS_DIR"]) / "taef2"
    state = taef2_state_dict(folder)
    assert sum(".pool." in k for k in state) == 24  # the keys plain AutoencoderTiny cannot hold
    model = build_taef2(folder)  # strict=True inside: every key matched, none missing
    assert model.encoder.layers[11].pool[1].num_groups == 4


def test_taef2_round_trip_cifar(taef2, cifar10):
    x = _images(cifar10)
    z = taef2.encode(x)
    assert z.shape == (24, 32, 8, 8) and z.dtype == torch.float32
    # Measured at the encode resolution (README: 32.2 dB for CIFAR at 64 px) and after resizing back to 32 px.
    y64 = taef2.decode(z, channels=3, size=64)
    assert psnr(y64, taef2.prepare(x).add(1).div(2)) > 30.5
    y = taef2.decode(z, channels=3, size=32)
    assert y.shape == x.shape and 0.0 <= float(y.min()) and float(y.max()) <= 1.0
    assert psnr(y, x) > 27.0


def test_taef2_round_trip_mnist_grayscale(taef2, mnist):
    x = _images(mnist)
    assert x.shape[1] == 1
    z = taef2.encode(x)  # repeated to RGB inside
    y = taef2.decode(z, channels=1, size=28)
    assert y.shape == x.shape
    # README: MNIST 29.9 dB at 64 px (padded to 32 there; here resized straight from 28).
    ref = taef2.prepare(x).add(1).div(2).mean(1, keepdim=True)
    assert psnr(taef2.decode(z, channels=1, size=64), ref) > 28.0
    assert psnr(y, x) > 22.0


def test_resolution_policy_and_batching(taef2, cifar10):
    assert default_resolution("taef2", 28) == 64 and default_resolution("taef2", 32) == 64
    assert default_resolution("taef2", 224) == 224 and default_resolution("sd-vae", 32) == 256
    x = _images(cifar10, 10)
    whole = taef2.encode(x)
    torch.testing.assert_close(taef2.encode(x, batch_size=3), whole, rtol=1e-4, atol=1e-4)
    small = load_encoder("taef2", image_size=32, resolution=32)
    assert small.encode(x).shape == (10, 32, 4, 4)


def test_autoencoder_kl_from_a_directory(tmp_path: Path, cifar10):
    from diffusers import AutoencoderKL

    torch.manual_seed(0)
    vae = AutoencoderKL(block_out_channels=(8, 16), down_block_types=("DownEncoderBlock2D",) * 2,
                        up_block_types=("UpDecoderBlock2D",) * 2, latent_channels=4, norm_num_groups=4,
                        sample_size=32, scaling_factor=0.18215)
    vae.save_pretrained(tmp_path / "pipe" / "vae")  # a pipeline layout: the vae/ sub-folder is found
    encoder = load_encoder(str(tmp_path / "pipe"), image_size=32, resolution=32)
    assert encoder.downsample == 2 and encoder.latent_shape == (4, 16, 16)
    x = _images(cifar10, 6)
    z = encoder.encode(x)
    assert z.shape == (6, 4, 16, 16)
    with torch.no_grad():
        expected = vae.encode(x.mul(2).sub(1)).latent_dist.mean * 0.18215
    torch.testing.assert_close(z, expected, rtol=1e-4, atol=1e-5)
    y = encoder.decode(z, channels=3, size=32)
    assert y.shape == x.shape and float(y.min()) >= 0 and float(y.max()) <= 1
    assert encoder.key != load_encoder(str(tmp_path / "pipe" / "vae"), resolution=32).key


def test_autoencoder_batches_are_bounded_by_the_memory_budget(tmp_path: Path, cifar10, monkeypatch):
    """An SD-VAE-sized batch at 256 px would need ~11 GB of activations on the CPU: the batch is lowered to fit
    DISTILL_AUTOENCODER_MEMORY_GB (results unchanged: the same latents in smaller batches)."""
    from diffusers import AutoencoderKL

    from distill.config import reload_settings

    torch.manual_seed(0)
    AutoencoderKL(block_out_channels=(8, 16), down_block_types=("DownEncoderBlock2D",) * 2,
                  up_block_types=("UpDecoderBlock2D",) * 2, latent_channels=4, norm_num_groups=4,
                  sample_size=32).save_pretrained(tmp_path / "vae")
    encoder = load_encoder(str(tmp_path / "vae"), image_size=32, resolution=32, batch_size=64)
    assert encoder.activation_bytes_per_image == 5 * 32 * 32 * 8 * 4
    monkeypatch.setenv("DISTILL_AUTOENCODER_MEMORY_GB", str(3 * encoder.activation_bytes_per_image / 2**30))
    reload_settings()
    assert encoder.bounded_batch(64) == 3 and encoder.bounded_batch(2) == 2
    x = _images(cifar10, 7)
    torch.testing.assert_close(encoder.encode(x), encoder.encode(x, batch_size=1), rtol=1e-5, atol=1e-6)
    monkeypatch.delenv("DISTILL_AUTOENCODER_MEMORY_GB")
    reload_settings()
    assert encoder.bounded_batch(64) == 64  # 4 GB hold 64 of these small images


def test_encoder_errors(tmp_path: Path, monkeypatch):
    with pytest.raises(DistillError, match="unknown encoder"):
        load_encoder("no-such-encoder")
    with pytest.raises(DistillError, match="multiple of 8"):
        load_encoder("taef2", resolution=30)
    with pytest.raises(DistillError, match="not a diffusers autoencoder"):
        load_encoder(str(tmp_path))
    from distill.config import reload_settings

    monkeypatch.setenv("DISTILL_WEIGHTS_DIR", str(tmp_path / "nowhere"))
    reload_settings()
    try:
        with pytest.raises(DistillError, match="missing weights directory for taef2"):
            load_encoder("taef2")
        with pytest.raises(DistillError, match="missing weights directory for sd-vae"):
            load_encoder("sd-vae")
    finally:
        monkeypatch.undo()
        reload_settings()


@pytest.mark.parametrize("name", ["cifar10", "mnist"])
def test_uint8_batches_give_the_latents_of_the_cpu_float_path(taef2, name, request):
    """The loader's uint8 batches are converted, scaled and resized on the encoder's device: the same latents
    as the former path (fp32 conversion, channel repeat and resize on the CPU, then the copy)."""
    from quantize.encoders import resize

    dataset = request.getfixturevalue(name)
    idx = np.linspace(0, len(dataset.train) - 1, 8).astype(np.int64)
    u8 = dataset.train.load(idx)
    assert u8.dtype == torch.uint8
    x = u8.float() / 255.0
    x = x.repeat(1, 3, 1, 1) if x.shape[1] == 1 else x
    old = taef2.encode_fn(resize(x, taef2.resolution).clamp(0, 1).mul(2).sub(1).to(taef2.device, taef2.dtype))
    torch.testing.assert_close(taef2.encode(u8), old.float(), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(taef2.encode(u8), taef2.encode(u8.float() / 255.0), rtol=1e-5, atol=1e-5)
