"""RunContext.track checks for cancellation by time (issue 13 item 2): a run with a huge step count is stopped
within about a second of the cancel, however rarely a count-based check would have come."""

from __future__ import annotations

import time

import pytest
import torch

from distill.errors import Cancelled
from distill.methods.base import CHECK_SECONDS, RunContext


def test_a_cancel_is_noticed_within_seconds_whatever_the_step_count() -> None:
    cancelled_at = time.monotonic() + 0.3
    seen: list[tuple[str, float]] = []
    ctx = RunContext(dataset=None, ipc=1, is_cancelled=lambda: time.monotonic() > cancelled_at,  # type: ignore[arg-type]
                     progress_sink=lambda stage, fraction, message=None: seen.append((stage, fraction)))
    started = time.monotonic()
    with pytest.raises(Cancelled):
        for _ in ctx.steps(10**12, "distill"):  # checked every 10**10 steps before
            time.sleep(0.01)
            if time.monotonic() - started > 5:
                break
    assert time.monotonic() - cancelled_at < CHECK_SECONDS + 0.3
    assert seen[0] == ("distill", 0.0) and len(seen) >= 2  # progress too is reported by time


def test_every_still_forces_a_check_per_item() -> None:
    calls = []
    ctx = RunContext(dataset=None, ipc=1, is_cancelled=lambda: calls.append(1) or False)  # type: ignore[arg-type]
    assert list(ctx.track(range(5), "quick", every=1)) == [0, 1, 2, 3, 4]
    assert len(calls) == 5
    calls.clear()
    list(ctx.steps(1000, "fast"))  # microseconds per item: one check at the start
    assert len(calls) == 1


def test_an_evaluation_stops_at_the_next_step_after_a_cancel(mnist) -> None:
    """distill.evaluate's loops (students, test pass, control) call check_cancelled before every step."""
    from distill.evaluate import EvalConfig, evaluate_distilled
    from distill.methods.base import DistilledSet

    images = mnist.train.load(range(20)).float() / 255
    distilled = DistilledSet(images=images, labels=torch.from_numpy(mnist.train.labels[:20].copy()))
    calls: list[float] = []

    def check() -> None:
        calls.append(time.monotonic())
        if len(calls) > 3:
            raise Cancelled("job cancelled")

    config = EvalConfig(runs=2, epochs=50, batch_size=4, test_limit=100)
    with pytest.raises(Cancelled):
        evaluate_distilled(distilled, mnist, config, control_ipc=1, check_cancelled=check)
    assert len(calls) == 4 and calls[-1] - calls[0] < 2.0
