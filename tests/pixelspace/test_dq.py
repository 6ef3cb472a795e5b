"""DQ: GraphCut bins do not overlap and cover each class; ipc distinct real images per class are picked."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from distill.errors import DistillError
from distill.methods.base import RunContext
from distill.methods.registry import parse_params
from distill.nets import build_network
from pixelspace.dq import DatasetQuantization, bias_gradients, graphcut_bins, graphcut_greedy, sample_bins, similarity


def test_implicit_gradient_feature_similarity_matches_explicit():
    g = torch.Generator().manual_seed(0)
    logits, emb = torch.randn(30, 5, generator=g), torch.randn(30, 8, generator=g)
    labels = torch.randint(0, 5, (30,), generator=g)
    a = bias_gradients(logits, labels)
    # DeepCore: autograd of CE applied to softmax outputs; features [a, a (x) e]
    o = logits.clone().requires_grad_(True)
    torch.nn.functional.cross_entropy(torch.softmax(o, 1), labels, reduction="sum").backward()
    torch.testing.assert_close(a, o.grad)
    explicit = torch.cat([a, (a[:, :, None] * emb[:, None, :]).flatten(1)], 1).double()
    cos = torch.nn.functional.cosine_similarity(explicit[:, None], explicit[None], dim=2)
    np.testing.assert_allclose(similarity(a.double(), emb.double(), "gradient"), (0.5 + 0.5 * cos).numpy(), atol=1e-5)


def test_graphcut_bins_partition_and_greedy_order():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(57, 6))
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    sim = (0.5 + 0.5 * x @ x.T).astype(np.float32)
    bins = graphcut_bins(sim, 5)
    allidx = np.concatenate(bins)
    assert sorted(allidx.tolist()) == list(range(57))  # cover, no overlap
    assert [len(b) for b in bins] == [11, 11, 11, 11, 13]
    first = graphcut_greedy(sim, np.arange(57), 3)
    assert first[0] == int(np.argmax(sim.sum(0)))  # the most central sample is picked first
    picks, origin = sample_bins(bins, 7, np.random.default_rng(1))
    assert len(set(picks.tolist())) == 7 and origin.tolist() == [0, 0, 1, 1, 2, 3, 4]
    for p, b in zip(picks, origin, strict=True):
        assert p in bins[b]


def test_dq_selects_distinct_real_images(mnist, tmp_path):
    weights = tmp_path / "teacher.safetensors"
    save_file(build_network("convnet-w16", 1, 10, 28, seed=3).state_dict(), str(weights))
    ctx = RunContext(dataset=mnist, ipc=3, seed=0, max_per_class=40)
    params = parse_params(DatasetQuantization, {"teacher_model": "convnet-w16", "teacher_weights": str(weights),
                                                "num_bins": 4}, paths=True)  # the CLI may name a file
    out = DatasetQuantization().run(ctx, params)
    assert torch.bincount(out.labels).tolist() == [3] * 10
    index = out.extras["train_index"].numpy()
    assert len(set(index.tolist())) == 30
    assert np.array_equal(ctx.train.labels[index], out.labels.numpy())
    torch.testing.assert_close(out.images, ctx.train.load(index).float() / 255)
    assert all(sum(sizes) == 40 and len(sizes) == 4 for sizes in out.metrics["bin_sizes_per_class"])


def test_dq_rejects_mae_and_missing_weights(mnist):
    ctx = RunContext(dataset=mnist, ipc=1, max_per_class=20)
    with pytest.raises(DistillError, match="not available offline"):  # at validation, before any work
        parse_params(DatasetQuantization, {"mae": "/nope/mae.pth"}, paths=True)
    with pytest.raises(DistillError, match="teacher_weights not found"):
        DatasetQuantization().run(ctx, parse_params(DatasetQuantization, {"teacher_weights": "/nope/t.safetensors"},
                                                    paths=True))


@pytest.mark.parametrize("value", ["/etc/passwd", "../../../../etc/hostname", "org/model", "teacher.safetensors",
                                   "taef2", "t\x00"])
def test_http_teacher_weights_is_a_registered_name_never_a_path(value):
    """Over HTTP (paths=False) teacher_weights names a model the operator registered; the built-in encoders are
    not teachers, and a path never reaches the file system (it is refused before the job exists)."""
    with pytest.raises(DistillError, match="teacher_weights"):
        parse_params(DatasetQuantization, {"teacher_weights": value})


def test_registered_teacher_is_loaded_from_its_directory(mnist, tmp_path, monkeypatch):
    from distill.config import reload_settings
    from distill.runner import RunRequest, run_to_archive

    folder = tmp_path / "teachers" / "mnist-w16"
    folder.mkdir(parents=True)
    save_file(build_network("convnet-w16", 1, 10, 28, seed=3).state_dict(), str(folder / "model.safetensors"))
    monkeypatch.setenv("DISTILL_MODELS", f'{{"mnist-teacher": "{folder}"}}')
    reload_settings()
    try:
        params = {"teacher_model": "convnet-w16", "teacher_weights": "mnist-teacher", "num_bins": 2}
        assert parse_params(DatasetQuantization, params).teacher_weights == "mnist-teacher"
        request = RunRequest(dataset="mnist", method="dq", ipc=1, params=params, max_per_class=12, paths=False)
        result = run_to_archive(request, tmp_path / "dq.tar")
        assert result.manifest["params"]["teacher_weights"] == "mnist-teacher"  # the name, not the directory
        assert str(tmp_path) not in json.dumps(result.manifest)
    finally:
        monkeypatch.delenv("DISTILL_MODELS")
        reload_settings()
