"""`distill submit / jobs / status / logs / cancel / download` against a real `distill serve`."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from service_support.helpers import wait_until

from distill.archive import read_archive
from distill.client import Client

from .conftest import KEY, SLOW_PARAMS, Server


def test_submit_wait_download_then_inspect(server: Server, tmp_path: Path) -> None:
    out = tmp_path / "mnist.tar"
    run = server.cli("submit", "random", "--dataset", "mnist", "--ipc", "2", "--max-per-class", "20", "--set", "seed=1",
                     "--wait", "--download", str(out))
    # --set seed=1 is not a parameter of random: rejected before anything is queued
    assert run.returncode == 2 and run.stderr.startswith("error: params.seed: ") and not out.exists(), run.stderr
    run = server.cli("submit", "random", "--dataset", "mnist", "--ipc", "2", "--max-per-class", "20", "--wait",
                     "--download", str(out))
    assert run.returncode == 0, run.stderr
    assert "sha256 verified" in run.stdout and read_archive(out).manifest["ipc"] == 2
    # not a terminal: periodic plain progress lines on stderr, no bar
    assert "submitted job_" in run.stderr and "estimate " in run.stderr and "succeeded 100% overall" in run.stderr
    job_id = run.stdout.split()[0]
    status = json.loads(server.cli("status", job_id, "--json").stdout)
    assert status["status"] == "succeeded" and hashlib.sha256(out.read_bytes()).hexdigest() == status["artifact"]["sha256"]
    assert "succeeded random on mnist, ipc 2" in server.cli("status", job_id).stdout
    listing = server.cli("jobs")
    assert listing.returncode == 0 and job_id in listing.stdout and "100%" in listing.stdout
    assert job_id in [j["id"] for j in json.loads(server.cli("jobs", "--json").stdout)]
    logs = server.cli("logs", job_id)
    assert "job queued" in logs.stdout and "succeeded" in logs.stdout
    again = tmp_path / "again.tar"
    fetched = server.cli("download", job_id, str(again))
    assert fetched.returncode == 0 and again.read_bytes() == out.read_bytes()


def test_logs_follow_and_cancel(server: Server) -> None:
    submitted = server.cli("submit", "dm", "-d", "mnist", "--ipc", "1", "--max-per-class", "10",
                           *[f"--set={k}={v}" for k, v in SLOW_PARAMS.items()], "--json")
    assert submitted.returncode == 0, submitted.stderr
    job_id = json.loads(submitted.stdout)["id"]
    with Client(server.url, api_key=KEY) as client:
        try:
            wait_until(lambda: client.get(job_id).stage == "distill", timeout=120)
            cancelled = server.cli("cancel", job_id)
            assert cancelled.returncode == 0 and "cancel requested" in cancelled.stdout, cancelled.stderr
            follow = server.cli("logs", job_id, "--follow", timeout=120)  # returns once the job has stopped
            assert follow.returncode == 0, follow.stderr
            assert "cancelled dm on mnist" in follow.stdout.splitlines()[-1]
            assert "[distill]" in follow.stdout
        finally:
            if not client.get(job_id).terminal:
                client.cancel(job_id)


def test_bad_input_one_error_line_per_field_exit_2(server: Server) -> None:
    run = server.cli("submit", "random", "--dataset", "nope", "--ipc", "1", "--set", "bogus=1")
    assert run.returncode == 2
    lines = run.stderr.strip().splitlines()
    assert len(lines) == 2 and all(line.startswith("error: ") for line in lines)
    assert any(line.startswith("error: dataset: unknown dataset 'nope'") for line in lines)
    assert any(line.startswith("error: params.bogus: ") for line in lines)
    shape = server.cli("submit", "random", "--dataset", "mnist", "--ipc", "0")
    assert shape.returncode == 2 and shape.stderr.startswith("error: ipc: Input should be greater than or equal to 1")
    bad_set = server.cli("submit", "random", "--dataset", "mnist", "--ipc", "1", "--set", "novalue")
    assert bad_set.returncode == 2 and bad_set.stderr.startswith("error: --set expects KEY=VALUE")
    missing = server.cli("status", "job_doesnotexist")
    assert missing.returncode == 2 and missing.stderr.strip() == "error: 404 Not Found: no job job_doesnotexist"
    finished = server.cli("submit", "random", "-d", "mnist", "--ipc", "1", "--max-per-class", "5", "--wait")
    job_id = finished.stdout.split()[0]
    assert server.cli("cancel", job_id).returncode == 2  # already finished: 409, one line


def test_wrong_key_and_unreachable_server(server: Server) -> None:
    wrong = server.cli("jobs", key="not-a-key")
    assert wrong.returncode == 2
    assert wrong.stderr.strip() == "error: 401 Unauthorized: missing or invalid API key (set DISTILL_API_KEY or --api-key)"
    nokey = server.cli("jobs", key=None)
    assert nokey.returncode == 2 and "401" in nokey.stderr
    down = server.cli("jobs", "--server", "http://127.0.0.1:9")
    assert down.returncode == 1 and down.stderr.startswith("error: cannot reach http://127.0.0.1:9")
    assert server.cli("--version").stdout.startswith("distill ")


def test_serve_says_where_the_page_and_api_are(server: Server) -> None:
    lines = [line for line in server.log.read_text().splitlines() if line.startswith("distillery: ")]
    assert lines == [f"distillery: web page {server.url}/  ·  API {server.url} (docs {server.url}/docs)  ·  "
                     "1 local worker (CPU)  ·  API keys required"]


def test_name_evaluate_status_rerun_delete(server: Server) -> None:
    run = server.cli("submit", "random", "-d", "tiny-folder", "--ipc", "2", "--name", "cli tiny", "--evaluate",
                     "--eval-runs", "1", "--eval-epochs", "2")
    assert run.returncode == 0, run.stderr
    job_id = run.stdout.split()[0]
    assert '"cli tiny"' in run.stdout and "accuracy " in run.stdout and "control " in run.stdout, run.stdout
    assert "±" not in run.stdout  # one run: no spread to show
    assert "estimate " in run.stderr and f"evaluating {job_id} as job_" in run.stderr
    latest = server.cli("status")  # no id: the latest job, here the evaluation
    assert latest.returncode == 0 and f"evaluation of {job_id}" in latest.stdout and "stages: " in latest.stdout
    listing = server.cli("jobs", "--limit", "5")
    row = next(line for line in listing.stdout.splitlines() if line.startswith(job_id))
    assert "cli tiny" in row and "accuracy " in row and "succeeded" in row
    again = server.cli("rerun", job_id, "--name", "again")
    assert again.returncode == 0, again.stderr
    rerun_id = again.stdout.strip()
    # host:port without a scheme is accepted (http assumed)
    bare = server.cli("status", rerun_id, DISTILL_SERVER=server.url.removeprefix("http://"))
    assert bare.returncode == 0 and '"again"' in bare.stdout, bare.stderr
    with Client(server.url, api_key=KEY) as client:
        client.wait(rerun_id, timeout=120)
    assert server.cli("delete", job_id).stdout.strip() == f"deleted {job_id}"
    gone = server.cli("status", job_id)
    assert gone.returncode == 2 and "404" in gone.stderr
