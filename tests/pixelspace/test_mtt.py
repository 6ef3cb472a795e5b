"""MTT: the constant-memory gradient equals the full unroll's, the loss falls, the learned lr reaches eval."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from distill.archive import read_archive
from distill.errors import DistillError
from distill.evaluate import EvalConfig, evaluate_distilled
from distill.methods.base import RunContext
from distill.methods.registry import get_method, parse_params
from distill.nets import build_network
from distill.runner import RunRequest, run_to_archive
from pixelspace.experts import FlatModel
from pixelspace.mtt import TrajectoryMatching, make_plan, make_step_loss, match_trajectory, student_dtype

TINY_RUN = dict(experts=2, expert_train_epochs=2, expert_model="convnet-w16", expert_epochs=1, max_start_epoch=1)


def _tiny_problem(mnist, n=12, soft=False):
    net = build_network("convnet-w16", 1, 10, 28, seed=0)
    model = FlatModel(net)
    images = mnist.normalize(mnist.train.load(np.arange(n)).float() / 255).requires_grad_(True)
    if soft:
        targets = torch.randn(n, 10, generator=torch.Generator().manual_seed(1)).requires_grad_(True)
    else:
        targets = torch.from_numpy(mnist.train.labels[:n])
    start = model.flatten()
    target = start + 0.01 * torch.randn(start.shape, generator=torch.Generator().manual_seed(2))
    plan = make_plan(n, 4, 5, torch.Generator().manual_seed(0))
    step_loss = make_step_loss(model, images, targets, plan, "color_crop_cutout_scale_rotate", soft=soft)
    return step_loss, start, target, images, targets


@pytest.mark.parametrize("soft", [False, True])
def test_memory_efficient_gradient_equals_full_unroll(mnist, soft):
    step_loss, start, target, images, targets = _tiny_problem(mnist, soft=soft)
    leaves = [images, targets] if soft else [images]
    lr = torch.tensor(0.02, requires_grad=True)
    full = match_trajectory(step_loss, start, target, lr, leaves, 4, memory_efficient=False)
    lean = match_trajectory(step_loss, start, target, lr, leaves, 4, memory_efficient=True)
    assert full.loss == pytest.approx(lean.loss, rel=1e-5)
    assert float(full.grad_lr) == pytest.approx(float(lean.grad_lr), rel=1e-3)
    for a, b in zip(full.grads, lean.grads, strict=True):
        assert float(a.abs().max()) > 0
        torch.testing.assert_close(a, b, rtol=1e-3, atol=1e-3 * float(a.abs().max()))


def test_mtt_loss_decreases_and_lr_is_learned(mnist):
    ctx = RunContext(dataset=mnist, ipc=1, seed=0, max_per_class=20)
    params = parse_params(TrajectoryMatching, TINY_RUN | dict(iterations=16, syn_steps=2, lr_img=100.0, lr_lr=1e-5,
                                                              dsa_strategy="none"))
    out = TrajectoryMatching().run(ctx, params)
    m = out.metrics
    assert out.images.shape == (10, 1, 28, 28) and torch.bincount(out.labels).tolist() == [1] * 10
    assert m["loss_last"] < 0.9 * m["loss_first"], m
    assert out.learned_lr is not None and out.learned_lr != pytest.approx(0.01, abs=1e-9)
    assert m["resolved"]["syn_steps"] == 2 and m["resolved"]["lr_teacher"] == 0.01  # explicit wins, default fills


def test_learned_lr_is_archived_and_used_by_eval(mnist, tmp_path):
    params = TINY_RUN | dict(iterations=2, syn_steps=2, lr_lr=1e-4, memory_efficient=True)
    result = run_to_archive(RunRequest("mnist", "mtt", 1, params, max_per_class=20, device="cpu"), tmp_path / "m.tar")
    loaded = read_archive(tmp_path / "m.tar")
    lr = loaded.distilled.learned_lr
    assert lr is not None and lr == pytest.approx(result.distilled.learned_lr)
    res = evaluate_distilled(loaded.distilled, mnist, EvalConfig(model="convnet-w16", runs=1, epochs=1, test_limit=50))
    assert res.lr == pytest.approx(lr)


def test_defaults_follow_the_reference():
    cls = get_method("mtt")
    p = parse_params(cls, {})
    assert p.iterations == 5000 and p.experts == 100 and p.expert_train_epochs == 50 and not p.zca
    from pixelspace.mtt import MTT_DEFAULTS, MTT_TABLE, resolve

    assert resolve(p, MTT_TABLE, MTT_DEFAULTS, "mnist", 10)["syn_steps"] == 20
    c10 = resolve(p, MTT_TABLE, MTT_DEFAULTS, "cifar10", 1)
    assert (c10["syn_steps"], c10["max_start_epoch"], c10["lr_img"], c10["lr_lr"]) == (50, 2, 100.0, 1e-7)
    nette = resolve(p, MTT_TABLE, MTT_DEFAULTS, "imagenette@128", 10)  # the size suffix does not hide the row
    assert (nette["lr_img"], nette["lr_lr"], nette["batch_syn"], nette["max_start_epoch"]) == (1e5, 1e-6, 20, 10)
    given = resolve(parse_params(cls, {"lr_img": 1000.0}), MTT_TABLE, MTT_DEFAULTS, "imagenette@64", 1)
    assert given["lr_img"] == 1000.0 and given["batch_syn"] is None  # explicit values win
    with pytest.raises(DistillError, match="zca"):
        TrajectoryMatching().run(RunContext(dataset=None, ipc=1), parse_params(cls, {"zca": True}))  # type: ignore[arg-type]


def test_bf16_student_gradient_is_closer_to_fp32_than_another_augmentation_draw(mnist):
    """student_precision=bf16 changes the matching gradient far less than the method's own sampling does."""
    net = build_network("convnet-w16", 1, 10, 28, seed=0)
    model = FlatModel(net)
    real = mnist.normalize(mnist.train.load(np.arange(100, 164)).float() / 255)
    real_labels = torch.from_numpy(mnist.train.labels[100:164])
    start = model.flatten()
    theta = start.clone()
    for _ in range(5):  # a short real expert segment, so the target is a direction training actually takes
        theta = theta.requires_grad_(True)
        (g,) = torch.autograd.grad(torch.nn.functional.cross_entropy(model(theta, real), real_labels), theta)
        theta = (theta - 0.05 * g).detach()
    images = mnist.normalize(mnist.train.load(np.arange(20)).float() / 255).requires_grad_(True)
    labels = torch.from_numpy(mnist.train.labels[:20])

    def gradient(dtype, plan_seed):
        plan = make_plan(20, 4, 10, torch.Generator().manual_seed(plan_seed))
        step_loss = make_step_loss(model, images, labels, plan, "color_crop_cutout_scale_rotate", dtype=dtype)
        return match_trajectory(step_loss, start, theta, torch.tensor(0.01, requires_grad=True), [images], 4, False)

    fp32, bf16, other_draw = gradient(None, 0), gradient(torch.bfloat16, 0), gradient(None, 1)
    assert bf16.grads[0].dtype == torch.float32
    assert bf16.loss == pytest.approx(fp32.loss, rel=1e-2)
    assert float(bf16.grad_lr) == pytest.approx(float(fp32.grad_lr), rel=3e-2)
    cosine = torch.nn.functional.cosine_similarity
    same_draw = float(cosine(bf16.grads[0].flatten(), fp32.grads[0].flatten(), dim=0))
    new_draw = float(cosine(other_draw.grads[0].flatten(), fp32.grads[0].flatten(), dim=0))
    assert same_draw > 0.98 and same_draw > new_draw


def test_student_precision_choice():
    cpu = torch.device("cpu")
    assert student_dtype("fp32", cpu) is None and student_dtype("bf16", cpu) is torch.bfloat16
    assert student_dtype("auto", torch.device("cuda")) is None
    with pytest.raises(DistillError):
        student_dtype("fp8", cpu)


def test_a_learned_lr_that_crossed_zero_is_not_archived_and_an_archive_holding_one_is_refused(mnist):
    """The reference lets syn_lr go negative (seen on ImageNette at 128 px); SGD would refuse it mid-evaluation."""
    from dataclasses import replace

    from pixelspace.mtt import usable_lr

    logged: list[str] = []
    assert usable_lr(0.004, logged.append) == 0.004 and not logged
    assert usable_lr(-0.0025, logged.append) is None and "not positive" in logged[0]
    assert usable_lr(float("nan"), logged.append) is None
    images = mnist.train.load(np.arange(10)).float() / 255
    distilled = replace(_set_of(images, mnist), learned_lr=-0.0025)
    config = EvalConfig(model="convnet-w16", runs=1, epochs=1, test_limit=50)
    with pytest.raises(DistillError, match="learned lr -0.0025 is not a positive number: pass --lr"):
        evaluate_distilled(distilled, mnist, config)
    assert evaluate_distilled(distilled, mnist, replace(config, lr=0.01)).lr == 0.01


def _set_of(images, mnist):
    from distill.methods.base import DistilledSet

    return DistilledSet(images=images, labels=torch.from_numpy(mnist.train.labels[:10]))
