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
- Devices: a task that holds no GPU runs with ``CUDA_VISIBLE_DEVICES=""`` (Ray itself leaves it every GPU of
  the node); a GPU task keeps the node's device list and makes the GPU Ray assigned it (``ray.get_gpu_ids()``)
  torch's current device, so a reused worker process follows each assignment. GPU and GPU-less tasks never
  share a worker process (:data:`TASK_GPUS_ENV`). A GPU task asks for its share of the cluster's CPUs, and its
  loader runs that many decoding processes (:data:`TASK_CPUS_ENV`).

The job store stays the source of truth: the dispatcher (``distill worker --ray-address ADDR``) claims jobs from
the database exactly like a local worker; the job's task heartbeats and records the outcome itself. The job task
itself is not retried by Ray (``max_retries=0``): a lost job is re-queued by the store, which counts attempts.
"""

from __future__ import annotations

import logging
import os
import sys
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
# What a task's own code reads about its grant (quantize.latent_cache sizes its loader by it).
TASK_CPUS_ENV = "DISTILL_TASK_CPUS"
# GPU and GPU-less tasks run in separate worker processes: Ray pools worker processes by runtime_env, so this
# marker keeps a process that hid every GPU (CUDA reads CUDA_VISIBLE_DEVICES once, at its first call) from ever
# running a GPU task, and a process holding a CUDA context from running a GPU-less one.
TASK_GPUS_ENV = "DISTILL_TASK_GPUS"
# A GPU task's process keeps the node's devices (Ray does not narrow CUDA_VISIBLE_DEVICES per task); the task
# selects the device Ray assigned it (``ray.get_gpu_ids()``), so a reused process follows each new assignment.
_NOSET = "RAY_EXPERIMENTAL_NOSET_CUDA_VISIBLE_DEVICES"
_prepared = False
_task_device = "cpu"


def _prepare_process() -> None:
    """Once per Ray worker process: import the site plugins (their datasets and methods) as the job did."""
    global _prepared
    if not _prepared:
        import importlib

        for name in filter(None, (n.strip() for n in os.environ.get("DISTILL_PLUGINS", "").split(","))):
            importlib.import_module(name)
        _prepared = True


def task_env(holds_gpu: bool, base: dict[str, str] | None = None) -> dict[str, str]:
    """``runtime_env`` env_vars of a task: the pool marker, and for GPU tasks the node's whole device list."""
    env = dict(base or {})
    env[TASK_GPUS_ENV] = "1" if holds_gpu else "0"
    if holds_gpu:
        env[_NOSET] = "1"
    return env


def gpu_index(gpu_ids: list[Any], visible: str | None) -> int:
    """CUDA index of the first GPU Ray assigned, in a process that sees the node's devices.

    Ray's ids are entries of the node's ``CUDA_VISIBLE_DEVICES`` when it has one (then the index is the entry's
    position), else the devices' own indices."""
    first = str(gpu_ids[0]).strip()
    names = [v.strip() for v in (visible or "").split(",") if v.strip()]
    return names.index(first) if first in names else int(first)


def current_task_device() -> str:
    """The device the running task was given: ``cuda:N`` for a GPU task (also on a host of logical GPUs, where
    torch then runs on the CPU), ``cpu`` for a task that holds no GPU."""
    return _task_device


def _enter_task(holds_gpu: bool) -> str:
    """Set this task's view of the devices before its code touches CUDA; returns :func:`current_task_device`.

    GPU-less: ``CUDA_VISIBLE_DEVICES=""`` (Ray leaves such a task every GPU). GPU: the assigned device becomes
    torch's current device, so ``cuda`` (``device=auto``) means that GPU in this process from now on."""
    global _task_device
    import ray

    granted = ray.get_runtime_context().get_assigned_resources()
    os.environ[TASK_CPUS_ENV] = str(max(1, int(granted.get("CPU", 0))))
    torch = sys.modules.get("torch")
    if not holds_gpu or not ray.get_gpu_ids():
        if torch is not None and torch.cuda.is_initialized():
            log.warning("a GPU-less task runs in a process that already holds a CUDA context")
        os.environ["CUDA_VISIBLE_DEVICES"] = ""
        _task_device = "cpu"
        return _task_device
    index = gpu_index(ray.get_gpu_ids(), os.environ.get("CUDA_VISIBLE_DEVICES"))
    import torch as torch_module

    if torch_module.cuda.is_available():
        torch_module.cuda.set_device(index)
    _task_device = f"cuda:{index}"
    return _task_device


def _call(fn: Callable[[Any], Any], item: Any, holds_gpu: bool = False) -> Any:
    """A child task's body: plugins first (a child may run in a fresh worker process), its device, then the item."""
    _prepare_process()
    _enter_task(holds_gpu)
    return fn(item)


def cpu_share(gpus: float, resources: dict[str, float]) -> float:
    """CPUs a task of ``gpus`` GPUs asks for: its GPUs' share of the cluster's CPUs (at least 1), so one encode
    task per GPU gets the cores that decode its JPEGs; a GPU-less task asks for 1."""
    total_gpus, total_cpus = float(resources.get("GPU", 0)), float(resources.get("CPU", 1))
    if not gpus or not total_gpus:
        return 1.0
    return float(max(1, int(total_cpus * gpus / total_gpus)))


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
            num_cpus: float | None = None, on_result: Callable[[int, Any], None] | None = None,
            check_cancelled: Callable[[], None] | None = None) -> list:
        """``num_cpus`` None: 1 for a GPU-less task, a GPU task's share of the cluster's CPUs (its loader)."""
        items = list(items)
        if self.inline:
            return map_in_process(fn, items, on_result=on_result, check_cancelled=check_cancelled)
        import ray

        gpus = self.default_num_gpus if num_gpus is None else num_gpus
        resources = ray.cluster_resources()
        if gpus and not resources.get("GPU"):
            gpus = 0  # a CPU-only cluster (tests, laptops): run the same tasks on CPUs
        if num_cpus is None:
            num_cpus = cpu_share(gpus, resources)
        task = ray.remote(_call).options(num_gpus=gpus, num_cpus=num_cpus, max_retries=self.max_retries,
                                         retry_exceptions=False, name=getattr(fn, "__name__", "task"),
                                         runtime_env={"env_vars": task_env(bool(gpus))})
        fn_ref = ray.put(fn)
        refs = [task.remote(fn_ref, item, bool(gpus)) for item in items]
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


def _job_task(job_id: str, lease: tuple[str, str, int], driver: bool, holds_gpu: bool = False) -> str:
    """Body of the Ray task that runs one job (inside a Ray worker process).

    ``driver``: the task holds no GPU and fans its heavy stages out as child tasks; otherwise it holds the job's
    GPUs (``holds_gpu``; none on a CPU-only cluster) and anything it maps runs inline.
    """
    _enter_task(holds_gpu and not driver)
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


def _start_ray(address: str | None, init_kwargs: dict[str, Any] | None, num_gpus: float | None,
               num_cpus: int | None) -> None:
    """Join ``address`` or start a local Ray (``num_gpus`` / ``num_cpus``: its resources) unless one runs."""
    import ray

    if ray.is_initialized():
        return
    kwargs = dict(init_kwargs or {})
    if address and address != "local":
        kwargs["address"] = address
    else:
        if num_gpus is not None:
            kwargs["num_gpus"] = num_gpus
        if num_cpus is not None:
            kwargs["num_cpus"] = num_cpus
    ray.init(**kwargs, log_to_driver=True)


def _job_task_kinds(gpus_per_job: float) -> tuple[Any, Any]:
    """The two job tasks: a GPU-less driver (fan-out methods) and a holder of ``gpus_per_job`` GPUs.

    A driver waits for its children and must hold nothing they need; a GPU-holding job never waits on children."""
    import ray

    env = {k: v for k, v in os.environ.items() if k in _PASSED_ENV}
    base = ray.remote(max_retries=0)(_job_task)
    driver_task = base.options(num_gpus=0, num_cpus=0, runtime_env={"env_vars": task_env(False, env)})
    holder_task = base.options(num_gpus=gpus_per_job, num_cpus=0 if gpus_per_job else 1,
                               runtime_env={"env_vars": task_env(bool(gpus_per_job), env)})
    return driver_task, holder_task


def _submit_claimed(store: JobStore, worker_id: str, inflight: dict[Any, Lease], concurrency: int,
                    kinds: tuple[Any, Any], holder_gpus: bool) -> None:
    """Claim jobs while fewer than ``concurrency`` run, each submitted as its kind of Ray task."""
    driver_task, holder_task = kinds
    while len(inflight) < concurrency:
        claimed = store.claim(worker_id)
        if claimed is None:
            return
        job, lease = claimed
        driver = fans_out(job.method)
        task = driver_task if driver else holder_task
        ref = task.remote(job.id, (lease.job_id, lease.worker_id, lease.attempt), driver, holder_gpus)
        inflight[ref] = lease
        log.info("job submitted to ray", extra={"job_id": job.id, "attempt": lease.attempt, "driver": driver})


def _collect_finished(store: JobStore, inflight: dict[Any, Lease], timeout: float) -> int:
    """Wait up to ``timeout`` for job tasks; record each finished one (a dead task's job is re-queued)."""
    import ray

    ready, _ = ray.wait(list(inflight), num_returns=1, timeout=timeout)
    for ref in ready:
        lease = inflight.pop(ref)
        try:
            outcome = ray.get(ref)
            log.info("ray task finished", extra={"job_id": lease.job_id, "outcome": outcome})
        except Exception as exc:  # the task's process died (OOM, node lost): let the store re-queue it
            log.warning("ray task died", extra={"job_id": lease.job_id, "error": str(exc)[:500]})
            store.abandon(lease, f"ray task died: {type(exc).__name__}")
    return len(ready)


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
    _start_ray(address, init_kwargs, num_gpus, num_cpus)
    cluster_gpus = float(ray.cluster_resources().get("GPU", 0))
    if gpus_per_job is None:
        gpus_per_job = 1.0 if cluster_gpus else 0.0
    if concurrency is None:
        concurrency = max(1, int(cluster_gpus // gpus_per_job) if gpus_per_job else 1)
    kinds = _job_task_kinds(gpus_per_job)
    store = JobStore.from_settings(settings)
    log.info("ray worker started", extra={"cluster_gpus": cluster_gpus, "concurrency": concurrency,
                                         "gpus_per_job": gpus_per_job})
    inflight: dict[Any, Lease] = {}
    ran = 0
    while not stop.is_set():
        try:
            store.sweep_stale()
            _submit_claimed(store, worker_id, inflight, concurrency, kinds, bool(gpus_per_job))
        except Exception:
            log.warning("claim failed", exc_info=True)
        if not inflight:
            if once:
                break
            stop.wait(settings.poll_seconds)
            continue
        _enforce_cancel(store, inflight, settings.cancel_grace_seconds)
        ran += _collect_finished(store, inflight, settings.poll_seconds)
    for ref in inflight:
        ray.cancel(ref)
    store.engine.dispose()
    return ran
