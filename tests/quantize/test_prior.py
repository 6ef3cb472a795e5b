"""The trained latent prior (quantize.prior) on real MNIST TAEF2 latents, its saved diffusers folder, and
``distill prior train``."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from distill.errors import DistillError
from quantize.diffusion import LatentPrior, decode_with_prior
from quantize.prior import PriorConfig, load_dataset_latents, train_prior_on_latents

TINY = PriorConfig(num_layers=2, num_attention_heads=2, attention_head_dim=32)


@pytest.fixture(scope="module")
def mnist_latents():
    """500 real MNIST training images (the seeded 50-per-class sample) encoded by TAEF2 at 64 px into
    32 x 8 x 8 latents; the same latent-cache folder as conftest's ``mnist_store``, so encoded once."""
    return load_dataset_latents("mnist", "taef2", max_per_class=50, seed=0)


@pytest.fixture(scope="module")
def trained(mnist_latents, tmp_path_factory):
    latents, labels, num_classes, meta = mnist_latents
    out = tmp_path_factory.mktemp("priors") / "mnist-taef2-64"
    return train_prior_on_latents(latents, labels, num_classes, out, iterations=60, batch_size=64, lr=2e-3,
                                  config=TINY, seed=0, meta=meta)


def test_latents_are_real_taef2_latents(mnist_latents):
    latents, labels, num_classes, meta = mnist_latents
    assert latents.shape == (500, 32, 8, 8) and latents.dtype == torch.float32
    assert num_classes == 10 and torch.equal(torch.bincount(labels), torch.full((10,), 50))
    assert meta["resolution"] == 64 and meta["encoder"] == "taef2" and meta["dataset"] == "mnist"
    assert 0.2 < float(latents.std()) < 3.0  # real encodings, not zeros


def test_training_loss_decreases_on_real_latents(trained):
    # a fixed held-out batch (same t and noise): the untrained model is far above 1, training cuts it a lot
    assert trained.eval_loss_start > 1.0
    assert trained.eval_loss_end < 0.75 * trained.eval_loss_start
    first, last = sum(trained.losses[:10]) / 10, sum(trained.losses[-10:]) / 10
    assert last < 0.8 * first
    assert len(trained.losses) == 60


def test_saved_folder_is_diffusers_format(trained, mnist_latents):
    from diffusers import DDPMScheduler, DiTTransformer2DModel

    latents = mnist_latents[0]
    root = trained.path
    model = DiTTransformer2DModel.from_pretrained(root / "transformer")
    assert model.config.num_embeds_ada_norm == 10 and model.config.in_channels == model.config.out_channels == 32
    assert model.config.sample_size == 8
    assert DDPMScheduler.from_pretrained(root / "scheduler").config.num_train_timesteps == 1000
    meta = json.loads((root / "prior.json").read_text())
    assert meta["dataset"] == "mnist" and meta["encoder"] == "taef2" and meta["resolution"] == 64
    assert meta["null_class"] == 10 and meta["latent_shape"] == [32, 8, 8]
    mean = torch.tensor(meta["latent_mean"])
    torch.testing.assert_close(mean, latents.mean((0, 2, 3)), rtol=1e-4, atol=1e-4)
    assert not any(p.name.startswith(".") for p in root.parent.iterdir())  # no temp folders left behind


def test_decode_through_trained_prior(trained, mnist_latents):
    from quantize.encoders import load_encoder

    latents, labels = mnist_latents[0], mnist_latents[1]
    # class means: what k-means at IPC 1 would produce
    z = torch.stack([latents[labels == c].mean(0) for c in range(10)])
    y = torch.arange(10)
    prior = LatentPrior.load(trained.path)
    assert torch.equal(decode_with_prior(z, y, prior, strength=0.0, steps=20, guidance=2.0), z)
    out = decode_with_prior(z, y, prior, strength=0.4, steps=20, guidance=2.0, scheduler="dpm", seed=0)
    assert out.shape == z.shape and torch.isfinite(out).all()
    # denoising stays in the latent distribution's range (per-channel scale close to the data's)
    assert 0.3 < float(out.std()) / float(latents.std()) < 3.0
    images = load_encoder("taef2", image_size=28).decode(out, channels=1, size=28)
    assert images.shape == (10, 1, 28, 28) and 0.0 <= float(images.min()) and float(images.max()) <= 1.0


def test_retraining_replaces_the_folder_atomically(trained, mnist_latents, tmp_path):
    latents, labels, num_classes, meta = mnist_latents
    out = tmp_path / "p"
    first = train_prior_on_latents(latents[:40], labels[:40], num_classes, out, iterations=2, batch_size=8,
                                   config=TINY, meta=meta)
    second = train_prior_on_latents(latents[:40], labels[:40], num_classes, out, iterations=3, batch_size=8,
                                    config=TINY, meta=meta)
    assert first.path == second.path == out
    assert json.loads((out / "prior.json").read_text())["training"]["iterations"] == 3
    assert sorted(p.name for p in tmp_path.iterdir()) == ["p"]


def test_bad_training_inputs(tmp_path):
    z = torch.randn(8, 32, 8, 8)
    with pytest.raises(DistillError, match="labels must be in"):
        train_prior_on_latents(z, torch.full((8,), 10), 10, tmp_path / "x", iterations=1)
    with pytest.raises(DistillError, match="8 latents but 7 labels"):
        train_prior_on_latents(z, torch.zeros(7), 10, tmp_path / "x", iterations=1)
    with pytest.raises(DistillError, match="divisible"):
        train_prior_on_latents(torch.randn(8, 32, 7, 7), torch.zeros(8), 10, tmp_path / "x", iterations=1)
    with pytest.raises(DistillError, match="unknown encoder"):
        load_dataset_latents("mnist", "no-such-encoder", max_per_class=2)
    assert not (tmp_path / "x").exists()


def test_cli_prior_train(tmp_path):
    from typer.testing import CliRunner

    from distill.cli import app

    out = tmp_path / "cli-prior"
    result = CliRunner().invoke(app, [
        "prior", "train", "--dataset", "mnist", "--encoder", "taef2", "--iterations", "3", "--batch-size", "16",
        "--max-per-class", "3", "--layers", "1", "--heads", "2", "--head-dim", "16", "--out", str(out),
        "--device", "cpu", "--quiet",
    ])
    assert result.exit_code == 0, result.output
    assert result.stdout.strip().splitlines()[-1] == str(out)
    meta = json.loads((out / "prior.json").read_text())
    assert meta["training"]["images"] == 30 and meta["training"]["iterations"] == 3
    assert (out / "transformer" / "config.json").is_file()


def test_cli_prior_train_errors(tmp_path):
    from typer.testing import CliRunner

    from distill.cli import app

    result = CliRunner().invoke(app, ["prior", "train", "--dataset", "nope", "--out", str(tmp_path / "o")])
    assert result.exit_code == 2 and "error:" in result.output


def test_default_output_folder(distill_home):
    from quantize.prior import default_prior_dir

    assert default_prior_dir("mnist", "taef2", 64) == Path(distill_home) / "priors" / "mnist-taef2-64"


def test_streamed_sources_train_the_same_prior(mnist_latents, tmp_path):
    """The same seed gives the same prior whether the latents are an in-memory tensor, a memory-mapped array
    or the latent cache's shards (each step reads only its mini-batch)."""
    from quantize.latent_cache import latents_for_dataset

    latents, labels, num_classes, meta = mnist_latents
    rows = latents_for_dataset("mnist", "taef2", max_per_class=50, seed=0).latent_rows()
    np.save(tmp_path / "z.npy", latents.half().numpy())  # the cache stores fp16: the same values
    mapped = np.load(tmp_path / "z.npy", mmap_mode="r")
    kwargs = {"iterations": 4, "batch_size": 32, "lr": 2e-3, "config": TINY, "seed": 5, "meta": meta, "eval_size": 64}
    runs = [train_prior_on_latents(source, y, num_classes, tmp_path / name, **kwargs)
            for name, source, y in (("memory", latents, labels), ("mapped", mapped, labels.numpy()),
                                    ("cache", rows, rows.labels))]
    for other in runs[1:]:
        assert other.losses == runs[0].losses
        assert (other.eval_loss_start, other.eval_loss_end) == (runs[0].eval_loss_start, runs[0].eval_loss_end)
        assert other.meta["latent_mean"] == runs[0].meta["latent_mean"]


def test_chunked_latent_stats_equal_one_pass(mnist_latents, monkeypatch):
    import quantize.prior as prior

    latents = mnist_latents[0]
    mean, std = prior.latent_stats(latents)
    monkeypatch.setattr(prior, "STATS_CHUNK_BYTES", 7 * 4 * 32 * 8 * 8)  # 7 rows a chunk: 72 chunks
    chunked_mean, chunked_std = prior.latent_stats(latents, one_pass_bytes=0)
    torch.testing.assert_close(chunked_mean, mean, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(chunked_std, std, rtol=1e-5, atol=1e-6)
