"""A service that cannot keep its state or reach its job store stops with one `error:` line and exit status 2
(issue 13 item 6), not a traceback."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from service_support.helpers import service_env


@pytest.mark.parametrize("command", [["serve", "--workers", "0"], ["api"], ["worker"]])
def test_an_unwritable_home_is_one_error_line(tmp_path: Path, command: list[str]) -> None:
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    env = service_env(tmp_path, "sqlite", DISTILL_HOME=str(blocker / "home"))
    env.pop("DISTILL_DATABASE_URL")  # the default: SQLite under DISTILL_HOME
    done = subprocess.run([sys.executable, "-m", "distill.cli", *command], env=env, capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 2, done.stdout + done.stderr
    assert done.stderr.strip().splitlines() == [f"error: DISTILL_HOME {blocker / 'home'} is not writable: Not a directory"]


def test_an_unreachable_job_store_is_one_error_line(tmp_path: Path) -> None:
    env = service_env(tmp_path, "sqlite", DISTILL_DATABASE_URL="postgresql+psycopg://nobody:secret@127.0.0.1:1/x")
    done = subprocess.run([sys.executable, "-m", "distill.cli", "api"], env=env, capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 2
    (line,) = done.stderr.strip().splitlines()
    assert line.startswith("error: cannot open the job store postgresql+psycopg://nobody:***@127.0.0.1:1/x: ")
    assert "secret" not in line
