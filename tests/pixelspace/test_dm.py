"""DM: the batched loss equals the reference's per-class loop; the loss decreases; the BN branch runs."""

from __future__ import annotations

import torch

from distill.methods.base import RunContext
from distill.methods.registry import get_method, parse_params
from distill.nets import build_network
from pixelspace.dm import dm_loss_batched, dm_loss_naive
from pixelspace.realpool import RealPool


def test_batched_dm_loss_equals_naive_per_class_loop(mnist):
    ctx = RunContext(dataset=mnist, ipc=3, seed=0, max_per_class=20)
    gen = torch.Generator().manual_seed(0)
    real = RealPool(ctx).sample_all(12, gen)
    syn = torch.randn(10, 3, 1, 28, 28, generator=gen)
    net = build_network("convnet", 1, 10, 28, seed=3)
    for p in net.parameters():
        p.requires_grad_(False)
    syn_a, syn_b = syn.clone().requires_grad_(True), syn.clone().requires_grad_(True)
    batched = dm_loss_batched(net, real, syn_a, real_chunk=50)  # chunks split classes: still identical
    naive = dm_loss_naive(net, real, syn_b)
    torch.testing.assert_close(batched, naive, rtol=1e-5, atol=1e-5)
    batched.backward()
    naive.backward()
    torch.testing.assert_close(syn_a.grad, syn_b.grad, rtol=1e-4, atol=1e-7)
    # bf16 real side: the target means move far less than the loss itself
    bf16 = dm_loss_batched(net, real, syn.clone().requires_grad_(True), real_dtype=torch.bfloat16)
    assert abs(float(bf16.detach()) - float(naive.detach())) / float(naive.detach()) < 0.01


def test_dm_loss_decreases_on_small_real_slice(mnist):
    cls = get_method("dm")
    ctx = RunContext(dataset=mnist, ipc=2, seed=0, max_per_class=20)
    out = cls().run(ctx, parse_params(cls, {"iterations": 8, "batch_real": 16, "init": "noise", "model": "convnet-w32"}))
    curve = out.extras["loss_curve"]
    assert float(curve[-3:].mean()) < 0.5 * float(curve[:2].mean())
    assert out.images.shape == (20, 1, 28, 28)
    assert out.metrics["lr_img"] == 1.0 and out.metrics["dsa_strategy"] == "color_crop_cutout_scale_rotate"


def test_dm_batchnorm_branch_and_real_init_pixel_scale(mnist):
    cls = get_method("dm")
    ctx = RunContext(dataset=mnist, ipc=1, seed=0, max_per_class=20)
    out = cls().run(ctx, parse_params(cls, {"iterations": 2, "batch_real": 8, "model": "convnet-bn", "lr_img": 1e-6}))
    # init real + a negligible lr: the archive holds (almost) the real pixels in [0, 1]
    assert float(out.images.min()) > -0.01 and float(out.images.max()) < 1.01
    assert torch.isfinite(out.extras["loss_curve"]).all()
