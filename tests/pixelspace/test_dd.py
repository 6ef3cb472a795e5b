"""DD: IPC mapping, the unrolled objective decreases, learned lrs are archived and used by evaluation."""

from __future__ import annotations

import pytest
import torch

from distill.archive import read_archive
from distill.errors import DistillError
from distill.evaluate import EvalConfig, evaluate_distilled
from distill.methods.base import RunContext
from distill.methods.registry import get_method, parse_params
from distill.nets import build_network
from distill.runner import RunRequest, run_to_archive
from pixelspace.dd import default_steps, inverse_softplus, unrolled_loss
from pixelspace.realpool import RealPool


def test_ipc_maps_to_steps_of_images_per_class():
    assert [default_steps(i) for i in (1, 2, 7, 10, 12, 50, 100)] == [1, 2, 7, 10, 6, 10, 10]
    assert torch.nn.functional.softplus(torch.tensor(inverse_softplus(0.02))).item() == pytest.approx(0.02)
    cls = get_method("dd")
    with pytest.raises(DistillError, match="must divide"):
        cls().run(RunContext(dataset=None, ipc=3), parse_params(cls, {"distill_steps": 2}))  # type: ignore[arg-type]


def _objective(mnist, images, raw_lrs, real_x, real_y, steps_per_class):
    """Mean unrolled loss over three fixed networks (what DD minimises, without the sampling noise)."""
    labels = torch.arange(10).repeat_interleave(steps_per_class)
    total = 0.0
    for seed in (101, 102, 103):
        net = build_network("convnet-w32", 1, 10, 28, seed=seed)
        total += float(unrolled_loss(net, [mnist.normalize(images)], [labels], raw_lrs, real_x, real_y, 3).detach())
    return total / 3


def test_unrolled_objective_decreases_on_small_real_slice(mnist):
    cls = get_method("dd")
    ctx = RunContext(dataset=mnist, ipc=1, seed=0, max_per_class=20)
    params = {"iterations": 10, "batch_real": 64, "init": "real", "lr": 0.1, "distill_lr": 0.2, "model": "convnet-w32"}
    out = cls().run(ctx, parse_params(cls, params))
    start = get_method("random")().run(ctx, parse_params(get_method("random"), {}))  # init real == this draw
    real_x, real_y = RealPool(ctx).sample_mixed(200, torch.Generator().manual_seed(9))
    before = _objective(mnist, start.images, torch.full((3,), inverse_softplus(0.2)), real_x, real_y, 1)
    raw_after = torch.log(torch.expm1(out.extras["step_lrs"]))
    after = _objective(mnist, out.images, raw_after, real_x, real_y, 1)
    assert after < before - 0.05
    assert len(out.extras["loss_curve"]) == 10


def test_learned_lr_is_archived_and_used_by_evaluate(mnist, tmp_path):
    request = RunRequest("mnist", "dd", 2, {"iterations": 2, "batch_real": 32, "model": "convnet-w32", "lr": 0.05},
                         seed=0, max_per_class=20, device="cpu")
    result = run_to_archive(request, tmp_path / "dd.tar")
    archive = read_archive(tmp_path / "dd.tar")
    distilled = archive.distilled
    step_lrs = distilled.extras["step_lrs"]
    assert step_lrs.shape == (6,)  # IPC 2 -> 2 steps x 3 epochs
    assert distilled.learned_lr == pytest.approx(float(step_lrs.mean()))
    assert distilled.learned_lr == pytest.approx(result.distilled.learned_lr)
    assert distilled.learned_lr != pytest.approx(0.02)  # it moved from the initial lr
    assert distilled.extras["dd_step"].tolist() == [0, 1] * 10
    ev = evaluate_distilled(distilled, mnist, EvalConfig(runs=1, epochs=1, test_limit=50, model="convnet-w32"))
    assert ev.lr == pytest.approx(distilled.learned_lr)
