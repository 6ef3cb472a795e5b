"""A standalone `distill worker` (split mode: `distill api` + `distill worker`) honours a cancel and SIGTERM
within seconds (issue 13 item 2): it reads the cancel flag about every second whatever the heartbeat period,
and its supervising parent kills a job that ignores a cancel or a stop past the grace and re-queues it."""

from __future__ import annotations

import time
from collections.abc import Iterator

import httpx
import pytest
from service_support.helpers import BACKENDS, Stack, service_env, started_stack, wait_for_job, wait_until

from workers.jobs import make_store


def slow(iterations: int, step_seconds: float) -> dict:
    return {"dataset": "mnist", "method": "slow-test", "ipc": 1, "max_per_class": 20,
            "params": {"iterations": iterations, "step_seconds": step_seconds}}


@pytest.fixture(scope="module", params=BACKENDS)
def split(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    """API + one supervised standalone worker with a 5 s heartbeat (the default): the cancel must not wait for it."""
    home = tmp_path_factory.mktemp(f"split-{request.param}")
    env = service_env(home, request.param, DISTILL_HEARTBEAT_SECONDS="5", DISTILL_LEASE_SECONDS="30",
                      DISTILL_CANCEL_GRACE_SECONDS="2", DISTILL_STOP_GRACE_SECONDS="2")
    with started_stack(home, request.param, env, supervised=True) as stack:
        yield stack


def running_stage(client: httpx.Client, job_id: str) -> None:
    wait_until(lambda: client.get(f"/jobs/{job_id}").json()["stage"] == "wait", timeout=90, what="the slow stage")


def test_cancel_reaches_a_running_job_within_seconds(split: Stack) -> None:
    with split.client() as client:
        job_id = client.post("/jobs", json=slow(10_000, 0.05)).json()["id"]
        running_stage(client, job_id)
        started = time.monotonic()
        client.post(f"/jobs/{job_id}/cancel").raise_for_status()
        job = wait_for_job(client, job_id, timeout=30, stack=split)
        latency = time.monotonic() - started
    assert job["status"] == "cancelled" and job["error"]["message"] == "cancelled while running", job
    assert latency < 3.0, latency


def test_a_job_that_ignores_its_cancel_is_killed_after_the_grace(split: Stack) -> None:
    with split.client() as client:
        job_id = client.post("/jobs", json=slow(4, 60)).json()["id"]  # one check a minute
        running_stage(client, job_id)
        started = time.monotonic()
        client.post(f"/jobs/{job_id}/cancel").raise_for_status()
        job = wait_for_job(client, job_id, timeout=30, stack=split)
        latency = time.monotonic() - started
        assert job["status"] == "cancelled" and "worker killed" in job["error"]["message"], job
        assert latency < 6.0, latency  # 2 s grace + the supervisor's 1 s watch
        after = client.post("/jobs", json=slow(1, 0)).json()["id"]  # the supervisor restarted the worker
        assert wait_for_job(client, after, timeout=90, stack=split)["status"] == "succeeded"


def test_sigterm_stops_the_worker_within_seconds_and_requeues_its_job(split: Stack) -> None:
    """Last in this module: it stops the module's worker."""
    worker = split.workers[0]
    with split.client() as client:
        job_id = client.post("/jobs", json=slow(4, 60)).json()["id"]
        running_stage(client, job_id)
    assert worker.process is not None
    started = time.monotonic()
    worker.process.terminate()
    worker.process.wait(timeout=20)
    latency = time.monotonic() - started
    assert latency < 5.0, latency
    store = make_store(split.env["DISTILL_DATABASE_URL"], split.env.get("DISTILL_DB_SCHEMA"))
    try:
        job = store.get_job(job_id)
        assert job.status == "queued" and job.attempts == 0 and job.worker_id is None
    finally:
        store.engine.dispose()
