"""Shared pixel-space helpers: the DC gradient distance on hand-computed cases, loops, init, per-class grads."""

from __future__ import annotations

import math

import pytest
import torch

from distill.errors import DistillError
from distill.methods.base import RunContext
from distill.nets import build_network
from pixelspace.gradient_matching import get_loops
from pixelspace.gradients import detached_params, match_distance, per_class_gradients
from pixelspace.precision import real_autocast_dtype
from pixelspace.realpass import RealPass, compile_wanted, network_state, real_ce_pass, real_embed_pass
from pixelspace.realpool import RealPool
from pixelspace.synthetic import init_synthetic, to_pixel


def test_match_distance_ours_is_per_output_channel_cosine_and_ignores_1d():
    # conv 2 x 1 x 1 x 2: channel 0 identical directions (distance 0), channel 1 orthogonal (distance 1)
    conv_real = torch.tensor([[[[1.0, 0.0]]], [[[1.0, 0.0]]]])
    conv_syn = torch.tensor([[[[3.0, 0.0]]], [[[0.0, 2.0]]]])
    # linear 2 x 2: row 0 cosine 0 (distance 1), row 1 opposite (distance 2)
    lin_real = torch.tensor([[1.0, 1.0], [2.0, 0.0]])
    lin_syn = torch.tensor([[1.0, -1.0], [-1.0, 0.0]])
    # biases: wildly different, must be ignored
    bias_real, bias_syn = torch.tensor([1.0, 2.0]), torch.tensor([-5.0, 7.0])
    d = match_distance([conv_syn, bias_syn, lin_syn], [conv_real, bias_real, lin_real], "ours")
    assert float(d) == pytest.approx(0 + 1 + 1 + 2, abs=1e-5)
    # a layer-norm style 3-D tensor reshapes to C x (h*w)
    ln_real = torch.ones(2, 2, 2)
    ln_syn = torch.stack([torch.ones(2, 2), -torch.ones(2, 2)])
    assert float(match_distance([ln_syn], [ln_real])) == pytest.approx(0 + 2, abs=1e-5)
    # only 1-D tensors -> zero
    assert float(match_distance([bias_syn], [bias_real])) == 0.0


def test_match_distance_mse_and_cos_use_all_tensors_flattened():
    gs = [torch.tensor([[1.0, 2.0]]), torch.tensor([3.0])]
    gr = [torch.tensor([[0.0, 2.0]]), torch.tensor([1.0])]
    assert float(match_distance(gs, gr, "mse")) == pytest.approx(1 + 0 + 4)
    expected_cos = 1 - (0 + 4 + 3) / (math.sqrt(14) * math.sqrt(5))
    assert float(match_distance(gs, gr, "cos")) == pytest.approx(expected_cos, abs=1e-6)
    with pytest.raises(DistillError):
        match_distance(gs, gr, "l7")


def test_match_distance_batched_equals_one_call_per_row():
    torch.manual_seed(0)
    shapes = [(4, 3, 3, 3), (4,), (5, 6), (2, 3, 3)]
    gs = [torch.randn(3, *s) for s in shapes]
    gr = [torch.randn(3, *s) for s in shapes]
    for metric in ("ours", "mse", "cos"):
        batched = match_distance(gs, gr, metric, batch_dims=1)
        rows = torch.stack([match_distance([g[i] for g in gs], [g[i] for g in gr], metric) for i in range(3)])
        torch.testing.assert_close(batched, rows)


def test_get_loops_reference_table_and_untabulated_ipcs():
    assert get_loops(1) == (1, 1)
    assert get_loops(10) == (10, 50)
    assert get_loops(50) == (50, 10)
    assert get_loops(5) == (5, 50)  # never exits, unlike the reference
    assert get_loops(100) == (100, 5)
    assert get_loops(1000) == (1000, 1)
    with pytest.raises(DistillError):
        get_loops(0)


def test_real_pool_and_init(mnist):
    ctx = RunContext(dataset=mnist, ipc=2, seed=3, max_per_class=20)
    pool = RealPool(ctx)
    gen = torch.Generator().manual_seed(0)
    batch = pool.sample_all(64, gen)
    assert batch.shape == (10, 20, 1, 28, 28)  # capped by the 20 images per class
    # normalised: a real MNIST batch has mean about (0.13 - 0.1307) / 0.3081 = 0
    assert abs(float(batch.mean())) < 0.3
    x, y = pool.sample_mixed(50, gen)
    assert x.shape == (50, 1, 28, 28) and y.min() >= 0 and y.max() <= 9
    images, labels = init_synthetic(ctx, pool, "real", gen)
    assert images.shape == (20, 1, 28, 28) and labels.tolist() == [c for c in range(10) for _ in range(2)]
    pixels = to_pixel(ctx, images)
    assert float(pixels.min()) >= -1e-5 and float(pixels.max()) <= 1 + 1e-5  # real images are in [0, 1]
    noise, _ = init_synthetic(ctx, pool, "noise", gen)
    assert 0.8 < float(noise.std()) < 1.2
    with pytest.raises(DistillError):
        init_synthetic(ctx, pool, "zeros", gen)


def test_per_class_gradients_loop_vmap_and_manual_agree():
    torch.manual_seed(0)
    net = build_network("convnet-w16", 1, 3, 28, seed=1)
    x = torch.randn(3, 5, 1, 28, 28)
    y = torch.arange(3).view(3, 1).expand(3, 5)
    params = detached_params(net)
    loop = per_class_gradients(net, params, x, y, strategy="loop")
    vm = per_class_gradients(net, params, x, y, strategy="vmap", class_chunk=2)
    for a, b in zip(loop, vm, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)
    manual = torch.autograd.grad(torch.nn.functional.cross_entropy(net(x[1]), y[1]), list(net.parameters()))
    for a, b in zip(loop, manual, strict=True):
        torch.testing.assert_close(a[1], b, rtol=1e-4, atol=1e-6)


def test_real_precision_choice():
    assert real_autocast_dtype("fp32", torch.device("cpu")) is None
    assert real_autocast_dtype("bf16", torch.device("cpu")) is torch.bfloat16
    with pytest.raises(DistillError):
        real_autocast_dtype("fp8", torch.device("cpu"))


def test_compiled_real_passes_equal_eager_for_a_new_network_without_recompiling():
    """One compile per run: a template's pass, fed another network's values, gives that network's outputs."""
    torch._dynamo.reset()
    template = build_network("convnet-w16", 1, 3, 28, seed=0)
    net = build_network("convnet-w16", 1, 3, 28, seed=7)
    x = torch.randn(2, 6, 1, 28, 28)
    y = torch.arange(2).view(2, 1).expand(2, 6)
    embed = RealPass(real_embed_pass(template, None), compile=True)
    loss = RealPass(real_ce_pass(template, None), compile=True)
    with torch.no_grad():
        torch.testing.assert_close(embed(network_state(net), x[0]), net.embed(x[0]), rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(embed(network_state(template), x[0]), template.embed(x[0]), rtol=1e-4, atol=1e-5)
        params = detached_params(net)
        compiled = per_class_gradients(net, params, x, y, strategy="loop", real_loss=loss)
        eager = per_class_gradients(net, params, x, y, strategy="loop")
    assert embed.compiled is not None and loss.compiled is not None  # compiled, no eager fallback
    for a, b in zip(compiled, eager, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-3, atol=1e-5)


def test_real_pass_falls_back_to_eager_once_when_compilation_fails():
    messages: list[str] = []
    calls = []

    def fn(x: torch.Tensor) -> torch.Tensor:
        calls.append(1)
        return x * 2

    real_pass = RealPass(fn, compile=False, log=messages.append)
    real_pass.compiled = lambda x: (_ for _ in ()).throw(RuntimeError("no C++ compiler"))
    assert float(real_pass(torch.ones(()))) == 2.0 and real_pass.compiled is None
    assert float(real_pass(torch.ones(()))) == 2.0 and len(messages) == 1 and "no C++ compiler" in messages[0]


def test_compile_wanted_auto_only_for_long_runs():
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert compile_wanted("auto", cpu, 1000) and not compile_wanted("auto", cpu, 10)
    assert compile_wanted("auto", cuda, 1000) and not compile_wanted("auto", cuda, 10)  # CUDA: same rule
    assert not compile_wanted("auto", torch.device("meta"), 1000)
    assert compile_wanted("on", cpu, 1) and not compile_wanted("off", cpu, 1000)
    with pytest.raises(DistillError):
        compile_wanted("sometimes", cpu, 10)
