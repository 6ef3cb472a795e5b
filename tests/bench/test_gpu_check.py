"""bench/gpu_check.py --cpu-smoke: the prepared GPU check runs every section at tiny sizes on the CPU, and the
device kit is rehearsed here - built for this Python, installed with no index into a clean folder beside only
the packages the lent image has, and run through bench/gpu_run.sh - so that a missing wheel, an import the image
cannot satisfy or a network access fails here, not in the few minutes of a lent GPU."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
NO_NETWORK = {key: "http://127.0.0.1:9" for key in ("http_proxy", "https_proxy", "HTTP_PROXY", "HTTPS_PROXY")}


def rows_of(folder: Path) -> list[dict]:
    return [json.loads(line) for line in (folder / "rows.jsonl").read_text().splitlines() if line.strip()]


@pytest.mark.timeout(420)
def test_the_kit_installs_offline_beside_the_image_packages_and_the_check_runs_from_it(tmp_path: Path) -> None:
    sys.path.insert(0, str(REPO / "bench"))
    import gpu_kit

    kit = REPO / "build" / "gpu-kit-local"  # kept between runs: a rebuild downloads nothing new
    env = {**os.environ, "OMP_NUM_THREADS": "1", "DISTILL_NUM_THREADS": "1"}
    built = subprocess.run([sys.executable, str(REPO / "bench" / "gpu_kit.py"), "--out", str(kit), "--python", "local"],
                           capture_output=True, text=True, env=env, timeout=300)
    assert built.returncode == 0, built.stderr[-2000:]
    assert "MiB" in built.stdout and (kit / "data" / "mnist").is_dir()
    image = gpu_kit.image_site(tmp_path / "image")
    assert (image / "torch").exists() and not (image / "pydantic").exists() and not (image / "ray").exists()
    env = {k: v for k, v in env.items() if k not in ("PYTHONPATH", "DISTILL_DATA_DIR", "DISTILL_HOME")}
    env.update(NO_NETWORK, OUT=str(tmp_path / "out"), KIT=str(kit), PYTHON=f"{sys.executable} -S",
               PIP=f"{sys.executable} -m pip", SITE=str(tmp_path / "site"), BASE_PYTHONPATH=str(image),
               BUDGET_S="300", CHECK_ARGS="--cpu-smoke")
    run = subprocess.run(["bash", str(REPO / "bench" / "gpu_run.sh")], capture_output=True, text=True, env=env,
                         timeout=400)
    out = tmp_path / "out"
    assert run.returncode == 0, (run.stdout[-2000:], (out / "log.txt").read_text()[-3000:])
    rows = rows_of(out)
    assert {r["section"] for r in rows} == set(gpu_kit_sections())
    problems = [r for r in rows if r["status"] not in ("ok", "skipped")]
    assert not problems, problems
    # what the lent image cannot run, and says so: no FAISS (the torch k-means instead), no Ray service
    assert sorted((r["section"], r["setting"].split(",")[0]) for r in rows if r["status"] == "skipped") == [
        ("kmeans", "faiss"), ("service", "oq via distill api + distill worker --ray-address local")]
    assert {r["setting"].split(",")[0] for r in rows if r["section"] == "pixel"} == {"dd", "dc", "dsa", "dm", "mtt",
                                                                                      "datm", "dq"}
    keys = {r["key"] for r in rows if r["key"]}
    assert {"loader_img_s", "encode_img_s", "encode_cpu_fed_img_s", "latent_cache_img_s", "teacher_train_img_s",
            "resnet18_train_img_s_channels_last", "refine_s_per_class_iter_ipc2_real4"} <= keys
    assert (out / "table.md").read_text().count("\n| ") == len(rows) + 1  # header row + one line per row
    speed = (out / "train_speed.md").read_text()  # the training-speed rows run from the kit too (CPU: --quick)
    assert "| convnet | 28 | epoch-ipc10 |" in speed and "| convnet | 28 | test-2000 |" in speed
    env_txt = (out / "env.txt").read_text()
    assert "torch" in env_txt and "ray not installed" in env_txt and "diffusers" in env_txt


def gpu_kit_sections() -> tuple[str, ...]:
    sys.path.insert(0, str(REPO / "bench"))
    import gpu_check

    return gpu_check.SECTIONS


@pytest.mark.timeout(300)
def test_the_service_section_runs_an_oq_job_through_the_api_and_ray(tmp_path: Path) -> None:
    """The one section the image cannot run (no Ray there): here, with the service's packages installed."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "DISTILL_NUM_THREADS": "1"}
    result = subprocess.run([sys.executable, str(REPO / "bench" / "gpu_check.py"), "--cpu-smoke", "--sections",
                             "service", "--out", str(tmp_path)], capture_output=True, text=True, timeout=280, env=env,
                            cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    (row,) = rows_of(tmp_path)
    assert row["status"] == "ok" and "archive verified" in row["result"], row


def test_sections_are_bounded_rows_are_written_as_measured_and_bad_arguments_are_refused(tmp_path: Path) -> None:
    sys.path.insert(0, str(REPO / "bench"))
    import time

    import gpu_check

    table = gpu_check.Table(budget_s=100, out=tmp_path)
    table.guarded("boom", 10, lambda: 1 / 0)
    table.guarded("slow", 0.5, lambda: time.sleep(5))  # its own limit stops it
    table.budget_s = 0  # the budget is spent: the next section is a row, not a run
    table.guarded("late", 10, lambda: None)
    assert [r["status"] for r in rows_of(tmp_path)] == ["error", "timeout", "skipped"]
    assert "ZeroDivisionError" in table.rows[0].result and "limit" in table.rows[1].result
    assert table.rows[1].seconds is not None and table.rows[1].seconds < 3
    assert (tmp_path / "table.md").read_text().count("\n| ") == 4
    assert gpu_check.main(["--sections", "nope"]) == 2
    assert gpu_check.main(["--budget-s", "0"]) == 2


def test_the_imagenet_projection_is_one_table_and_measured_rates_replace_the_assumed_ones(tmp_path: Path) -> None:
    script = REPO / "bench" / "imagenet_projection.py"
    assumed = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, check=True).stdout
    rows = tmp_path / "rows.jsonl"
    rows.write_text(json.dumps({"section": "encode", "setting": "SD-VAE encoder, uint8 on the device", "key":
                                "encode_img_s", "value": 500.0, "status": "ok"}) + "\n"
                    + json.dumps({"section": "encode", "setting": "failed", "key": "loader_img_s", "value": 1.0,
                                  "status": "error"}) + "\n"
                    + json.dumps({"section": "refine", "setting": "DM step", "key":
                                  "refine_s_per_class_iter_ipc10_real64", "value": 0.01, "status": "ok"}) + "\n")
    measured = subprocess.run([sys.executable, str(script), "--rates", str(rows)], capture_output=True, text=True,
                              check=True).stdout
    for out in (assumed, measured):
        table = [line for line in out.splitlines() if line.startswith("|")]
        assert table[0] == "| stage | IPC 10 | IPC 50 | basis |" and len(table) == 14
        assert out.count("\n\n") == 1  # a title and one table
    encode = [line for line in measured.splitlines() if "SD-VAE encode" in line][0]
    assert "500 img/s (measured: SD-VAE encoder, uint8 on the device)" in encode
    assert "43.1 min" in encode  # 1,281,167 images / 500 img/s x 1.01 overlap; the error row is ignored
    assert "3,000 img/s" in assumed and "measured:" not in assumed
    refine = [line for line in measured.splitlines() if "opt-in refinement" in line][0]
    assert "| 8.3 min |" in refine and "0.01 s per class-iteration (measured: DM step)" in refine  # 1000 x 50 x 0.01 s
    bad = subprocess.run([sys.executable, str(script), "--rates", str(tmp_path / "missing.jsonl")],
                         capture_output=True, text=True)
    assert bad.returncode == 2 and bad.stderr.startswith("error:")
