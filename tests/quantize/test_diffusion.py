"""Diffusion decoding (quantize.diffusion): DiT img2img with CFG and D4M's Stable Diffusion img2img.

Pretrained DiT/SD weights are not available offline, so the models here are small random diffusers configs
saved in the real diffusers layouts; the trained-prior path on real latents is in test_prior.py.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from distill.errors import DistillError
from quantize.diffusion import LatentPrior, decode_with_prior, decode_with_stable_diffusion, img2img_timesteps

C, S, K = 32, 8, 10  # TAEF2 latents of 64 px images, 10 classes


def _save_random_dit(root: Path, *, learned_sigma: bool = False, with_meta: bool = True) -> Path:
    from diffusers import DDPMScheduler, DiTTransformer2DModel

    torch.manual_seed(0)
    model = DiTTransformer2DModel(
        num_attention_heads=2, attention_head_dim=16, in_channels=C, out_channels=2 * C if learned_sigma else C,
        num_layers=2, sample_size=S, patch_size=2, num_embeds_ada_norm=K,
    )
    # adaLN-zero starts with zeroed modulation in the reference DiT, but diffusers initialises it randomly;
    # perturb every weight so the class embedding visibly matters (guidance tests).
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    model.save_pretrained(root / "transformer")
    DDPMScheduler(num_train_timesteps=1000, beta_schedule="linear", clip_sample=False).save_pretrained(root / "scheduler")
    if with_meta:
        meta = {"dataset": "mnist", "encoder": "taef2", "resolution": 64, "num_classes": K,
                "latent_mean": [0.1] * C, "latent_std": [0.7] * C}
        (root / "prior.json").write_text(json.dumps(meta))
    return root


@pytest.fixture(scope="module")
def dit_dir(tmp_path_factory) -> Path:
    return _save_random_dit(tmp_path_factory.mktemp("dit"))


@pytest.fixture(scope="module")
def centroids() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return torch.randn(6, C, S, S, generator=g) * 0.7 + 0.1, torch.tensor([0, 1, 2, 3, 4, 9])


def test_strength_zero_returns_input_exactly(dit_dir, centroids):
    z, y = centroids
    out = decode_with_prior(z, y, dit_dir, strength=0.0, steps=50, guidance=4.0, seed=0)
    assert torch.equal(out, z)
    # steps * strength < 1 also runs no step (diffusers' img2img rounding)
    out = decode_with_prior(z, y, dit_dir, strength=0.01, steps=50, guidance=4.0, seed=0)
    assert torch.equal(out, z)


def test_strength_zero_decode_equals_vae_decode(dit_dir, centroids):
    from quantize.encoders import load_encoder

    z, y = centroids
    vae = load_encoder("taef2", image_size=28)
    direct = vae.decode(z, channels=1, size=28)
    through = vae.decode(decode_with_prior(z, y, dit_dir, strength=0.0, steps=25, guidance=2.0), channels=1, size=28)
    assert torch.equal(direct, through)
    assert direct.shape == (6, 1, 28, 28) and 0.0 <= float(direct.min()) and float(direct.max()) <= 1.0


@pytest.mark.parametrize("scheduler", ["ddim", "dpm"])
def test_shapes_dtype_and_seed_determinism(dit_dir, centroids, scheduler):
    z, y = centroids
    kwargs = dict(strength=0.6, steps=10, guidance=3.0, scheduler=scheduler, batch_size=4)
    a = decode_with_prior(z, y, dit_dir, seed=3, **kwargs)
    b = decode_with_prior(z, y, dit_dir, seed=3, **kwargs)
    c = decode_with_prior(z, y, dit_dir, seed=4, **kwargs)
    assert a.shape == z.shape and a.dtype == torch.float32 and a.device == z.device
    assert torch.isfinite(a).all()
    assert torch.equal(a, b)  # same seed, same result (batching at 4 splits the 6 latents in two chunks)
    assert (a - c).abs().mean() > 1e-3  # a different seed draws different noise
    assert (a - z).abs().mean() > 1e-3  # strength 0.6 really changes the latents


def test_batching_does_not_change_the_result_per_seed(dit_dir, centroids):
    z, y = centroids
    a = decode_with_prior(z, y, dit_dir, strength=0.5, steps=6, guidance=2.0, seed=0, batch_size=64)
    b = decode_with_prior(z, y, dit_dir, strength=0.5, steps=6, guidance=2.0, seed=0, batch_size=2)
    # each latent's noise comes from its own (seed, index) generator, whatever the batch
    torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)
    # and a chunk decoded elsewhere (another GPU task) with its first global index gets the same latents
    c = decode_with_prior(z[2:], y[2:], dit_dir, strength=0.5, steps=6, guidance=2.0, seed=0, batch_size=2,
                          first_index=2)
    torch.testing.assert_close(a[2:], c, rtol=1e-4, atol=1e-4)


def test_guidance_and_labels_change_the_result(dit_dir, centroids):
    z, y = centroids
    kwargs = dict(strength=0.7, steps=8, seed=0)
    g1 = decode_with_prior(z, y, dit_dir, guidance=1.0, **kwargs)
    g4 = decode_with_prior(z, y, dit_dir, guidance=4.0, **kwargs)
    other = decode_with_prior(z, (y + 1) % K, dit_dir, guidance=1.0, **kwargs)
    assert (g1 - g4).abs().mean() > 1e-3
    assert (g1 - other).abs().mean() > 1e-3


def test_img2img_timesteps_follow_diffusers():
    from diffusers import DDIMScheduler

    sched = DDIMScheduler(num_train_timesteps=1000)
    ts = img2img_timesteps(sched, 50, 0.7, torch.device("cpu"))
    assert len(ts) == 35 and int(ts[0]) == 680  # D4M: strength 0.7 of 50 steps -> 35 denoising steps
    assert len(img2img_timesteps(sched, 50, 1.0, torch.device("cpu"))) == 50
    assert len(img2img_timesteps(sched, 50, 0.0, torch.device("cpu"))) == 0


def test_learned_sigma_checkpoint_and_no_metadata(tmp_path, centroids):
    """A DiT-style checkpoint (out_channels = 2C, no prior.json) decodes with the epsilon half."""
    root = _save_random_dit(tmp_path, learned_sigma=True, with_meta=False)
    prior = LatentPrior.load(root)
    assert prior.learned_sigma and torch.equal(prior.std, torch.ones(C))
    z, y = centroids
    out = decode_with_prior(z, y, prior, strength=0.5, steps=4, guidance=2.0, scheduler="dpm")
    assert out.shape == z.shape and torch.isfinite(out).all()


def test_half_precision_override_runs(dit_dir, centroids):
    z, y = centroids
    out = decode_with_prior(z, y, dit_dir, strength=0.5, steps=3, guidance=2.0, dtype=torch.bfloat16)
    ref = decode_with_prior(z, y, dit_dir, strength=0.5, steps=3, guidance=2.0)
    assert out.dtype == torch.float32 and (out - ref).abs().mean() < 0.1 * ref.abs().mean()


def test_bad_inputs_raise_clear_errors(tmp_path, dit_dir, centroids):
    z, y = centroids
    with pytest.raises(DistillError, match="prior directory not found"):
        decode_with_prior(z, y, tmp_path / "missing", strength=0.5, steps=4, guidance=1.0)
    with pytest.raises(DistillError, match="prior directory not found"):
        decode_with_prior(z, y, tmp_path / "missing", strength=0.0, steps=4, guidance=1.0)
    (tmp_path / "empty").mkdir()
    with pytest.raises(DistillError, match="transformer/config.json"):
        decode_with_prior(z, y, tmp_path / "empty", strength=0.5, steps=4, guidance=1.0)
    broken = tmp_path / "broken"
    (broken / "transformer").mkdir(parents=True)
    (broken / "scheduler").mkdir()
    (broken / "transformer" / "config.json").write_text("{not json")
    (broken / "scheduler" / "scheduler_config.json").write_text("{}")
    with pytest.raises(DistillError, match="cannot load the prior"):
        decode_with_prior(z, y, broken, strength=0.5, steps=4, guidance=1.0)
    with pytest.raises(DistillError, match="labels must be in"):
        decode_with_prior(z, torch.full((6,), K), dit_dir, strength=0.5, steps=4, guidance=1.0)
    with pytest.raises(DistillError, match="32-channel"):
        decode_with_prior(z[:, :4], y, dit_dir, strength=0.5, steps=4, guidance=1.0)
    with pytest.raises(DistillError, match="unknown scheduler"):
        decode_with_prior(z, y, dit_dir, strength=0.5, steps=4, guidance=1.0, scheduler="euler")
    with pytest.raises(DistillError, match="strength"):
        decode_with_prior(z, y, dit_dir, strength=1.5, steps=4, guidance=1.0)
    with pytest.raises(DistillError, match="labels"):
        decode_with_prior(z, y[:3], dit_dir, strength=0.5, steps=4, guidance=1.0)


# ------------------------------------------------------------------------------------- Stable Diffusion
def _save_tiny_stable_diffusion(root: Path) -> Path:
    """A randomly initialised SD folder in diffusers' layout: CLIP text encoder + tokenizer, UNet, PNDM."""
    from diffusers import PNDMScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    torch.manual_seed(0)
    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for ch in "abcdefghijklmnopqrstuvwxyz0123456789,":
        vocab.setdefault(ch, len(vocab))
        vocab.setdefault(ch + "</w>", len(vocab))
    tok_dir = root / "tokenizer"
    tok_dir.mkdir(parents=True)
    (tok_dir / "vocab.json").write_text(json.dumps(vocab))
    (tok_dir / "merges.txt").write_text("#version: 0.2\n")
    CLIPTokenizer(str(tok_dir / "vocab.json"), str(tok_dir / "merges.txt"), model_max_length=16).save_pretrained(tok_dir)
    text = CLIPTextConfig(vocab_size=len(vocab), hidden_size=32, intermediate_size=37, num_attention_heads=4,
                          num_hidden_layers=2, max_position_embeddings=16, bos_token_id=0, eos_token_id=1,
                          pad_token_id=1)
    CLIPTextModel(text).save_pretrained(root / "text_encoder")
    UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(32, 64),
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=32, attention_head_dim=8,
    ).save_pretrained(root / "unet")
    # SD v1.5's shipped scheduler settings (D4M decodes with it)
    PNDMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", skip_prk_steps=True,
                  set_alpha_to_one=False, steps_offset=1).save_pretrained(root / "scheduler")
    return root


@pytest.fixture(scope="module")
def sd_dir(tmp_path_factory) -> Path:
    return _save_tiny_stable_diffusion(tmp_path_factory.mktemp("sd"))


def test_stable_diffusion_img2img_d4m_recipe(sd_dir):
    from quantize.diffusion import StableDiffusionParts

    z = torch.randn(3, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    names = ["zero", "one", "two"]
    parts = StableDiffusionParts.load(sd_dir)
    assert type(parts.make_scheduler(None)).__name__ == "PNDMScheduler"
    a = decode_with_stable_diffusion(z, names, parts, steps=10, seed=0, batch_size=2)  # strength 0.7, cfg 8
    b = decode_with_stable_diffusion(z, names, sd_dir, steps=10, seed=0)
    assert a.shape == z.shape and a.dtype == torch.float32 and torch.isfinite(a).all()
    torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)
    assert (a - z).abs().mean() > 1e-3
    no_cfg = decode_with_stable_diffusion(z, names, parts, steps=10, seed=0, guidance=1.0)
    assert (a - no_cfg).abs().mean() > 1e-4
    dpm = decode_with_stable_diffusion(z, names, parts, steps=10, seed=0, scheduler="dpm")
    assert dpm.shape == z.shape and torch.isfinite(dpm).all()
    assert torch.equal(decode_with_stable_diffusion(z, names, parts, strength=0.0), z)


def test_stable_diffusion_errors(tmp_path, sd_dir):
    z = torch.randn(2, 4, 8, 8)
    with pytest.raises(DistillError, match="not found"):
        decode_with_stable_diffusion(z, ["a", "b"], tmp_path / "nope")
    (tmp_path / "half").mkdir()
    (tmp_path / "half" / "unet").mkdir()
    with pytest.raises(DistillError, match="no text_encoder/"):
        decode_with_stable_diffusion(z, ["a", "b"], tmp_path / "half")
    with pytest.raises(DistillError, match="class names"):
        decode_with_stable_diffusion(z, ["a"], sd_dir)
    with pytest.raises(DistillError, match="4-channel"):
        decode_with_stable_diffusion(torch.randn(2, 3, 8, 8), ["a", "b"], sd_dir, steps=4)
