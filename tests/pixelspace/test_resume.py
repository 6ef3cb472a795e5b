"""Pixel methods checkpoint their loop and resume it: interrupted + resumed == uninterrupted, bit for bit."""

from __future__ import annotations

import pytest
import torch

from distill.errors import Cancelled, DistillError
from distill.methods.base import CheckpointStore, RunContext
from distill.methods.registry import get_method, parse_params

ITERATIONS = 6
TINY = {
    "dc": {"iterations": ITERATIONS, "batch_real": 8, "init": "noise", "model": "convnet-w32"},
    "dsa": {"iterations": ITERATIONS, "batch_real": 8, "model": "convnet-w32"},
    "dm": {"iterations": ITERATIONS, "batch_real": 8, "init": "noise", "model": "convnet-w32"},
    "dd": {"iterations": ITERATIONS, "batch_real": 32, "model": "convnet-w32", "lr": 0.05},
    # two experts of 2 epochs: the expert queue refills within the run, DSA draws from the generator
    "mtt": {"iterations": ITERATIONS, "experts": 2, "expert_train_epochs": 2, "expert_model": "convnet-w16",
            "expert_epochs": 1, "max_start_epoch": 1, "syn_steps": 2},
    "datm": {"iterations": ITERATIONS, "experts": 2, "expert_train_epochs": 2, "expert_model": "convnet-w16",
             "expert_epochs": 1, "max_start_epoch": 2, "min_start_epoch": 0, "sequential_generation": False,
             "syn_steps": 2, "threshold": 10.0, "lr_y": 5.0},
}


def _run(mnist, method: str, folder=None, cancel_at: int | None = None, crash_at: int | None = None, every: int = 2):
    """One run; ``cancel_at``: cancelled before that iteration; ``crash_at``: an error inside that iteration."""
    checks = []

    def is_cancelled() -> bool:
        checks.append(1)
        return cancel_at is not None and len(checks) > cancel_at

    cls = get_method(method)
    ctx = RunContext(dataset=mnist, ipc=1, seed=0, max_per_class=20, is_cancelled=is_cancelled,
                     checkpoints=CheckpointStore(folder), checkpoint_every=every)
    if crash_at is not None:  # a machine that stops mid-iteration: the fresh network of that iteration fails
        import pixelspace.synthetic as synthetic

        original = synthetic.build_network
        calls = []

        def failing(*args, **kwargs):
            calls.append(1)
            if len(calls) > crash_at:
                raise RuntimeError("machine stopped")
            return original(*args, **kwargs)

        synthetic.build_network = failing  # type: ignore[assignment]
        try:
            return cls().run(ctx, parse_params(cls, TINY[method]))
        finally:
            synthetic.build_network = original  # type: ignore[assignment]
    return cls().run(ctx, parse_params(cls, TINY[method]))


@pytest.mark.parametrize("method", ["dc", "dm", "dd", "mtt", "datm"])
def test_cancelled_then_resumed_equals_uninterrupted(mnist, tmp_path, method):
    straight = _run(mnist, method)
    with pytest.raises(Cancelled):
        _run(mnist, method, tmp_path, cancel_at=3)  # iterations 0-2 done, saved on cancel
    saved = torch.load(tmp_path / "distill-loop.pt", weights_only=False)
    assert saved["iteration"] == 3
    resumed = _run(mnist, method, tmp_path)
    assert torch.equal(resumed.images, straight.images)  # bit-identical
    assert torch.equal(resumed.extras["loss_curve"], straight.extras["loss_curve"])
    if method == "dd":
        assert torch.equal(resumed.extras["step_lrs"], straight.extras["step_lrs"])
    if method in ("mtt", "datm"):  # the learned lr, soft labels and skip count come back too
        assert resumed.learned_lr == straight.learned_lr
        assert resumed.metrics["loss_last"] == straight.metrics["loss_last"]
    if method == "datm":
        assert torch.equal(resumed.soft_labels, straight.soft_labels)
        assert resumed.metrics["skipped_updates"] == straight.metrics["skipped_updates"]


def test_stopped_machine_loses_at_most_one_interval(mnist, tmp_path):
    straight = _run(mnist, "dsa")
    with pytest.raises(RuntimeError, match="machine stopped"):
        _run(mnist, "dsa", tmp_path, crash_at=5, every=2)  # iteration 5 fails: 0-4 ran, 0-3 were saved
    assert torch.load(tmp_path / "distill-loop.pt", weights_only=False)["iteration"] == 4
    resumed = _run(mnist, "dsa", tmp_path)
    assert torch.equal(resumed.images, straight.images)


def test_finished_checkpoint_returns_the_result_and_another_run_is_refused(mnist, tmp_path):
    first = _run(mnist, "dm", tmp_path)
    again = _run(mnist, "dm", tmp_path, cancel_at=0)  # nothing left to do: never asks, never cancels
    assert torch.equal(again.images, first.images)
    cls = get_method("dm")
    ctx = RunContext(dataset=mnist, ipc=1, seed=1, max_per_class=20, checkpoints=CheckpointStore(tmp_path))
    with pytest.raises(DistillError, match="holds another run"):
        cls().run(ctx, parse_params(cls, TINY["dm"]))


def test_cli_resume_dir_checkpoints_and_continues(tmp_path):
    """`distill run --resume-dir DIR`: the run leaves its loop checkpoint there; run again, it continues from it."""
    from typer.testing import CliRunner

    from distill.archive import read_archive
    from distill.cli import app

    args = ["run", "dm", "--dataset", "mnist", "--ipc", "1", "--max-per-class", "20", "--quiet",
            "--set", "iterations=4", "--set", "batch_real=8", "--set", "model=convnet-w32",
            "--resume-dir", str(tmp_path / "ckpt")]
    first = CliRunner().invoke(app, [*args, "--out", str(tmp_path / "a.tar")])
    assert first.exit_code == 0, first.output
    assert torch.load(tmp_path / "ckpt" / "distill-loop.pt", weights_only=False)["iteration"] == 4
    second = CliRunner().invoke(app, [*args, "--out", str(tmp_path / "b.tar")])
    assert second.exit_code == 0, second.output
    assert "resuming at iteration 4 of 4" in second.output
    assert torch.equal(read_archive(tmp_path / "a.tar").distilled.images, read_archive(tmp_path / "b.tar").distilled.images)
    other = CliRunner().invoke(app, [*args[:-2], "--seed", "3", "--resume-dir", str(tmp_path / "ckpt"),
                                     "--out", str(tmp_path / "c.tar")])
    assert other.exit_code == 2 and "holds another run" in other.output
