"""The Ray path on a local Ray instance (CPU): a job runs as a Ray task, and the method inside it fans out
over ``ctx.executor.map`` as further Ray tasks."""

from __future__ import annotations

import hashlib
import json
import tarfile
import threading
from pathlib import Path

import pytest
from service_support.helpers import PLUGIN, PYTHONPATH, wait_until

REQUEST = {"dataset": "mnist", "method": "fanout-test", "ipc": 2, "params": {}, "seed": 1, "max_per_class": 40}


def test_ray_worker_runs_jobs_as_ray_tasks_with_an_executor(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import ray

    from workers.jobs import JobStore
    from workers.ray_executor import RayExecutor, run_ray_worker
    from workers.settings import reload_worker_settings

    monkeypatch.setenv("DISTILL_DATABASE_URL", f"sqlite:///{tmp_path / 'ray.sqlite3'}")
    monkeypatch.setenv("DISTILL_HEARTBEAT_SECONDS", "0.5")
    monkeypatch.setenv("DISTILL_POLL_SECONDS", "0.2")
    monkeypatch.setenv("DISTILL_DEVICE", "cpu")
    monkeypatch.setenv("DISTILL_PLUGINS", PLUGIN)
    monkeypatch.setenv("PYTHONPATH", PYTHONPATH)
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    settings = reload_worker_settings()
    settings.load_plugins()
    store = JobStore.from_settings(settings)
    job, _ = store.create_job("owner", REQUEST)

    monkeypatch.setenv("DISTILL_CANCEL_GRACE_SECONDS", "1")
    settings = reload_worker_settings()
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, configure_logging=False)
    try:
        assert RayExecutor().map(lambda x: x * x, range(5), num_gpus=1) == [0, 1, 4, 9, 16]  # CPU-only cluster
        ran = run_ray_worker(settings, address="local", worker_id="ray-test", once=True)

        # A job stuck between its cancellation checks: the dispatcher force-cancels its Ray task.
        stuck, _ = store.create_job("owner", {**REQUEST, "method": "slow-test",
                                              "params": {"iterations": 6, "step_seconds": 30}})
        stop = threading.Event()
        dispatcher = threading.Thread(target=run_ray_worker, kwargs={
            "settings": settings, "address": "local", "worker_id": "ray-test-2", "stop": stop})
        dispatcher.start()
        try:
            wait_until(lambda: store.get_job(stuck.id).stage == "wait", timeout=60, what="the stuck job to run")
            store.cancel_job(stuck.id, "owner")
            wait_until(lambda: store.get_job(stuck.id).status == "cancelled", timeout=60, what="the cancel")
        finally:
            stop.set()
            dispatcher.join(timeout=30)
    finally:
        ray.shutdown()
        reload_worker_settings()
    assert "ray task killed" in (store.get_job(stuck.id).error_message or "")
    assert ran >= 1  # a lease that expires under heavy load may make the dispatcher claim the job again
    final = store.get_job(job.id)
    assert final.status == "succeeded", (final.error_code, final.error_message)
    path = settings.artifacts_dir / (final.artifact_path or "")
    assert hashlib.sha256(path.read_bytes()).hexdigest() == final.artifact_sha256
    with tarfile.open(path) as tar:
        manifest = json.load(tar.extractfile("manifest.json"))
    metrics = manifest["metrics"]
    assert metrics["executor"] == "RayExecutor"
    assert metrics["run_pid"] not in metrics["task_pids"]  # the per-class work ran in other processes
    assert manifest["num_images"] == 20
    store.engine.dispose()
