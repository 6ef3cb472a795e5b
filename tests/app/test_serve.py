"""`distill serve` as a user runs it: API plus a supervised local worker process in one command. The
supervisor restarts a dead worker, and kills one whose job ignores a cancel past the grace period."""

from __future__ import annotations

from pathlib import Path

import httpx
from service_support.helpers import KEY_A, Proc, free_port, service_env, wait_for_job, wait_until

QUICK = {"dataset": "mnist", "method": "random", "ipc": 1, "params": {}, "max_per_class": 20}


def test_serve_runs_jobs_and_enforces_cancel(tmp_path: Path) -> None:
    port = free_port()
    env = service_env(tmp_path, "sqlite", DISTILL_CANCEL_GRACE_SECONDS="1")
    serve = Proc(["serve", "--port", str(port), "--workers", "1", "--no-access-log"], env, tmp_path / "serve.log")
    serve.start()
    base = f"http://127.0.0.1:{port}"
    try:
        def healthy() -> bool:
            assert serve.process is not None and serve.process.poll() is None, serve.tail()
            try:
                return httpx.get(base + "/healthz", timeout=2).status_code == 200
            except httpx.HTTPError:
                return False

        wait_until(healthy, timeout=90, what="distill serve")
        with httpx.Client(base_url=base, headers={"Authorization": f"Bearer {KEY_A}"}, timeout=30) as client:
            first = client.post("/jobs", json=QUICK).json()["id"]
            assert wait_for_job(client, first)["status"] == "succeeded", serve.tail()

            # A job stuck between checks (5 s steps) is cancelled by killing its worker after 1 s of grace.
            stuck = client.post("/jobs", json={**QUICK, "method": "slow-test",
                                               "params": {"iterations": 4, "step_seconds": 5}}).json()["id"]
            wait_until(lambda: any(e["stage"] == "wait" for e in
                                   client.get(f"/jobs/{stuck}/events").json()["data"]), timeout=60,
                       what="the stuck job's slow stage")
            client.post(f"/jobs/{stuck}/cancel")
            job = wait_for_job(client, stuck, timeout=30)
            assert job["status"] == "cancelled", job
            assert "worker killed" in job["error"]["message"], job["error"]

            # The supervisor restarted the worker: new jobs still run.
            after = client.post("/jobs", json={**QUICK, "seed": 5}).json()["id"]
            assert wait_for_job(client, after, timeout=90)["status"] == "succeeded", serve.tail()

            # Stopping the service (SIGTERM) hands a running job back to the queue for the next start.
            running = client.post("/jobs", json={**QUICK, "method": "slow-test",
                                                 "params": {"iterations": 100, "step_seconds": 0.1}}).json()["id"]
            wait_for_job(client, running, statuses=("running",), timeout=60)
    finally:
        serve.stop(timeout=30)
    assert serve.process is not None and serve.process.returncode is not None
    log = serve.log_path.read_text()
    assert '"msg": "job ignored its cancel; killing its worker"' in log
    assert log.count('"msg": "worker process started"') == 2  # restarted at once after the kill
    assert '"msg": "job released (worker shutting down)"' in log

    from workers.jobs import make_store

    store = make_store(env["DISTILL_DATABASE_URL"])
    released = store.get_job(running)
    assert released.status == "queued" and released.attempts == 0 and released.worker_id is None
    store.engine.dispose()


def test_logs_are_plain_on_a_terminal_and_json_elsewhere(monkeypatch) -> None:  # noqa: ANN001
    """`distill serve` on a terminal prints readable lines; piped or collected, one JSON object per line."""
    import json
    import logging

    from workers.logs import AutoFormatter, log_format

    record = logging.makeLogRecord({"name": "distill.worker", "levelname": "INFO", "msg": "job started",
                                    "method": "oq"})
    monkeypatch.setenv("DISTILL_LOG_FORMAT", "plain")
    assert log_format() == "plain"
    plain = AutoFormatter().format(record)
    assert plain.endswith("info    job started  method=oq") and not plain.startswith("{")
    monkeypatch.setenv("DISTILL_LOG_FORMAT", "json")
    assert json.loads(AutoFormatter().format(record))["msg"] == "job started"
    monkeypatch.setenv("DISTILL_LOG_FORMAT", "auto")
    assert log_format() == "json"  # pytest captures stdout: not a terminal
