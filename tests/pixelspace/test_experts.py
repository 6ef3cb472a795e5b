"""Expert buffers: trained once with cloned snapshots, stored, loaded back identically, extended not retrained."""

from __future__ import annotations

import json

import pytest
import torch
from typer.testing import CliRunner

from distill.errors import Cancelled
from distill.methods.base import RunContext
from distill.nets import build_network
from pixelspace.experts import ExpertSettings, FlatModel, buffer_dir, ensure_buffer, list_buffers, load_buffer

TINY = dict(model="convnet-w16", epochs=2, max_per_class=20)


def tiny_buffer(ds, experts: int = 2):
    ctx = RunContext(dataset=ds, ipc=1, max_per_class=TINY["max_per_class"])
    return ensure_buffer(ds, ctx.train, ExpertSettings(dataset=ds.name, **TINY), experts)


def test_buffer_round_trip(mnist):
    buffer = tiny_buffer(mnist)
    again = load_buffer(buffer.folder)
    assert again.num_experts == 2 and again.epochs == 2
    net = build_network("convnet-w16", 1, 10, 28)
    num_params = FlatModel(net).num_params
    for e in range(2):
        traj = again.trajectory(e)
        assert traj.shape == (3, num_params)
        assert torch.equal(traj, buffer.trajectory(e))
        # snapshots are copies: every epoch moved the weights (the reference's CPU aliasing bug gives 0 here)
        assert float((traj[1] - traj[0]).norm()) > 0 and float((traj[2] - traj[1]).norm()) > 0
    assert not torch.equal(again.snapshot(0, 0), again.snapshot(1, 0))  # experts start from different inits
    loaded = again.load_into(build_network("convnet-w16", 1, 10, 28), 1, 2)
    assert torch.equal(FlatModel(loaded).flatten(), again.snapshot(1, 2))
    manifest = json.loads((buffer.folder / "manifest.json").read_text())
    assert manifest["settings"]["lr_teacher"] == 0.01 and manifest["settings"]["momentum"] == 0.0
    assert all(0 <= e["test_accuracy"] <= 100 for e in manifest["experts"])
    assert not list(buffer.folder.glob("*.tmp"))


def test_buffer_is_reused_and_extended(mnist):
    buffer = tiny_buffer(mnist)
    first = buffer.folder / "expert_000.safetensors"
    stamp = first.stat().st_mtime_ns
    assert tiny_buffer(mnist).num_experts == 2 and first.stat().st_mtime_ns == stamp
    extended = tiny_buffer(mnist, experts=3)
    assert extended.num_experts == 3 and first.stat().st_mtime_ns == stamp
    assert torch.equal(extended.trajectory(0), buffer.trajectory(0))


def test_cli_experts_train_and_list(mnist):
    from distill.cli import app

    runner = CliRunner()
    result = runner.invoke(app, ["experts", "train", "--dataset", "mnist", "--experts", "2", "--epochs", "2",
                                 "--model", "convnet-w16", "--max-per-class", "20", "--device", "cpu", "-q"])
    assert result.exit_code == 0, result.output
    settings = ExpertSettings(dataset="mnist", **TINY)
    assert str(buffer_dir(settings)) in result.output
    assert any(row["path"] == str(buffer_dir(settings)) for row in list_buffers())
    bad = runner.invoke(app, ["experts", "train", "--dataset", "mnist", "--experts", "0", "--epochs", "2"])
    assert bad.exit_code == 2 and "experts must be >= 1" in bad.output


def test_cancel_stops_expert_training_within_a_batch(mnist):
    """The cancellation check runs before every batch: a cancel raised during the first epoch stops training
    at once (not at the epoch's end), and the expert in training is not stored."""
    settings = ExpertSettings(dataset=mnist.name, model="convnet-w16", epochs=3, batch_train=16, max_per_class=10)
    ctx = RunContext(dataset=mnist, ipc=1, max_per_class=settings.max_per_class)
    batches_per_epoch = -(-len(ctx.train) // settings.batch_train)
    assert batches_per_epoch > 4
    checks, ticks = [], []

    def check() -> None:
        checks.append(len(ticks))
        if len(checks) == 4:  # the first check is before the expert, then one per batch: cancel in batch 3
            raise Cancelled("job cancelled")

    with pytest.raises(Cancelled):
        ensure_buffer(mnist, ctx.train, settings, 2, log=lambda m: None, tick=lambda: ticks.append(1),
                      check_cancelled=check)
    assert checks == [0, 0, 0, 0] and not ticks  # stopped inside the first epoch, nothing after the cancel
    manifest = json.loads((buffer_dir(settings) / "manifest.json").read_text())
    assert manifest["experts"] == [] and not list(buffer_dir(settings).glob("expert_*"))
