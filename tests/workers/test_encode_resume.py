"""A worker killed during a job's encode loses at most the shard it was writing (issue 13 item 8): the next
attempt finds the shards already in the latent cache under DISTILL_HOME and encodes only the missing ones."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
from service_support.helpers import Stack, service_env, wait_for_job, wait_until

# MNIST at 210 images per class: 2100 images, two shards of the latent cache (2048 + 52).
JOB = {"dataset": "mnist", "method": "oq", "ipc": 1, "max_per_class": 210, "params": {"iterations": 2, "refine_iterations": 0}}


@pytest.mark.slow
def test_a_worker_killed_mid_encode_resumes_from_its_last_shard(tmp_path: Path) -> None:
    stack = Stack(tmp_path, "sqlite", service_env(tmp_path, "sqlite", DISTILL_LEASE_SECONDS="3"))
    try:
        victim = stack.start_worker()
        stack.start_api()
        with stack.client() as client:
            job_id = client.post("/jobs", json=JOB).raise_for_status().json()["id"]
            shards = tmp_path / "cache" / "latents"
            first = wait_until(lambda: next(shards.glob("mnist-*-max210-s0/shard_00000.safetensors"), None),
                               timeout=600, what="the first shard")
            victim.kill()
            killed_at = time.monotonic()
            stack.start_worker()
            job = wait_for_job(client, job_id, timeout=600, stack=stack)
            assert job["status"] == "succeeded" and job["attempts"] == 2, job
            messages = [e["message"] for e in client.get(f"/jobs/{job_id}/events", params={"limit": 1000}).json()["data"]]
        assert any(m.endswith("resuming, 1/2 shards present") for m in messages), messages
        assert (first.parent / "shard_00001.safetensors").exists()
        print(f"killed after shard 0; the second attempt finished {time.monotonic() - killed_at:.1f} s later")
    finally:
        stack.stop()
