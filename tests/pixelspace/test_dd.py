"""DD: IPC mapping, the unrolled objective decreases, learned lrs are archived and used by evaluation."""

from __future__ import annotations

import pytest
import torch

from distill.archive import read_archive
from distill.errors import DistillError
from distill.evaluate import EvalConfig, evaluate_distilled
from distill.methods.base import DistilledSet, RunContext
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


def test_dd_protocol_replays_exactly_the_steps_dd_optimised(mnist):
    """protocol dd: a fresh network after the archive's learned steps is the network DD's objective scores."""
    from distill.evaluate import train_student_dd

    torch.manual_seed(0)
    images = torch.randn(20, 1, 28, 28)  # IPC 2 as 2 steps of 1 image per class, normalised space
    labels = torch.arange(10).repeat_interleave(2)  # class-major, as DD lays its set out
    step_of = torch.tensor([0, 1] * 10)
    raw_lrs = torch.tensor([inverse_softplus(v) for v in (0.05, 0.02, 0.04, 0.01)])  # 2 steps x 2 epochs
    real_x, real_y = RealPool(RunContext(dataset=mnist, ipc=1, max_per_class=20)).sample_mixed(
        64, torch.Generator().manual_seed(3))
    batches = [images[step_of == s] for s in range(2)]
    batch_labels = [labels[step_of == s] for s in range(2)]
    net = build_network("convnet-w32", 1, 10, 28, seed=7)
    objective = float(unrolled_loss(net, batches, batch_labels, raw_lrs, real_x, real_y, 2).detach())
    distilled = DistilledSet(images=mnist.denormalize(images), labels=labels,
                             extras={"step_lrs": torch.nn.functional.softplus(raw_lrs), "dd_step": step_of})
    model = train_student_dd(distilled, mnist, EvalConfig(protocol="dd", model="convnet-w32"), run_seed=7)
    with torch.no_grad():
        replayed = float(torch.nn.functional.cross_entropy(model(real_x), real_y))
    assert replayed == pytest.approx(objective, abs=1e-4)
    distilled.metrics["model"] = "convnet-w32"  # as DD's archive records it: `--model auto` replays on that network
    auto = train_student_dd(distilled, mnist, EvalConfig(protocol="dd"), run_seed=7)
    assert evaluate_distilled(distilled, mnist, EvalConfig(protocol="dd", runs=1, test_limit=20)).model == "convnet-w32"
    with torch.no_grad():
        assert float(torch.nn.functional.cross_entropy(auto(real_x), real_y)) == pytest.approx(replayed, abs=1e-6)
    result = evaluate_distilled(distilled, mnist, EvalConfig(protocol="dd", model="convnet-w32", runs=2, test_limit=50))
    assert result.epochs == 2 and len(result.accuracies) == 2
    with pytest.raises(DistillError, match="needs a DD archive"):
        evaluate_distilled(DistilledSet(images=distilled.images, labels=labels), mnist, EvalConfig(protocol="dd"))


def test_lr_decay_follows_reference_epochs_not_the_budget(mnist):
    """StepLR halves every decay_epochs epochs of the real loader; a short budget stops early in that schedule."""
    cls = get_method("dd")
    ctx = RunContext(dataset=mnist, ipc=1, seed=0, max_per_class=20)  # 200 images, batch 64 -> 4 iterations/epoch
    params = {"iterations": 6, "batch_real": 64, "model": "convnet-w32", "decay_epochs": 1, "lr": 0.05}
    out = cls().run(ctx, parse_params(cls, params))
    assert out.metrics["lr_final"] == pytest.approx(0.05 * 0.5)  # one halving after 4 iterations, none at 6
