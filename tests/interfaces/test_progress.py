"""Progress without a terminal: `distill run` and `distill eval` print a line per stage and periodically."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from distill.progress import ProgressLines


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
