"""bench/input_layout.py --quick prints one table row per size and path with both layouts' step times."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def test_input_layout_quick_prints_its_table() -> None:
    result = subprocess.run([sys.executable, str(REPO / "bench" / "input_layout.py"), "--quick"],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    rows = [line for line in result.stdout.splitlines() if line.startswith("| 8 |")]
    assert len(rows) == 1
    cells = [cell.strip() for cell in rows[0].strip("|").split("|")]
    assert cells[1].endswith("eager") and float(cells[2]) > 0 and float(cells[3]) > 0 and cells[4].endswith("x")
