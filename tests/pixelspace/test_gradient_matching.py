"""DC / DSA: batched matching equals the reference's per-class loop, Siamese DSA, loss decreases."""

from __future__ import annotations

import pytest
import torch

from distill.augment import DIGITS_STRATEGY
from distill.methods.base import RunContext
from distill.methods.registry import get_method, parse_params
from distill.nets import build_network
from pixelspace.gradient_matching import _augment_classes, matching_loss_batched, matching_loss_naive


def _real_and_syn(mnist, per_class: int, ipc: int):
    ctx = RunContext(dataset=mnist, ipc=ipc, seed=0, max_per_class=20)
    from pixelspace.realpool import RealPool

    pool = RealPool(ctx)
    gen = torch.Generator().manual_seed(0)
    real = pool.sample_all(per_class, gen)
    syn = torch.randn(10, ipc, 1, 28, 28, generator=gen)
    return real, syn


@pytest.mark.parametrize("metric", ["ours", "mse", "cos"])
def test_batched_matching_equals_naive_per_class_loop(mnist, metric):
    real, syn = _real_and_syn(mnist, per_class=8, ipc=2)
    net = build_network("convnet-w32", 1, 10, 28, seed=5)
    syn_a = syn.clone().requires_grad_(True)
    syn_b = syn.clone().requires_grad_(True)
    batched = matching_loss_batched(net, real, syn_a, metric)
    naive = matching_loss_naive(net, real, syn_b, metric)
    torch.testing.assert_close(batched, naive, rtol=1e-4, atol=1e-4)
    batched.backward()
    naive.backward()
    assert float(syn_b.grad.abs().max()) > 0
    torch.testing.assert_close(syn_a.grad, syn_b.grad, rtol=1e-3, atol=1e-5 * float(syn_b.grad.abs().max()))
    # vmap for the real side gives the same loss too
    vm = matching_loss_batched(net, real, syn.clone().requires_grad_(True), metric, real_strategy="vmap", real_chunk=16)
    torch.testing.assert_close(vm, naive, rtol=1e-4, atol=1e-4)


def test_bf16_real_side_stays_close_to_fp32(mnist):
    real, syn = _real_and_syn(mnist, per_class=16, ipc=1)
    net = build_network("convnet", 1, 10, 28, seed=2)
    fp32 = float(matching_loss_batched(net, real, syn.clone().requires_grad_(True)).detach())
    syn_bf = syn.clone().requires_grad_(True)
    bf16 = float(matching_loss_batched(net, real, syn_bf, real_dtype=torch.bfloat16).detach())
    assert abs(bf16 - fp32) / fp32 < 0.01


def test_siamese_augmentation_identical_per_class_and_differentiable():
    gen = torch.Generator().manual_seed(1)
    real = torch.randn(4, 6, 1, 28, 28, generator=gen)
    syn = real[:, :2].clone().requires_grad_(True)  # the synthetic batch holds copies of real images
    for _ in range(6):  # several draws cover the op families (crop, cutout, color, scale, rotate)
        real_aug, syn_aug = _augment_classes(real, syn, DIGITS_STRATEGY, gen)
        torch.testing.assert_close(syn_aug, real_aug[:, :2], rtol=1e-5, atol=1e-5)
        assert not torch.equal(real_aug, real)  # something was applied
        (grad,) = torch.autograd.grad(syn_aug.pow(2).sum(), syn)
        assert float(grad.abs().sum()) > 0
    # different classes get different draws (own seeds): class 0's transform differs from class 1's
    same_images = real[0:1].expand(4, -1, -1, -1, -1).clone()
    aug, _ = _augment_classes(same_images, same_images[:, :1], DIGITS_STRATEGY, torch.Generator().manual_seed(4))
    assert any(not torch.allclose(aug[0], aug[c]) for c in range(1, 4))


@pytest.mark.parametrize("method", ["dc", "dsa"])
def test_loss_decreases_on_small_real_slice(mnist, method):
    cls = get_method(method)
    ctx = RunContext(dataset=mnist, ipc=1, seed=0, max_per_class=20)
    params = parse_params(cls, {"iterations": 8, "batch_real": 12, "init": "noise", "model": "convnet-w32"})
    out = cls().run(ctx, params)
    curve = out.extras["loss_curve"]
    assert len(curve) == 8
    assert float(curve[-2:].mean()) < 0.9 * float(curve[:2].mean())
    assert out.images.shape == (10, 1, 28, 28) and out.labels.tolist() == list(range(10))
    assert out.metrics["dsa_strategy"] == ("none" if method == "dc" else DIGITS_STRATEGY)


def test_inner_loop_runs_between_outer_steps(mnist):
    cls = get_method("dsa")
    ctx = RunContext(dataset=mnist, ipc=2, seed=0, max_per_class=20)
    out = cls().run(ctx, parse_params(cls, {"iterations": 1, "batch_real": 8, "inner_loop": 2, "model": "convnet-w32"}))
    assert out.metrics["outer_loop"] == 2 and out.metrics["inner_loop"] == 2
    assert out.images.shape == (20, 1, 28, 28)
    assert torch.isfinite(out.images).all()
