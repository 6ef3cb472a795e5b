"""bench/gpu_check.py --cpu-smoke: the prepared GPU check runs its every section at tiny sizes on the CPU, so
the script is known to work before a GPU host runs it."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


@pytest.mark.timeout(480)
def test_gpu_check_cpu_smoke_prints_one_table_with_every_section_ok(tmp_path: Path) -> None:
    out = tmp_path / "rows.json"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "DISTILL_NUM_THREADS": "1"}
    result = subprocess.run([sys.executable, str(REPO / "bench" / "gpu_check.py"), "--cpu-smoke", "--json", str(out)],
                            capture_output=True, text=True, timeout=450, env=env, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    table = [line for line in result.stdout.splitlines() if line.startswith("| ")]
    assert table[0] == "| section | setting | result | seconds | status |"
    rows = json.loads(out.read_text())["rows"]
    sections = {row[0] for row in rows}
    assert sections == {"encode", "dit", "kmeans", "service", "pixel", "dc-mnist"}
    problems = [row for row in rows if row[4] not in ("ok", "skipped")]
    assert not problems, problems
    skipped = [row for row in rows if row[4] == "skipped"]
    assert [row[1] for row in skipped] == ["faiss GPU"]  # the only thing a CPU host cannot run
    pixel = {row[1].split(",")[0] for row in rows if row[0] == "pixel"}
    assert pixel == {"dd", "dc", "dsa", "dm", "mtt", "datm", "dq"}
    assert any("archive verified" in row[2] for row in rows if row[0] == "service")


def test_gpu_check_guards_each_section_and_rejects_unknown_ones(tmp_path: Path) -> None:
    sys.path.insert(0, str(REPO / "bench"))
    import gpu_check

    table = gpu_check.Table(budget_s=100)
    table.guarded("boom", 0, lambda: 1 / 0)
    table.guarded("late", 1000, lambda: None)
    assert [row[4] for row in table.rows] == ["error", "skipped"]
    assert "ZeroDivisionError" in table.rows[0][2]
    assert gpu_check.main(["--sections", "nope"]) == 2
