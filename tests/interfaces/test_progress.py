"""Progress without a terminal: `distill run` and `distill eval` print a line per stage and periodically."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from distill.progress import ProgressLines, eta, overall_progress, score_text


def test_progress_lines() -> None:
    lines: list[str] = []
    sink = ProgressLines("run", every=3600, write=lines.append)
    sink("encode", 0.0)
    sink("encode", 0.5)  # within `every` of the last line: quiet
    sink("encode", 1.0, "10 shards")
    sink("kmeans", 0.2)
    assert lines == ["run: encode 0% (eta ?)", "run: encode 100% (done) 10 shards", "run: kmeans 20% (eta ?)"]
    ticking = ProgressLines("eval", every=0, write=lines.append)
    ticking("train", 0.25)
    ticking("train", 0.5)
    assert lines[-1].startswith("eval: train 50% (eta ")


def test_overall_progress_never_restarts_at_a_stage_change() -> None:
    plan = [("encode", 60.0), ("quantize", 30.0), ("decode", 10.0)]
    seen = []
    for done, current, fraction in (([], "encode", 0.0), ([], "encode", 0.5), ([("encode", 70.0)], "quantize", 0.0),
                                    ([("encode", 70.0)], "quantize", 0.9), ([("encode", 70.0), ("quantize", 31.0)],
                                                                            "decode", 0.5)):
        seen.append(overall_progress(plan, done, current, fraction)[0])
    assert seen == sorted(seen) and seen == pytest.approx([0.0, 0.3, 0.6, 0.87, 0.95])
    # twice as slow as estimated so far: the time left is the estimate's remainder, doubled
    fraction, left = overall_progress(plan, [("encode", 120.0)], "quantize", 0.0, elapsed=120.0)
    assert (fraction, left) == pytest.approx((0.6, 80.0))
    # a stage the estimate did not know (e.g. after a change of method code) counts with its measured time
    assert overall_progress(plan, [("teacher", 100.0)], "encode", 0.0)[0] == pytest.approx(0.5)


def test_one_run_has_no_spread() -> None:
    assert score_text(96.584, 0.0, 1) == "96.58 %" and score_text(96.584, 0.081, 2) == "96.58 ± 0.08 %"


def test_eta_counts_from_where_a_stage_resumed(monkeypatch: pytest.MonkeyPatch) -> None:
    """An evaluation's `train` resumes after each student's `test` pass: its ETA must not restart from zero."""
    assert eta(600.0, 0.5, 0.75) == "10m00s" and eta(600.0, 0.0, 0.005) == "?"
    clock = [0.0]
    monkeypatch.setattr("distill.progress.time.monotonic", lambda: clock[0])
    lines: list[str] = []
    sink = ProgressLines("eval", every=0, write=lines.append)
    sink("train", 0.0)
    clock[0] = 1000.0
    sink("test", 0.25)
    clock[0] = 1010.0
    sink("train", 0.25)  # the next student; a quarter of the evaluation is done
    clock[0] = 1110.0
    sink("train", 0.5)  # a quarter in 100 s: half left takes 200 s (fraction / elapsed would say 100 s)
    assert lines[-1] == "eval: train 50% (eta 3m20s)"


def test_run_in_a_pipe_prints_stage_lines(tmp_path: Path) -> None:
    distill = Path(sys.executable).with_name("distill")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    env.pop("DISTILL_PROGRESS", None)
    done = subprocess.run([str(distill), "run", "random", "--dataset", "mnist", "--ipc", "1", "--max-per-class", "5",
                           "--out", str(tmp_path / "r.tar")], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert "run: archive 100% (done)" in done.stderr.splitlines()
    quiet = subprocess.run([str(distill), "run", "random", "--dataset", "mnist", "--ipc", "1", "--max-per-class", "5",
                            "--out", str(tmp_path / "q.tar"), "--quiet"], env=env, capture_output=True, text=True,
                           timeout=300)
    assert quiet.returncode == 0 and "run: " not in quiet.stderr


def test_job_watcher_joining_part_way_times_from_where_it_joined(monkeypatch: pytest.MonkeyPatch,
                                                                  capsys: pytest.CaptureFixture[str]) -> None:
    """`distill submit --wait` that finds its job (same idempotency key) already half through a stage."""
    from distill.api_types import Job
    from distill.remote import Progress

    clock = [0.0]
    monkeypatch.setattr("distill.remote.time.monotonic", lambda: clock[0])
    watcher = Progress(tty=False, every=0)
    watcher(Job.model_construct(id="j1", status="running", stage="encode", progress=0.5))
    clock[0] = 100.0
    watcher(Job.model_construct(id="j1", status="running", stage="encode", progress=0.75))
    assert capsys.readouterr().err.splitlines()[-1] == "j1 running 0% overall, stage=encode 75%, eta 1m40s"
