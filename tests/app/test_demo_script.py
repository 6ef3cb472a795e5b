"""README command 1 runs scripts/demo.py: a real `distill serve`, POST /jobs, polling, download of the archive."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from distill.archive import read_archive

REPO = Path(__file__).resolve().parents[2]


def run_demo(tmp_path: Path, out: Path, *args: str) -> subprocess.CompletedProcess:
    """scripts/demo.py in its own DISTILL_HOME, loopback without API keys, on the default SQLite store."""
    env = {**os.environ, "DISTILL_HOME": str(tmp_path / "home"), "OMP_NUM_THREADS": "1"}
    for key in ("DISTILL_API_KEYS", "DISTILL_DATABASE_URL", "DATABASE_URL", "DISTILL_CONFIG"):
        env.pop(key, None)
    return subprocess.run([sys.executable, str(REPO / "scripts" / "demo.py"), "--out", str(out), *args],
                          env=env, capture_output=True, text=True, timeout=300)


def test_demo_submits_a_job_downloads_a_verified_archive_and_evaluates_it(tmp_path: Path):
    out = tmp_path / "out" / "mnist-random-2.tar"
    done = run_demo(tmp_path, out, "--method", "random", "--ipc", "2", "--max-per-class", "20", "--evaluate",
                    "--eval-runs", "1", "--eval-epochs", "2", "--eval-test-limit", "200")
    assert done.returncode == 0, done.stdout + done.stderr
    lines = done.stdout.splitlines()
    assert "succeeded" in done.stdout and f"wrote {out}" in done.stdout and "estimate: " in done.stdout
    result = next(line for line in lines if line.startswith("result: random accuracy "))
    assert "random real images, same size: " in result and "gain " in result and "±" not in result  # one run
    assert "the page: " in lines[-1] and done.stderr == ""
    assert len(lines) <= 40, done.stdout  # a screen, not a log
    archive = read_archive(out)  # sha256 of every member verified
    assert archive.manifest["method"] == "random" and archive.manifest["ipc"] == 2
    assert len(archive.distilled) == 20
    assert not [p for p in out.parent.iterdir() if p.name.endswith(".part")]


def test_demo_reports_a_rejected_request(tmp_path: Path):
    out = tmp_path / "out" / "x.tar"
    done = run_demo(tmp_path, out, "--method", "no-such-method")
    assert done.returncode != 0 and "POST /jobs -> 4" in done.stderr
    assert not out.exists()


def test_demo_rejects_bad_params_before_starting_a_server(tmp_path: Path):
    out = tmp_path / "out" / "x.tar"
    done = run_demo(tmp_path, out, "--params", "{not json")
    assert done.returncode != 0 and "--params is not valid JSON" in done.stderr
    assert not out.exists() and not out.with_name("x.tar.server.log").exists()
