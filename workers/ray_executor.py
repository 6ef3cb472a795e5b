"""Scale-out on Ray: each claimed job runs as one Ray task that asks for its GPU, and methods fan heavy stages
out over the cluster through :class:`RayExecutor` (``ctx.executor.map``).

The job store stays the source of truth: the driver (``distill worker --ray-address ADDR``) claims jobs from
the database exactly like a local worker; the Ray task heartbeats and records the outcome itself. Ray's own
task retries are off (``max_retries=0``): a lost task is re-queued by the store, which counts attempts.
"""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Callable, Iterable
from typing import Any

from workers.jobs import JobStore, Lease
from workers.settings import WorkerSettings, get_worker_settings

log = logging.getLogger("distill.worker.ray")

# Settings a Ray task needs to reach the same job store as the driver (data and home come from the node).
_PASSED_ENV = ("DISTILL_DATABASE_URL", "DATABASE_URL", "DISTILL_DB_SCHEMA", "DISTILL_MAX_ATTEMPTS",
               "DISTILL_LEASE_SECONDS", "DISTILL_HEARTBEAT_SECONDS", "DISTILL_DEVICE", "DISTILL_PLUGINS",
               "DISTILL_ALLOW_HUB", "DISTILL_MODELS")


class RayExecutor:
    """``map(fn, items, num_gpus=...)`` as Ray tasks; results come back in order.

    Passed to :func:`distill.runner.run_to_archive` as ``executor``; methods use it for encode shards, per-class
    k-means or decode batches. ``fn`` must be picklable by cloudpickle (closures are fine).
    """

    def __init__(self, default_num_gpus: float = 0.0, max_retries: int = 2):
        self.default_num_gpus = default_num_gpus
        self.max_retries = max_retries

    def map(self, fn: Callable[[Any], Any], items: Iterable[Any], *, num_gpus: float | None = None,
            num_cpus: float = 1.0) -> list[Any]:
        import ray

        gpus = self.default_num_gpus if num_gpus is None else num_gpus
        if gpus and not ray.cluster_resources().get("GPU"):
            gpus = 0  # a CPU-only cluster (tests, laptops): run the same tasks on CPUs
        remote = ray.remote(num_gpus=gpus, num_cpus=num_cpus, max_retries=self.max_retries)(fn)
        return ray.get([remote.remote(item) for item in items])

    def __repr__(self) -> str:
        return f"RayExecutor(default_num_gpus={self.default_num_gpus})"


def _job_task(job_id: str, lease: tuple[str, str, int], gpus_per_task: float) -> str:
    """Body of the Ray task that runs one job (inside a Ray worker process)."""
    from workers.execution import execute_job
    from workers.logs import configure_logging, worker_id_var

    configure_logging()
    settings = get_worker_settings()
    settings.apply_hub_policy()
    settings.load_plugins()
    worker_id_var.set(lease[1])
    store = JobStore.from_settings(settings, migrate_schema=False)
    try:
        job = store.get_job(job_id)
        return execute_job(store, job, Lease(*lease), settings, executor=RayExecutor(gpus_per_task))
    finally:
        store.engine.dispose()


def _enforce_cancel(store: JobStore, inflight: dict[Any, Lease], grace_seconds: float) -> None:
    """A job that ignores its cancel for ``grace_seconds`` has its Ray task force-cancelled (worker killed)."""
    import ray

    from workers.models import utcnow

    for ref, lease in list(inflight.items()):
        try:
            job = store.get_job(lease.job_id)
        except Exception:
            continue
        if job.status != "running" or job.cancel_requested_at is None:
            continue
        waited = (utcnow() - job.cancel_requested_at).total_seconds()
        if waited < grace_seconds:
            continue
        log.warning("job ignored its cancel; force-cancelling its ray task",
                    extra={"job_id": lease.job_id, "waited_s": round(waited, 1)})
        ray.cancel(ref, force=True)
        store.finish(lease, "cancelled", error=("cancelled", f"cancelled (ray task killed after {waited:.0f} s grace)"))
        inflight.pop(ref)


def run_ray_worker(
    settings: WorkerSettings,
    *,
    address: str | None,
    worker_id: str,
    stop: threading.Event | None = None,
    concurrency: int | None = None,
    gpus_per_job: float | None = None,
    once: bool = False,
    init_kwargs: dict[str, Any] | None = None,
) -> int:
    """Claim jobs and run each as a Ray task until ``stop`` (or, with ``once``, until the queue is empty)."""
    import ray

    stop = stop or threading.Event()
    if not ray.is_initialized():
        kwargs = dict(init_kwargs or {})
        if address and address != "local":
            kwargs["address"] = address
        ray.init(**kwargs, log_to_driver=True)
    cluster_gpus = float(ray.cluster_resources().get("GPU", 0))
    if gpus_per_job is None:
        gpus_per_job = 1.0 if cluster_gpus else 0.0
    if concurrency is None:
        concurrency = max(1, int(cluster_gpus // gpus_per_job) if gpus_per_job else 1)
    env = {k: v for k, v in os.environ.items() if k in _PASSED_ENV}
    task = ray.remote(max_retries=0)(_job_task).options(
        num_gpus=gpus_per_job, num_cpus=0 if gpus_per_job else 1, runtime_env={"env_vars": env} if env else None,
    )
    store = JobStore.from_settings(settings)
    log.info("ray worker started", extra={"cluster_gpus": cluster_gpus, "concurrency": concurrency,
                                         "gpus_per_job": gpus_per_job})
    inflight: dict[Any, Lease] = {}
    ran = 0
    while not stop.is_set():
        try:
            store.sweep_stale()
            while len(inflight) < concurrency:
                claimed = store.claim(worker_id)
                if claimed is None:
                    break
                job, lease = claimed
                ref = task.remote(job.id, (lease.job_id, lease.worker_id, lease.attempt), gpus_per_job)
                inflight[ref] = lease
                log.info("job submitted to ray", extra={"job_id": job.id, "attempt": lease.attempt})
        except Exception:
            log.warning("claim failed", exc_info=True)
        if not inflight:
            if once:
                break
            stop.wait(settings.poll_seconds)
            continue
        _enforce_cancel(store, inflight, settings.cancel_grace_seconds)
        ready, _ = ray.wait(list(inflight), num_returns=1, timeout=settings.poll_seconds)
        for ref in ready:
            lease = inflight.pop(ref)
            ran += 1
            try:
                outcome = ray.get(ref)
                log.info("ray task finished", extra={"job_id": lease.job_id, "outcome": outcome})
            except Exception as exc:  # the task's process died (OOM, node lost): let the store re-queue it
                log.warning("ray task died", extra={"job_id": lease.job_id, "error": str(exc)[:500]})
                store.abandon(lease, f"ray task died: {type(exc).__name__}")
    for ref in inflight:
        ray.cancel(ref)
    store.engine.dispose()
    return ran
