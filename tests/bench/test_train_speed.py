"""bench/train_speed.py --quick prints one table with the reference path, every default fast path (with its ratio to
the reference), the compile columns and the accuracy row."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


@pytest.mark.timeout(900)  # under a minute of CPU (two cold compiles); several times that on a loaded shared host
def test_train_speed_quick_prints_every_column(tmp_path: Path) -> None:
    sys.path.insert(0, str(REPO / "bench"))
    import train_speed

    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    out = tmp_path / "table.md"
    result = subprocess.run([sys.executable, str(REPO / "bench" / "train_speed.py"), "--quick", "--out", str(out)],
                            capture_output=True, text=True, timeout=880, env=env, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "native bf16 (bf16_fast_on)" in result.stdout and "CPU: " in result.stdout
    table = [line for line in result.stdout.splitlines() if line.startswith("| ")]
    header = [cell.strip() for cell in table[0].strip("|").split("|")]
    assert header == train_speed.columns(train_speed.DEFAULT_PATHS)
    assert header[4:8] == ["ref s", "bf16 s (x ref)", "bf16+cl s (x ref)", "bf16+compile s (x ref)"]
    assert header[8:] == ["compile s", "compile pays after"]
    rows = [[cell.strip() for cell in line.strip("|").split("|")] for line in table[1:] if not line.startswith("|---")]
    assert [row[2] for row in rows[:2]] == ["epoch-ipc10", "test-2000"]
    for row in rows[:2]:
        assert len(row) == len(header)
        assert float(row[4]) > 0
        for cell in row[5:8]:
            seconds, ratio = cell.split()
            assert float(seconds) > 0 and ratio.startswith("(") and ratio.endswith("x)")
        assert float(row[8]) >= 0
    accuracy = rows[2]
    assert accuracy[2].startswith("accuracy") and all(cell.endswith("%") for cell in accuracy[4:8])
    assert out.read_text().count("| convnet |") == 3


def test_train_speed_rejects_unknown_rows_sizes_and_paths() -> None:
    sys.path.insert(0, str(REPO / "bench"))
    import train_speed

    for args in (["--rows", "epoch-ipc7"], ["--sizes", "convnet:48"], ["--sizes", "convnet:x"], ["--paths", "fp8"]):
        with pytest.raises(SystemExit, match="unknown"):
            train_speed.main(args)


@pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="a CUDA host runs the GPU rows instead")
def test_train_speed_device_cuda_without_a_gpu_is_one_clear_error() -> None:
    sys.path.insert(0, str(REPO / "bench"))
    import train_speed

    try:
        with pytest.raises(SystemExit, match="torch sees no CUDA device"):
            train_speed.main(["--device", "cuda", "--quick"])
    finally:
        train_speed.DEVICE = __import__("torch").device("cpu")
