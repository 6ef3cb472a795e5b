"""Scale-out on Ray: each claimed job runs as one Ray task, and methods fan heavy stages out over the cluster
through :class:`RayExecutor` (``ctx.executor.map``).

The resource model cannot deadlock: a task that waits for other tasks never holds a GPU while it waits.

- A job whose method fans out (``Method.fans_out``: ``oq``, ``d4m``) runs as a *driver* task asking for no GPU
  and no CPU; its children ask for what they use: encode shards and decode batches one GPU each, per-class
  k-means one CPU each. Children of all jobs queue for the GPUs side by side, so N jobs on M GPUs all make
  progress and one job's shards spread over every free GPU.
- Any other job (pixel methods, baselines) holds ``gpus_per_job`` GPUs for its whole run; should it call
  ``executor.map`` anyway, the items run in its own process, inside its allocation (no child asks for more).
- Children stream back through ``ray.wait``: each finished item reports progress at once, the job's cancel flag
  is read between waits (cancel -> ``ray.cancel`` of every outstanding child, ``Cancelled`` within about a
  poll interval), and a child whose process dies (OOM, node lost, killed) is retried by Ray (``max_retries``;
  shard writes are atomic, so a retry simply rewrites its shard).

The job store stays the source of truth: the dispatcher (``distill worker --ray-address ADDR``) claims jobs from
the database exactly like a local worker; the job's task heartbeats and records the outcome itself. The job task
itself is not retried by Ray (``max_retries=0``): a lost job is re-queued by the store, which counts attempts.
"""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Callable, Iterable
from typing import Any

from distill.methods.base import map_in_process
from workers.jobs import JobStore, Lease
from workers.settings import WorkerSettings, get_worker_settings

log = logging.getLogger("distill.worker.ray")

# Settings a Ray task needs to reach the same job store as the driver (data and home come from the node).
_PASSED_ENV = ("DISTILL_DATABASE_URL", "DATABASE_URL", "DISTILL_DB_SCHEMA", "DISTILL_MAX_ATTEMPTS",
               "DISTILL_LEASE_SECONDS", "DISTILL_HEARTBEAT_SECONDS", "DISTILL_DEVICE", "DISTILL_PLUGINS",
               "DISTILL_ALLOW_HUB", "DISTILL_MODELS", "DISTILL_RAY_GPUS_PER_TASK")
_prepared = False


def _prepare_process() -> None:
    """Once per Ray worker process: import the site plugins (their datasets and methods) as the job did."""
    global _prepared
    if not _prepared:
        import importlib

        for name in filter(None, (n.strip() for n in os.environ.get("DISTILL_PLUGINS", "").split(","))):
            importlib.import_module(name)
        _prepared = True


def _call(fn: Callable[[Any], Any], item: Any) -> Any:
    """A child task's body: plugins first (a child may run in a fresh worker process), then the item."""
    _prepare_process()
    return fn(item)


class RayExecutor:
    """``map(fn, items, num_gpus=..., num_cpus=...)`` as Ray tasks; results come back in item order.

    Passed to :func:`distill.runner.run_to_archive` as ``executor``; methods use it for encode shards, per-class
    k-means or decode batches. ``fn`` must be picklable by cloudpickle (closures are fine). ``inline=True`` (a
    job task that holds a GPU) runs the items in this process instead: a task holding a GPU must not wait for
    children that may need that very GPU. ``device = "auto"``: each child picks its own device (the GPU Ray
    gave it, else the CPU), whatever the driver's device is.
    """

    device = "auto"

    def __init__(self, default_num_gpus: float = 1.0, max_retries: int = 3, poll_seconds: float = 0.5,
                 inline: bool = False):
        self.default_num_gpus = default_num_gpus
        self.max_retries = max_retries
        self.poll_seconds = poll_seconds
        self.inline = inline

    def map(self, fn: Callable[[Any], Any], items: Iterable[Any], *, num_gpus: float | None = None,
            num_cpus: float = 1.0, on_result: Callable[[int, Any], None] | None = None,
            check_cancelled: Callable[[], None] | None = None) -> list:
        items = list(items)
        if self.inline:
            return map_in_process(fn, items, on_result=on_result, check_cancelled=check_cancelled)
        import ray

        gpus = self.default_num_gpus if num_gpus is None else num_gpus
        if gpus and not ray.cluster_resources().get("GPU"):
            gpus = 0  # a CPU-only cluster (tests, laptops): run the same tasks on CPUs
        task = ray.remote(_call).options(num_gpus=gpus, num_cpus=num_cpus, max_retries=self.max_retries,
                                         retry_exceptions=False, name=getattr(fn, "__name__", "task"))
        fn_ref = ray.put(fn)
        refs = [task.remote(fn_ref, item) for item in items]
        position = {ref: i for i, ref in enumerate(refs)}
        results: list[Any] = [None] * len(refs)
        pending = list(refs)
        try:
            while pending:
                if check_cancelled is not None:
                    check_cancelled()
                ready, pending = ray.wait(pending, num_returns=1, timeout=self.poll_seconds)
                for ref in ready:
                    i = position[ref]
                    results[i] = ray.get(ref)
                    if on_result is not None:
                        on_result(i, results[i])
        except BaseException:
            for ref in pending:  # cancelled, or one child failed for good: stop the others now
                ray.cancel(ref, force=True)
            raise
        return results

    def __repr__(self) -> str:
        return f"RayExecutor(default_num_gpus={self.default_num_gpus}, inline={self.inline})"


def _job_task(job_id: str, lease: tuple[str, str, int], driver: bool) -> str:
    """Body of the Ray task that runs one job (inside a Ray worker process).

    ``driver``: the task holds no GPU and fans its heavy stages out as child tasks; otherwise it holds the job's
    GPUs and anything it maps runs inline.
    """
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
        executor = RayExecutor(default_num_gpus=settings.ray_gpus_per_task, inline=not driver)
        return execute_job(store, job, Lease(*lease), settings, executor=executor)
    finally:
        store.engine.dispose()


def fans_out(method: str) -> bool:
    """Whether the method's heavy stages go through ``ctx.executor`` (its job then runs as a GPU-less driver)."""
    from distill.methods.registry import get_method

    try:
        return bool(getattr(get_method(method), "fans_out", False))
    except Exception:  # unknown here (a plugin the dispatcher lacks): the job task reports it
        return False


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
    num_gpus: float | None = None,
    num_cpus: int | None = None,
) -> int:
    """Claim jobs and run each as a Ray task until ``stop`` (or, with ``once``, until the queue is empty).

    ``address="local"`` starts a Ray instance here; ``num_gpus`` / ``num_cpus`` set its resources (logical
    GPUs on a CPU host: tests, single-host use). They are ignored when joining an existing cluster.
    """
    import ray

    stop = stop or threading.Event()
    if not ray.is_initialized():
        kwargs = dict(init_kwargs or {})
        if address and address != "local":
            kwargs["address"] = address
        else:
            if num_gpus is not None:
                kwargs["num_gpus"] = num_gpus
            if num_cpus is not None:
                kwargs["num_cpus"] = num_cpus
        ray.init(**kwargs, log_to_driver=True)
    cluster_gpus = float(ray.cluster_resources().get("GPU", 0))
    if gpus_per_job is None:
        gpus_per_job = 1.0 if cluster_gpus else 0.0
    if concurrency is None:
        concurrency = max(1, int(cluster_gpus // gpus_per_job) if gpus_per_job else 1)
    env = {k: v for k, v in os.environ.items() if k in _PASSED_ENV}
    runtime_env = {"env_vars": env} if env else None
    base = ray.remote(max_retries=0)(_job_task)
    # A driver waits for its children and must hold nothing they need; a GPU-holding job never waits on children.
    driver_task = base.options(num_gpus=0, num_cpus=0, runtime_env=runtime_env)
    holder_task = base.options(num_gpus=gpus_per_job, num_cpus=0 if gpus_per_job else 1, runtime_env=runtime_env)
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
                driver = fans_out(job.method)
                task = driver_task if driver else holder_task
                ref = task.remote(job.id, (lease.job_id, lease.worker_id, lease.attempt), driver)
                inflight[ref] = lease
                log.info("job submitted to ray", extra={"job_id": job.id, "attempt": lease.attempt,
                                                        "driver": driver})
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
