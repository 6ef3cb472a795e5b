"""Progress a person can follow in a log or a pipe: one line per stage change and at most every ``every`` seconds,
with stage, percent and an ETA for the stage (a terminal gets tqdm bars instead, where a stage has them)."""

from __future__ import annotations

import sys
import time
from collections.abc import Callable


def duration(seconds: float) -> str:
    seconds = int(seconds)
    if seconds < 60:
        return f"{seconds}s"
    if seconds < 3600:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    if seconds < 86400:
        return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"
    return f"{seconds // 86400}d{seconds % 86400 // 3600:02d}h"


def score_text(mean: float, std: float, runs: int) -> str:
    """``96.58 %`` for one run, ``96.58 ± 0.08 %`` for several (a single run has no spread to show)."""
    return f"{mean:.2f} %" if runs <= 1 else f"{mean:.2f} ± {std:.2f} %"


def eta(elapsed: float, start_fraction: float, fraction: float) -> str:
    """Time left at the rate seen since the stage began at ``start_fraction``.

    A stage can resume part-way (an evaluation's ``train`` after each student's ``test`` pass, on one 0-1 scale),
    so the rate is what was done since then, not ``fraction / elapsed``, which would promise minutes for hours.
    """
    done = fraction - start_fraction
    if done <= 0.01 or elapsed < 1:
        return "?"
    return duration(elapsed * (1 - fraction) / done)


class ProgressLines:
    """A progress sink (``(stage, fraction, message=None)``) that prints ``label: stage 45% (eta 1m20s)`` lines."""

    def __init__(self, label: str, every: float = 30.0, write: Callable[[str], None] | None = None):
        self.label, self.every = label, every
        self.write = write or (lambda line: print(line, file=sys.stderr, flush=True))
        self.stage: str | None = None
        self.stage_started = self.last_line = time.monotonic()
        self.stage_start_fraction = 0.0
        self.finished_stage = False

    def __call__(self, stage: str, fraction: float, message: str | None = None) -> None:
        now = time.monotonic()
        if stage != self.stage:
            self.stage, self.stage_started, self.finished_stage = stage, now, False
            self.stage_start_fraction = fraction
        elif fraction >= 1.0 and not self.finished_stage:
            self.finished_stage = True
        elif now - self.last_line < self.every:
            return
        self.last_line = now
        tail = "done" if fraction >= 1.0 else f"eta {eta(now - self.stage_started, self.stage_start_fraction, fraction)}"
        self.write(f"{self.label}: {stage} {100 * fraction:.0f}% ({tail})" + (f" {message}" if message else ""))

    def close(self) -> None:
        pass


StagePlan = list[tuple[str, float]]


def overall_progress(planned: StagePlan, done: StagePlan, current: str | None, fraction: float,
                     elapsed: float | None = None) -> tuple[float, float | None]:
    """(overall fraction, seconds left) across every stage of a job.

    ``planned`` is the estimate made at submit (stage, seconds), ``done`` what finished (stage, seconds), and
    ``current``/``fraction`` the stage running now. Overall progress is one minus the estimated seconds still
    ahead over the estimate's total, so a bar never restarts at a stage change. The time left is that remainder
    scaled by how fast this job has gone against the estimate so far (once a tenth of it is behind us), so a
    loaded host corrects a prior that was measured on an idle one.
    """
    estimate = dict(planned)
    total = sum(estimate.values()) + sum(seconds for stage, seconds in done if stage not in estimate)
    if total <= 0:
        return (fraction if current else 0.0), None
    passed = {stage for stage, _ in done}
    ahead = sum(seconds for stage, seconds in planned if stage not in passed and stage != current)
    if current is not None and current not in passed:
        ahead += (1.0 - min(max(fraction, 0.0), 1.0)) * estimate.get(current, 0.0)
    overall = min(max(1.0 - ahead / total, 0.0), 1.0)
    if elapsed is None:
        return overall, None
    behind = total - ahead
    speed = elapsed / behind if behind >= 0.1 * total and behind > 0 else 1.0
    return overall, max(ahead * speed, 0.0)
