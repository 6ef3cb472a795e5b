"""Ray with logical GPUs (CPU host): the resource model cannot deadlock, a job's shard tasks spread over the
GPUs, cancellation reaches into a fan-out, and a killed shard task is retried.

Real ``oq`` jobs on small MNIST samples (TAEF2 encode on the CPU); each Ray session is started once per test.
"""

from __future__ import annotations

import json
import os
import signal
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from service_support.helpers import PLUGIN, PYTHONPATH, wait_until

OQ = {"dataset": "mnist", "method": "oq", "ipc": 2, "seed": 0,
      "params": {"w2_uniform": False, "iterations": 5, "refine_iterations": 0}}


@pytest.fixture()
def service(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[tuple]:
    from workers.jobs import JobStore
    from workers.settings import reload_worker_settings

    monkeypatch.setenv("DISTILL_DATABASE_URL", f"sqlite:///{tmp_path / 'ray.sqlite3'}")
    monkeypatch.setenv("DISTILL_HEARTBEAT_SECONDS", "0.5")
    monkeypatch.setenv("DISTILL_POLL_SECONDS", "0.2")
    monkeypatch.setenv("DISTILL_LEASE_SECONDS", "120")  # a loaded host must not make the sweep re-queue a live job
    monkeypatch.setenv("DISTILL_CANCEL_GRACE_SECONDS", "120")  # cancels here must work without the force-kill
    monkeypatch.setenv("DISTILL_DEVICE", "cpu")
    monkeypatch.setenv("DISTILL_PLUGINS", PLUGIN)
    monkeypatch.setenv("PYTHONPATH", PYTHONPATH)
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    monkeypatch.setenv("RAY_USAGE_STATS_ENABLED", "0")
    settings = reload_worker_settings()
    store = JobStore.from_settings(settings)
    yield settings, store
    store.engine.dispose()
    reload_worker_settings()


def ray_session(num_gpus: int):
    import ray

    ray.init(num_cpus=2, num_gpus=num_gpus, include_dashboard=False, log_to_driver=False, configure_logging=False)
    return ray


def verified(settings, store, job_id: str) -> dict:
    from distill.archive import read_archive

    job = store.get_job(job_id)
    assert job.status == "succeeded", (job.error_code, job.error_message)
    return read_archive(settings.artifacts_dir / (job.artifact_path or "")).manifest  # every sha256 checked


def shard_tasks(manifest: dict, settings) -> list[dict]:
    folder = settings.home_dir / "cache" / "latents" / manifest["metrics"]["latent_cache"]
    return json.loads((folder / "complete.json").read_text())["tasks"]


def run_dispatcher(settings, **kwargs) -> tuple[threading.Thread, threading.Event]:
    from workers.ray_executor import run_ray_worker

    stop = threading.Event()
    thread = threading.Thread(target=run_ray_worker, kwargs={"settings": settings, "address": "local",
                                                             "worker_id": "ray-gpus", "stop": stop, **kwargs})
    thread.start()
    return thread, stop


@pytest.mark.timeout(600)
def test_two_oq_jobs_on_one_logical_gpu_both_finish(service) -> None:
    """The old model deadlocked here: the job task held the only GPU while its shard tasks waited for one."""
    from workers.ray_executor import run_ray_worker

    settings, store = service
    jobs = [store.create_job("owner", {**OQ, "max_per_class": 12 + i})[0] for i in range(2)]
    ray = ray_session(num_gpus=1)
    try:
        ran = run_ray_worker(settings, address="local", worker_id="ray-1gpu", once=True, concurrency=2)
    finally:
        ray.shutdown()
    assert ran == 2
    for job in jobs:
        manifest = verified(settings, store, job.id)
        assert manifest["num_images"] == 20 and len(shard_tasks(manifest, settings)) >= 2


@pytest.mark.timeout(900)
def test_two_logical_gpus_overlap_shards_cancel_inside_the_fanout_and_retry_a_killed_shard(service) -> None:
    import psutil

    settings, store = service
    ray = ray_session(num_gpus=2)
    thread, stop = run_dispatcher(settings, concurrency=1)
    try:
        # 1. one job's shard tasks run at the same time on the two GPUs (timestamps from the shard tasks)
        job, _ = store.create_job("owner", {**OQ, "max_per_class": 16})
        wait_until(lambda: store.get_job(job.id).status == "succeeded", timeout=300, what="the overlap job")
        tasks = shard_tasks(verified(settings, store, job.id), settings)
        assert len(tasks) >= 2 and len({t["pid"] for t in tasks}) == 2
        spans = sorted((t["start"], t["end"]) for t in tasks)
        assert any(b_start < a_end for (_, a_end), (b_start, _) in zip(spans, spans[1:], strict=False)), spans

        # 2. a killed shard task is retried by Ray and the archive verifies
        killed: list[int] = []

        def kill_one_shard() -> None:
            deadline = time.time() + 240
            while not killed and time.time() < deadline:
                for proc in psutil.process_iter(["pid", "cmdline"]):
                    if "ray::run_shard_job" in " ".join(proc.info["cmdline"] or []):
                        os.kill(proc.info["pid"], signal.SIGKILL)
                        killed.append(proc.info["pid"])
                        return
                time.sleep(0.05)

        killer = threading.Thread(target=kill_one_shard)
        killer.start()
        job, _ = store.create_job("owner", {**OQ, "max_per_class": 17})
        wait_until(lambda: store.get_job(job.id).status in ("succeeded", "failed"), timeout=300, what="the retry job")
        killer.join()
        assert killed, "no shard task was seen running"
        manifest = verified(settings, store, job.id)
        tasks = shard_tasks(manifest, settings)
        assert killed[0] not in {t["pid"] for t in tasks}  # its shard was redone by another worker process
        assert len({t["shard"] for t in tasks}) == len(tasks)

        # 3. cancel while the shards are being encoded: the job stops within seconds, by itself
        job, _ = store.create_job("owner", {**OQ, "max_per_class": 300})  # 3000 images: a long encode
        wait_until(lambda: (store.get_job(job.id).stage == "encode"), timeout=300, what="the encode fan-out")
        time.sleep(1.0)
        store.cancel_job(job.id, "owner")
        asked = time.time()
        wait_until(lambda: store.get_job(job.id).status == "cancelled", timeout=60, what="the cancel")
        assert time.time() - asked < 15
        assert "ray task killed" not in (store.get_job(job.id).error_message or "")  # not the dispatcher's force
        wait_until(lambda: not any("ray::run_shard_job" in " ".join(p.info["cmdline"] or [])
                                   for p in psutil.process_iter(["cmdline"])), timeout=30,
                   what="the outstanding shard tasks to be cancelled")
    finally:
        stop.set()
        thread.join(timeout=60)
        ray.shutdown()


def test_the_job_kind_decides_who_holds_a_gpu_and_inline_maps_stream_and_cancel() -> None:
    """Fan-out methods run as GPU-less drivers; a GPU-holding job's maps run inline (no child to wait for)."""
    from distill.errors import Cancelled
    from workers.ray_executor import RayExecutor, fans_out

    assert fans_out("oq") and fans_out("d4m") and not fans_out("dc") and not fans_out("random")
    assert not fans_out("no-such-method")  # the job task reports the unknown method itself
    executor = RayExecutor(inline=True)
    seen: list[tuple[int, int]] = []
    assert executor.map(lambda x: 2 * x, [1, 2, 3], on_result=lambda i, r: seen.append((i, r))) == [2, 4, 6]
    assert seen == [(0, 2), (1, 4), (2, 6)]
    ran: list[int] = []

    def cancel_after_one() -> None:
        if ran:
            raise Cancelled("job cancelled")

    with pytest.raises(Cancelled):
        executor.map(ran.append, [1, 2, 3], check_cancelled=cancel_after_one)
    assert ran == [1]


@pytest.mark.timeout(300)
def test_gpu_less_tasks_see_no_device_and_gpu_tasks_use_the_gpu_ray_assigned(monkeypatch: pytest.MonkeyPatch) -> None:
    """Two logical GPUs: k-means-like children (0 GPUs) and a GPU-less driver see no device; GPU tasks, also the
    children of a GPU-less driver, keep the node's devices and select the one Ray assigned them."""
    from workers.ray_executor import RayExecutor, gpu_index

    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    monkeypatch.setenv("RAY_USAGE_STATS_ENABLED", "0")
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)

    def probe(tag: str) -> dict:
        import os

        import ray

        from workers.ray_executor import TASK_CPUS_ENV, current_task_device

        return {"tag": tag, "pid": os.getpid(), "ids": [str(i) for i in ray.get_gpu_ids()],
                "visible": os.environ.get("CUDA_VISIBLE_DEVICES"), "device": current_task_device(),
                "cpus": os.environ.get(TASK_CPUS_ENV)}

    def driver(_: int) -> dict:  # a GPU-less job driver that fans GPU children out, as oq's decode does
        from workers.ray_executor import RayExecutor

        return {"self": probe("driver"), "children": RayExecutor(poll_seconds=0.05).map(probe, ["a", "b"],
                                                                                         num_gpus=1)}

    ray = ray_session(num_gpus=2)
    try:
        executor = RayExecutor(poll_seconds=0.05)
        gpu_less = executor.map(probe, ["k0", "k1"], num_gpus=0)
        gpu = executor.map(probe, [f"g{i}" for i in range(6)], num_gpus=1)
        nested = executor.map(driver, [0], num_gpus=0, num_cpus=0)[0]
    finally:
        ray.shutdown()
    for row in [*gpu_less, nested["self"]]:
        assert row["ids"] == [] and row["visible"] == "" and row["device"] == "cpu", row
    for row in [*gpu, *nested["children"]]:
        assert len(row["ids"]) == 1 and row["visible"] != "", row  # the node's devices, not hidden
        assert row["device"] == f"cuda:{row['ids'][0]}", row
        assert row["cpus"] == "1", row  # 2 CPUs over 2 GPUs: one each (its loader's processes)
    assert {row["ids"][0] for row in gpu} == {"0", "1"}  # both GPUs were used
    assert not {row["pid"] for row in gpu} & {row["pid"] for row in gpu_less}  # never the same process
    # the index of an assigned id when the node itself runs on a subset of its devices
    assert gpu_index([3], "2,3") == 1 and gpu_index(["1"], None) == 1 and gpu_index([0], "") == 0
