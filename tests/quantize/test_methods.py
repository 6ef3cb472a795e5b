"""``oq`` and ``d4m`` end to end on a real MNIST slice (TAEF2 latents), through the CLI and the runner."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from distill.archive import read_archive
from distill.cli import app
from distill.runner import RunRequest, run_to_archive

runner = CliRunner()


def invoke(*args):
    return runner.invoke(app, [str(a) for a in args])


@pytest.fixture(scope="module")
def oq_archive(tmp_path_factory, mnist_store) -> Path:
    out = tmp_path_factory.mktemp("oq") / "mnist-oq-10.tar"
    result = invoke("run", "oq", "-d", "mnist", "--ipc", 10, "-o", out, "--max-per-class", 50, "--seed", 0, "-q",
                    "--set", "refine_iterations=0")  # the plain quantizer; refinement has its own test
    assert result.exit_code == 0, result.output
    return out


def test_oq_run_then_eval(oq_archive: Path, mnist_store):
    archive = read_archive(oq_archive)
    d, manifest = archive.distilled, archive.manifest
    assert d.images.shape == (100, 1, 28, 28) and d.images.dtype == torch.uint8  # decoded latents: 8-bit, format 2
    assert archive.manifest["format_version"] == 2 and float(d.pixels().max()) <= 1
    assert torch.equal(d.labels, torch.arange(10).repeat_interleave(10))
    metrics = manifest["metrics"]
    assert metrics["latent_cache"] == mnist_store.folder.name  # the session's cache was reused, not re-encoded
    assert metrics["resolution"] == 64 and metrics["latent_shape"] == [32, 8, 8]
    assert metrics["kmeans_backend_requested"] == "auto" and metrics["kmeans_backend"] == "faiss"  # installed here
    # weights are the cluster masses (counts / class size), stored at mean 1.0 (the archive contract): mass x ipc
    counts = torch.tensor(metrics["counts"], dtype=torch.float32)
    assert (counts.sum(1) == 50).all()
    torch.testing.assert_close(d.weights.view(10, 10), counts / 50 * 10)
    # with the same centroids, uniform weights can only be worse (the Voronoi masses are optimal)
    for weighted, uniform in zip(metrics["w2_weighted"], metrics["w2_uniform"], strict=True):
        assert weighted <= uniform + 1e-6
    assert metrics["w2_reduction_pct"] > 0
    assert d.extras["latents"].shape == (100, 32, 8, 8)

    result = invoke("eval", oq_archive, "--runs", 1, "--epochs", 10, "--test-limit", 500, "--json", "--device", "cpu")
    assert result.exit_code == 0, result.output
    payload = json.loads(result.output.strip().splitlines()[-1])
    # 100 cell members (the default decode=nearest) of 500 real digits, 10 epochs: far above chance (10 %)
    assert payload["accuracy_mean"] > 60, payload


def test_d4m_reuses_the_cache_and_is_unweighted(tmp_path: Path, oq_archive: Path):
    out = tmp_path / "d4m.tar"
    result = invoke("run", "d4m", "-d", "mnist", "--ipc", 5, "-o", out, "--max-per-class", 50, "-q")
    assert result.exit_code == 0, result.output
    archive = read_archive(out)
    assert archive.distilled.weights is None and archive.distilled.images.shape == (50, 1, 28, 28)
    metrics = archive.manifest["metrics"]
    assert metrics["kmeans_backend"] == "sklearn-partial-fit"
    assert metrics["latent_cache"] == read_archive(oq_archive).manifest["metrics"]["latent_cache"]
    assert archive.manifest["timings"]["encode"] < 10  # nothing encoded: the cache was complete


def test_stages_resume_from_checkpoints(tmp_path: Path, mnist_store):
    request = RunRequest("mnist", "oq", 3, {"weighted": False, "w2_uniform": False, "refine_iterations": 0}, seed=0,
                         max_per_class=50)
    first = run_to_archive(request, tmp_path / "a.tar", checkpoint_dir=tmp_path / "ckpt")
    assert {"encode", "quantize", "decode"} <= set(first.manifest["timings"])
    assert first.distilled.weights is None
    again = run_to_archive(request, tmp_path / "b.tar", checkpoint_dir=tmp_path / "ckpt")
    assert "quantize" not in again.manifest["timings"]  # loaded from the stage checkpoint
    assert torch.equal(first.distilled.images, again.distilled.images)


def _tiny_prior(root: Path) -> Path:
    """A small random class-conditional DiT over TAEF2 latents (32 x 8 x 8), in the prior directory layout."""
    from diffusers import DDPMScheduler, DiTTransformer2DModel

    torch.manual_seed(0)
    DiTTransformer2DModel(num_attention_heads=2, attention_head_dim=8, in_channels=32, out_channels=32,
                          num_layers=1, sample_size=8, patch_size=2, num_embeds_ada_norm=10
                          ).save_pretrained(root / "transformer")
    DDPMScheduler(num_train_timesteps=1000, clip_sample=False).save_pretrained(root / "scheduler")
    meta = {"dataset": "mnist", "encoder": "taef2", "resolution": 64, "num_classes": 10,
            "latent_mean": [0.0] * 32, "latent_std": [1.0] * 32}
    (root / "prior.json").write_text(json.dumps(meta))
    return root


def test_diffusion_decode_strength_zero_equals_vae_decode(tmp_path: Path, mnist_store):
    prior = _tiny_prior(tmp_path / "prior")
    base = {"w2_uniform": False, "refine_iterations": 0}
    vae = run_to_archive(RunRequest("mnist", "oq", 2, {**base, "decode": "vae"}, max_per_class=50),
                         tmp_path / "v.tar").distilled
    zero = run_to_archive(RunRequest("mnist", "oq", 2, {**base, "decode": "diffusion", "prior": str(prior),
                                                        "strength": 0.0}, max_per_class=50), tmp_path / "z.tar")
    assert torch.equal(zero.distilled.images, vae.images)
    noisy = run_to_archive(RunRequest("mnist", "oq", 2, {**base, "decode": "diffusion", "prior": str(prior),
                                                         "strength": 0.5, "steps": 4}, max_per_class=50),
                           tmp_path / "n.tar").distilled
    assert noisy.images.shape == vae.images.shape and noisy.images.dtype == torch.uint8
    assert not torch.equal(noisy.images, vae.images)


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["oq", "--ipc", 10, "--max-per-class", 5], "larger than the smallest class"),
        (["oq", "--ipc", 1, "--max-per-class", 5, "--set", "encoder=no-such-encoder"], "unknown encoder"),
        (["oq", "--ipc", 1, "--max-per-class", 5, "--set", "decode=diffusion"], "needs prior=PATH"),
        (["oq", "--ipc", 1, "--max-per-class", 5, "--set", "kmeans_backend=magic"], "kmeans_backend"),
        (["d4m", "--ipc", 1, "--max-per-class", 5, "--set", "decode=sd-img2img"], "needs sd=PATH"),
    ],
)
def test_run_errors_are_one_clear_line(tmp_path: Path, args: list, message: str):
    out = tmp_path / "x.tar"
    result = invoke("run", args[0], "-d", "mnist", "-o", out, "-q", *args[1:])
    assert result.exit_code != 0
    assert message in result.output, result.output
    assert not out.exists()


def test_ipc_above_the_d4m_stream_chunk(tmp_path: Path, mnist_store):
    result = invoke("run", "d4m", "-d", "mnist", "--ipc", 10, "-o", tmp_path / "x.tar", "--max-per-class", 50,
                    "--set", "km_expand=6", "-q")
    assert result.exit_code != 0 and "fewer than the 60" in result.output, result.output


def test_teacher_soft_labels(tmp_path: Path, mnist_store):
    params = {"labels": "teacher", "teacher_epochs": 1, "teacher_max_per_class": 20, "w2_uniform": False,
              "refine_iterations": 0}
    d = run_to_archive(RunRequest("mnist", "oq", 2, params, max_per_class=50), tmp_path / "t.tar").distilled
    assert d.soft_labels is not None and d.soft_labels.shape == (20, 10)
    assert torch.isfinite(d.soft_labels).all() and d.weights is not None
    assert torch.equal(d.labels, torch.arange(10).repeat_interleave(2))  # hard labels stay the class ids


def test_nearest_decode_takes_each_cells_w2_best_member(tmp_path: Path, mnist_store):
    from distill.data import get_dataset
    from distill.methods.base import RunContext

    request = RunRequest("mnist", "oq", 3, {"decode": "nearest", "latent_norm": "none", "refine_iterations": 0}, seed=0,
                         max_per_class=50)
    result = run_to_archive(request, tmp_path / "n.tar")
    d, metrics = result.distilled, result.manifest["metrics"]
    vae = run_to_archive(RunRequest("mnist", "oq", 3, {"decode": "vae", "latent_norm": "none", "refine_iterations": 0}, seed=0,
                                    max_per_class=50),
                         tmp_path / "v.tar").distilled
    # same quantizer (centroids, masses) as the VAE decode; only the images differ
    assert torch.equal(d.extras["latents"], vae.extras["latents"]) and torch.equal(d.weights, vae.weights)
    # the images are the real training images the archive names, exactly
    train = RunContext(dataset=get_dataset("mnist"), ipc=3, seed=0, max_per_class=50).train
    sources = d.extras["source_indices"].numpy()
    assert d.images.dtype == torch.uint8 and torch.equal(d.images, train.load(sources))
    assert (train.labels[sources] == d.labels.numpy()).all()
    # each is the member of its cell nearest the centroid
    for c in range(10):
        x = mnist_store.class_latents(c).flatten(1)
        rows = {int(i): r for r, i in enumerate(mnist_store.class_indices(c))}
        centroids = d.extras["latents"][3 * c : 3 * c + 3].flatten(1)
        cell = torch.cdist(x, centroids).argmin(1)
        for k in range(3):
            member = rows[int(sources[3 * c + k])]
            dist = (x[cell == k] - centroids[k]).pow(2).sum(1)
            assert cell[member] == k and torch.isclose((x[member] - centroids[k]).pow(2).sum(), dist.min(), rtol=1e-4)
    # a real member set quantizes the class worse than the centroids do, but is a quantizer all the same
    assert metrics["w2_weighted_mean"] <= metrics["w2_members_mean"] < metrics["w2_uniform_mean"] * 2


def test_instance_normalised_quantization(tmp_path: Path, mnist_store):
    base = {"latent_norm": "instance", "w2_uniform": False, "refine_iterations": 0}
    near = run_to_archive(RunRequest("mnist", "oq", 2, base, max_per_class=50), tmp_path / "n.tar").distilled
    vae = run_to_archive(RunRequest("mnist", "oq", 2, {**base, "decode": "vae"}, max_per_class=50),
                         tmp_path / "v.tar").distilled
    plain = run_to_archive(RunRequest("mnist", "oq", 2, {**base, "decode": "vae", "latent_norm": "none"},
                                      max_per_class=50),
                           tmp_path / "p.tar").distilled
    assert torch.equal(near.weights, vae.weights) and not torch.equal(near.weights, plain.weights)
    # the centroids are mapped back to latents (the cells' average offset and gain): they decode to digits
    assert vae.extras["latents"].shape == (20, 32, 8, 8)
    torch.testing.assert_close(vae.extras["latents"].mean(), plain.extras["latents"].mean(), atol=0.05, rtol=0.1)
    assert vae.images.dtype == torch.uint8 and near.images.dtype == torch.uint8


def test_refine_runs_dm_from_the_oq_set_and_keeps_its_weights(tmp_path: Path, mnist_store):
    """refine_iterations=N: N DM iterations start from the decoded (nearest) set; labels, order and the cell masses
    stay, the images move; the DM start is exactly the oq set (DM with `initial`, no iteration draw changes it)."""
    base = {"w2_uniform": False, "refine_iterations": 0}
    plain = run_to_archive(RunRequest("mnist", "oq", 2, base, seed=0, max_per_class=50), tmp_path / "p.tar")
    refined = run_to_archive(RunRequest("mnist", "oq", 2, {**base, "refine_iterations": 2}, seed=0, max_per_class=50),
                             tmp_path / "r.tar")
    a, b = plain.distilled, refined.distilled
    assert torch.equal(a.labels, b.labels)
    # weight_power=auto: the raw masses on the plain set, their square roots on the refined one (per class shares)
    for c in range(10):
        raw, tempered = a.weights[a.labels == c].double(), b.weights[b.labels == c].double()
        torch.testing.assert_close(tempered / tempered.sum(), raw.sqrt() / raw.sqrt().sum())
    assert plain.manifest["metrics"]["weight_power"] == 1.0 and refined.manifest["metrics"]["weight_power"] == 0.5
    assert b.images.shape == a.images.shape and b.images.dtype == torch.float32
    moved = (b.pixels() - a.pixels()).abs()
    assert 0 < float(moved.mean()) < 0.2  # refined, not replaced
    assert refined.manifest["metrics"]["refine_iterations"] == 2 and "refine" in refined.manifest["timings"]
    assert refined.manifest["metrics"]["refine_batch_real"] == 256  # refine_batch_real=auto below 64 px
    bad = invoke("run", "oq", "--dataset", "mnist", "--ipc", "2", "--max-per-class", "50", "--set", "refine_iterations=-1",
                 "--out", str(tmp_path / "x.tar"))
    assert bad.exit_code == 2 and "refine_iterations" in bad.output and not (tmp_path / "x.tar").exists()


def test_cell_matched_refinement_uses_the_runs_cells(tmp_path: Path, mnist_store):
    """refine_match=mass / cell / class+cell: the refinement weighs the synthetic mean by the masses, or also pulls
    each image to its own k-means cell's mean embedding: labels kept, the images moved otherwise than by DM's
    class term alone; the manifest says which ran."""
    base = {"w2_uniform": False, "refine_iterations": 2}
    runs = {match: run_to_archive(RunRequest("mnist", "oq", 2, {**base, "refine_match": match}, seed=0, max_per_class=50),
                                  tmp_path / f"{match}.tar") for match in ("class", "mass", "cell", "class+cell")}
    images = {match: run.distilled.pixels() for match, run in runs.items()}
    assert len({tuple(image.flatten()[:4000].tolist()) for image in images.values()}) == 4  # four different sets
    for match, run in runs.items():
        assert torch.equal(run.distilled.weights, runs["cell"].distilled.weights) == (match != "class")
        assert run.manifest["metrics"]["refine_match"] == match
    # weight_power=auto keeps the raw masses where the refinement itself weighs images by them
    assert {run.manifest["metrics"]["weight_power"] for run in runs.values()} == {0.5, 1.0}


def test_cell_targets_map_cache_rows_to_pool_positions(mnist):
    """cell_targets: each image's cell by its position within its class in the run's split (the real pool's
    order), whatever order the cache lists them in; an image the cache left out (undecodable) is in no cell (-1);
    the masses are per class shares."""
    from distill.methods.base import RunContext
    from quantize.methods import cell_targets

    ctx = RunContext(dataset=mnist, ipc=2, seed=0, max_per_class=6)
    rows = [ctx.train.class_indices(c).tolist() for c in range(10)]
    cells = [[k % 2 for k in range(len(r))] for r in rows]
    quant = {"cell_rows": [r[::-1][1:] for r in rows], "cells": [c[::-1][1:] for c in cells],  # reversed, last left out
             "counts": [[3, 2]] * 10}
    targets = cell_targets(ctx, quant, "class+cell")
    assert targets.class_term and torch.allclose(targets.weights, torch.tensor([[0.6, 0.4]] * 10))
    for c in range(10):
        assert targets.cells[c].tolist() == cells[c][:-1] + [-1]


def test_refine_auto_refines_small_images_without_a_diffusion_decode():
    """oq's default refine_iterations=auto: 200 DM iterations where that was measured to win (real or VAE-decoded
    images up to 64 px: 28-32 px sets and Imagenette at 64), none with a diffusion decode or above 64 px (ImageNet
    at 128-256 px), none for a teacher-labelled set below IPC 10; numbers pass through."""
    from distill.methods.registry import get_method, parse_params
    from quantize.methods import resolve_refine_iterations

    def resolved(method: str, size: int, ipc: int = 10, **values) -> int:
        return resolve_refine_iterations(parse_params(get_method(method), values, paths=True), size, ipc)  # CLI values

    assert resolved("oq", 28) == resolved("oq", 32, decode="vae") == resolved("oq", 64) == 200
    assert resolved("oq", 65) == resolved("oq", 128) == resolved("oq", 224) == 0
    assert resolved("oq", 64, decode="diffusion", prior="some-dit") == 0
    assert resolved("oq", 32, decode="diffusion", prior="some-dit") == 0
    assert resolved("oq", 224, refine_iterations="50") == 50 and resolved("oq", 32, refine_iterations=0) == 0
    assert resolved("d4m", 32) == 0 and resolved("d4m", 32, refine_iterations="auto") == 200  # D4M as published
    assert resolved("oq", 64, ipc=1) == 200 and resolved("oq", 64, ipc=1, labels="teacher") == 0
    assert resolved("oq", 64, ipc=9, labels="teacher") == 0 and resolved("oq", 64, ipc=10, labels="teacher") == 200
    assert resolved("oq", 64, ipc=1, labels="teacher", refine_iterations="200") == 200


def test_refine_batch_real_auto_reads_fewer_real_images_from_64_px():
    """refine_batch_real=auto: DM's 256 real images per class below 64 px, 64 from 64 px (measured to match 256
    there); numbers pass through, and bad values are one clear error."""
    from distill.errors import DistillError
    from distill.methods.registry import get_method, parse_params
    from quantize.methods import resolve_refine_batch_real

    def resolved(size: int, **values) -> int:
        return resolve_refine_batch_real(parse_params(get_method("oq"), values, paths=True).refine_batch_real, size)

    assert resolved(28) == resolved(32) == 256 and resolved(64) == resolved(128) == resolved(224) == 64
    assert resolved(224, refine_batch_real="256") == 256 and resolved(32, refine_batch_real=16) == 16
    for bad in ("0", "many"):
        with pytest.raises(DistillError, match="refine_batch_real"):
            parse_params(get_method("oq"), {"refine_batch_real": bad}, paths=True)
