"""The job lifecycle over real HTTP against real worker processes, on SQLite and on PostgreSQL."""

from __future__ import annotations

import base64
import hashlib
import io
import os
import time
from datetime import datetime
from pathlib import Path

import httpx
from PIL import Image
from service_support.helpers import KEY_B, Stack, wait_for_job, wait_until

QUICK = {"dataset": "mnist", "method": "random", "ipc": 2, "params": {}, "max_per_class": 60, "seed": 3}


def slow_job(iterations: int = 40, step_seconds: float = 0.1, **extra) -> dict:
    return {"dataset": "mnist", "method": "slow-test", "ipc": 1, "max_per_class": 20,
            "params": {"iterations": iterations, "step_seconds": step_seconds}, **extra}


def events(client: httpx.Client, job_id: str) -> list[dict]:
    return client.get(f"/jobs/{job_id}/events", params={"limit": 1000}).raise_for_status().json()["data"]


def test_end_to_end_download_verify_and_evaluate(stack: Stack, tmp_path: Path) -> None:
    from distill.archive import read_archive
    from distill.data.registry import get_dataset
    from distill.evaluate import EvalConfig, evaluate_distilled

    with stack.client() as client:
        created = client.post("/jobs", json=QUICK)
        assert created.status_code == 202, created.text
        job_id = created.json()["id"]
        assert created.headers["location"] == f"/jobs/{job_id}"
        assert created.json()["status"] == "queued"
        job = wait_for_job(client, job_id, stack=stack)
        assert job["status"] == "succeeded", job
        assert job["attempts"] == 1 and job["progress"] == 1.0 and job["error"] is None
        created, started, finished = (datetime.fromisoformat(job[k]) for k in ("created_at", "started_at", "finished_at"))
        assert finished >= started >= created and created.utcoffset() is not None
        artifact = job["artifact"]
        assert artifact["url"] == f"/jobs/{job_id}/artifact"

        download = client.get(artifact["url"])
        assert download.status_code == 200
        assert download.headers["content-type"] == "application/x-tar"
        assert "attachment" in download.headers["content-disposition"]
        assert f"{job_id}.tar" in download.headers["content-disposition"]
        body = download.content
        sha = hashlib.sha256(body).hexdigest()
        assert sha == artifact["sha256"] == download.headers["x-checksum-sha256"]
        assert len(body) == artifact["bytes"] == int(download.headers["content-length"])
        digest = base64.b64encode(hashlib.sha256(body).digest()).decode()
        assert download.headers["repr-digest"] == f"sha-256=:{digest}:"

        etag = download.headers["etag"]
        assert etag == f'"{sha}"'
        cached = client.get(artifact["url"], headers={"If-None-Match": f'"other", W/{etag}'})
        assert cached.status_code == 304 and cached.content == b"" and cached.headers["etag"] == etag
        assert client.get(artifact["url"], headers={"If-None-Match": '"other"'}).status_code == 200

        part = client.get(artifact["url"], headers={"Range": "bytes=100-199"})
        assert part.status_code == 206 and part.content == body[100:200]
        assert part.headers["content-range"] == f"bytes 100-199/{len(body)}"

        preview = client.get(artifact["preview_url"])
        assert preview.status_code == 200 and preview.headers["content-type"] == "image/png"
        image = Image.open(io.BytesIO(preview.content))
        assert image.size[1] == 4 + 10 * (56 + 4)  # one labelled row of 56 px tiles (+4 px gap) per class, no weights

        stages = [e["stage"] for e in events(client, job_id) if e["message"].startswith("stage ")]
        assert stages == ["select", "archive"]

    path = tmp_path / "download.tar"
    path.write_bytes(body)
    archive = read_archive(path)  # verifies every member's sha256 against the manifest
    manifest = archive.manifest
    assert (manifest["method"], manifest["ipc"], manifest["seed"]) == ("random", 2, 3)
    assert manifest["dataset"]["name"] == "mnist" and manifest["num_images"] == 20
    assert sorted(archive.distilled.labels.tolist()) == sorted(list(range(10)) * 2)
    if stack.backend != "sqlite":
        return  # the archive is built the same way on both stores: train on it once (2 cores, CPU)
    result = evaluate_distilled(archive.distilled, get_dataset("mnist"),
                                EvalConfig(runs=1, epochs=10, test_limit=300, device="cpu"))
    assert 30.0 < result.accuracy_mean <= 100.0  # percent: 20 real digits beat chance (10 %) by far


def test_cancel_queued_and_running(stack: Stack) -> None:
    with stack.client() as client:
        running = client.post("/jobs", json=slow_job(iterations=200)).json()["id"]
        wait_for_job(client, running, statuses=("running",), stack=stack)
        queued = client.post("/jobs", json=QUICK).json()["id"]  # the only worker is busy: it stays queued
        assert client.get(f"/jobs/{queued}").json()["status"] == "queued"

        cancelled = client.post(f"/jobs/{queued}/cancel")
        assert cancelled.status_code == 200 and cancelled.json()["status"] == "cancelled"
        assert cancelled.json()["error"]["code"] == "cancelled"

        asked = client.post(f"/jobs/{running}/cancel")
        assert asked.status_code == 200 and asked.json()["cancel_requested"] is True
        started = time.monotonic()
        job = wait_for_job(client, running, timeout=30, stack=stack)
        assert job["status"] == "cancelled", job
        assert time.monotonic() - started < 10  # noticed within a heartbeat or a step, not at the end
        assert job["artifact"] is None
        assert client.post(f"/jobs/{running}/cancel").status_code == 409  # already cancelled (as OpenAPI says)

        done = client.post("/jobs", json=QUICK).json()["id"]
        assert wait_for_job(client, done, stack=stack)["status"] == "succeeded"
        conflict = client.post(f"/jobs/{done}/cancel")
        assert conflict.status_code == 409
        assert client.get(f"/jobs/{queued}/artifact").status_code == 409
        messages = [e["message"] for e in events(client, running)]
        assert "cancel requested" in messages and messages[-1].startswith("cancelled")


def test_worker_sigkill_mid_job_resumes_from_checkpoint(stack: Stack) -> None:
    with stack.client() as client:
        job_id = client.post("/jobs", json=slow_job(iterations=40, step_seconds=0.1)).json()["id"]
        wait_until(lambda: any(e["stage"] == "wait" for e in events(client, job_id)), timeout=60,
                   what="the slow stage to start")
        victim = stack.workers[-1]
        victim.kill()
        stack.start_worker()  # a fresh worker claims the job again once its lease (3 s) expires
        job = wait_for_job(client, job_id, timeout=90, stack=stack)
        assert job["status"] == "succeeded", job
        assert job["attempts"] == 2
        messages = [e["message"] for e in events(client, job_id)]
        assert any("stopped heartbeating during attempt 1; re-queued" in m for m in messages), messages
        assert any(m.startswith("resuming attempt 2 from checkpoints: pick") for m in messages), messages
        body = client.get(job["artifact"]["url"]).content
        assert hashlib.sha256(body).hexdigest() == job["artifact"]["sha256"]

    import tarfile

    with tarfile.open(fileobj=io.BytesIO(body)) as tar:
        manifest = __import__("json").load(tar.extractfile("manifest.json"))
    # The selection was made by the killed process and restored from its checkpoint, not recomputed.
    assert manifest["metrics"]["pick_pid"] == victim.pid != manifest["metrics"]["run_pid"]


def test_api_restart_loses_nothing(stack: Stack) -> None:
    with stack.client() as client:
        before = {j["id"]: j["status"] for j in client.get("/jobs", params={"limit": 100}).json()["data"]}
        job_id = client.post("/jobs", json=slow_job(iterations=30, step_seconds=0.1)).json()["id"]
        wait_for_job(client, job_id, statuses=("running",), stack=stack)
    assert stack.api is not None
    stack.api.kill()  # SIGKILL the API mid-job; the worker carries on
    time.sleep(1.0)
    stack.start_api()
    with stack.client() as client:
        job = wait_for_job(client, job_id, timeout=60, stack=stack)
        assert job["status"] == "succeeded" and job["attempts"] == 1
        after = {j["id"]: j["status"] for j in client.get("/jobs", params={"limit": 100}).json()["data"]}
        assert set(before) | {job_id} == set(after)
        assert all(after[k] == v for k, v in before.items() if v in ("succeeded", "failed", "cancelled"))


def test_auth_isolation(stack: Stack) -> None:
    with stack.client() as alice, stack.client(KEY_B) as bob, stack.client(None) as anonymous, \
            stack.client("not-a-key") as mallory:
        job = alice.post("/jobs", json=QUICK).json()
        wait_for_job(alice, job["id"], stack=stack)
        for path in (f"/jobs/{job['id']}", f"/jobs/{job['id']}/events", f"/jobs/{job['id']}/artifact",
                     f"/jobs/{job['id']}/preview.png"):
            assert bob.get(path).status_code == 404, path
            assert anonymous.get(path).status_code == 401, path
            assert mallory.get(path).status_code == 401, path
            assert alice.get(path).status_code == 200, path
        assert bob.post(f"/jobs/{job['id']}/cancel").status_code == 404
        assert job["id"] not in [j["id"] for j in bob.get("/jobs", params={"limit": 100}).json()["data"]]
        assert bob.get("/jobs", params={"after": job["id"]}).status_code == 422  # not even as a cursor
        unauthorized = anonymous.post("/jobs", json=QUICK)
        assert unauthorized.status_code == 401 and unauthorized.headers["www-authenticate"] == "Bearer"
        # Same idempotency key under two API keys: two different jobs.
        first = alice.post("/jobs", json=QUICK, headers={"Idempotency-Key": "shared"}).json()["id"]
        second = bob.post("/jobs", json=QUICK, headers={"Idempotency-Key": "shared"}).json()["id"]
        assert first != second


def test_idempotency_and_listing(stack: Stack) -> None:
    with stack.client() as client:
        key = f"idem-{time.time_ns()}"
        first = client.post("/jobs", json=QUICK, headers={"Idempotency-Key": key})
        again = client.post("/jobs", json=QUICK, headers={"Idempotency-Key": key})
        assert first.status_code == again.status_code == 202
        assert first.json()["id"] == again.json()["id"] and again.headers["idempotent-replayed"] == "true"
        other = client.post("/jobs", json={**QUICK, "seed": 99}, headers={"Idempotency-Key": key})
        assert other.status_code == 409, other.text  # the key was used with another body
        assert other.json()["detail"] == "Idempotency-Key was already used with a different request body"

        ids = [client.post("/jobs", json=QUICK).json()["id"] for _ in range(3)]
        page = client.get("/jobs", params={"limit": 2}).json()
        assert [j["id"] for j in page["data"]] == ids[::-1][:2] and page["has_more"] is True
        rest = client.get("/jobs", params={"limit": 2, "after": page["data"][-1]["id"]}).json()
        assert rest["data"][0]["id"] == ids[0]
        for job_id in ids:
            wait_for_job(client, job_id, stack=stack)
        succeeded = client.get("/jobs", params={"status": "succeeded", "limit": 100}).json()["data"]
        assert set(ids) <= {j["id"] for j in succeeded} and all(j["status"] == "succeeded" for j in succeeded)
        queued = client.get("/jobs", params={"status": "queued"}).json()
        assert all(j["status"] == "queued" for j in queued["data"])
        first_events = client.get(f"/jobs/{ids[0]}/events", params={"limit": 2}).json()
        assert first_events["has_more"] is True
        after = client.get(f"/jobs/{ids[0]}/events", params={"after": first_events["data"][-1]["id"]}).json()
        assert after["data"][0]["id"] > first_events["data"][-1]["id"]

        metrics = client.get("/metrics").text
        assert 'distill_jobs{status="succeeded"}' in metrics and "distill_queue_depth" in metrics
        assert 'distill_job_stage_seconds_count{stage="select"}' in metrics
        health = client.get("/healthz").json()
        assert health["status"] == "ok" and health["database"] == "ok"


def test_jobs_that_end_leave_no_checkpoints_and_finished_ones_can_be_deleted(stack: Stack) -> None:
    """Issue 13 item 7: failed and cancelled jobs leave nothing under DISTILL_HOME/jobs; DELETE removes a
    finished job with its archive."""
    with stack.client() as client, stack.client(KEY_B) as bob:
        failed = client.post("/jobs", json={**QUICK, "method": "fail-test"}).json()["id"]
        assert wait_for_job(client, failed, stack=stack)["status"] == "failed"
        cancelled = client.post("/jobs", json=slow_job(iterations=200)).json()["id"]
        wait_until(lambda: (stack.home / "jobs" / cancelled / "checkpoints" / "pick.pt").exists(), timeout=60,
                   what="the checkpoint")
        client.post(f"/jobs/{cancelled}/cancel").raise_for_status()
        assert wait_for_job(client, cancelled, stack=stack)["status"] == "cancelled"
        for job_id in (failed, cancelled):
            wait_until(lambda job_id=job_id: not (stack.home / "jobs" / job_id).exists(), timeout=10,
                       what=f"{job_id}'s checkpoints to go")

        done = client.post("/jobs", json=QUICK).json()["id"]
        running = client.post("/jobs", json=slow_job(iterations=100)).json()["id"]
        assert wait_for_job(client, done, stack=stack)["status"] == "succeeded"
        archive = stack.home / "artifacts" / f"{done}.tar"
        assert client.get(f"/jobs/{done}/preview.png").status_code == 200 and archive.exists()
        umask = os.umask(0)
        os.umask(umask)
        for written in (archive, archive.with_name(f"{done}.preview.png")):  # item 14: the umask, not 0600
            assert written.stat().st_mode & 0o777 == 0o666 & ~umask, oct(written.stat().st_mode)
        assert bob.delete(f"/jobs/{done}").status_code == 404  # another key's job
        wait_for_job(client, running, statuses=("running",), stack=stack)
        assert client.delete(f"/jobs/{running}").status_code == 409
        assert client.delete(f"/jobs/{done}").status_code == 204
        assert client.get(f"/jobs/{done}").status_code == 404 and client.delete(f"/jobs/{done}").status_code == 404
        assert not archive.exists() and not archive.with_name(f"{done}.preview.png").exists()
        client.post(f"/jobs/{running}/cancel")
        wait_for_job(client, running, stack=stack)
        assert client.delete(f"/jobs/{failed}").status_code == 204
