"""The embedded executor: a worker loop that claims jobs from the store and runs them in this process,
and the supervisor behind ``distill serve`` that keeps one such worker process per GPU (or one on the CPU).

A worker runs one job at a time, so killing its process affects that job only; the job's lease then expires
and another worker claims it again, resuming from its checkpoints.
"""

from __future__ import annotations

import logging
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import uuid
from dataclasses import dataclass, field
from typing import Any

from distill.methods.base import Executor
from workers.janitor import discard_checkpoints, sweep_files
from workers.jobs import JobStore, Lease
from workers.logs import worker_id_var
from workers.models import Job, utcnow
from workers.settings import WorkerSettings

log = logging.getLogger("distill.worker")

SWEEP_FILES_SECONDS = 60.0


def new_worker_id(tag: str = "cpu") -> str:
    return f"{socket.gethostname()}:{tag}:{os.getpid()}:{uuid.uuid4().hex[:6]}"


def run_worker(
    settings: WorkerSettings,
    *,
    worker_id: str | None = None,
    stop: threading.Event | None = None,
    once: bool = False,
    max_jobs: int | None = None,
    executor: Executor | None = None,
) -> int:
    """Claim and run jobs until ``stop`` is set (or after one idle poll with ``once``). Returns jobs run."""
    stop = stop or threading.Event()
    worker_id = worker_id or new_worker_id()
    worker_id_var.set(worker_id)
    settings.apply_hub_policy()
    store = JobStore.from_settings(settings)
    # Import torch and the job code before claiming, not while holding a lease.
    from workers.execution import execute_job

    log.info("worker started", extra={"database": store.engine.url.render_as_string(hide_password=True)})
    ran = 0
    next_sweep = 0.0
    supervisor = int(os.environ.get("DISTILL_SUPERVISOR_PID", "0"))
    if supervisor:
        threading.Thread(target=_watch_parent, args=(supervisor, stop), name="parent-watch", daemon=True).start()
    while not stop.is_set():
        try:
            store.sweep_stale()
            claimed = store.claim(worker_id)
        except Exception:  # the database may be restarting; keep polling
            log.warning("claim failed", exc_info=True)
            claimed = None
        if claimed is None:
            if once:
                break
            if time.monotonic() >= next_sweep:  # idle: tidy the files of finished jobs
                next_sweep = time.monotonic() + SWEEP_FILES_SECONDS
                try:
                    sweep_files(store, settings)
                except Exception:
                    log.warning("file sweep failed", exc_info=True)
            stop.wait(settings.poll_seconds)
            continue
        job, lease = claimed
        execute_job(store, job, lease, settings, executor=executor, stop_flag=stop)
        ran += 1
        if max_jobs is not None and ran >= max_jobs:
            break
    log.info("worker stopped", extra={"jobs_run": ran})
    store.engine.dispose()
    return ran


def _watch_parent(parent: int, stop: threading.Event) -> None:
    """`distill serve` was killed without stopping us: behave as on SIGTERM instead of lingering as an orphan."""
    while not stop.wait(1.0):
        if os.getppid() != parent:
            log.warning("supervisor is gone; stopping")
            stop.set()


def install_stop_signals(stop: threading.Event) -> None:
    """SIGTERM/SIGINT: stop claiming, hand the running job back at its next check, then exit."""

    def _handler(signum: int, _frame: Any) -> None:
        log.info("stop signal received", extra={"signal": signum})
        stop.set()

    signal.signal(signal.SIGTERM, _handler)
    signal.signal(signal.SIGINT, _handler)


# ----------------------------------------------------------------------------------------------- supervisor
@dataclass
class _Child:
    index: int
    gpu: int | None
    worker_id: str = ""
    process: subprocess.Popen | None = None
    restarts: int = 0
    started: float = field(default_factory=time.monotonic)


def local_gpu_count() -> int:
    try:
        import torch

        return torch.cuda.device_count() if torch.cuda.is_available() else 0
    except Exception:
        return 0


class Supervisor:
    """Keeps N worker processes alive (``python -m workers worker --in-process``), one pinned to each GPU;
    behind ``distill serve`` and a standalone ``distill worker``.

    It also enforces cancellation and shutdown: a worker whose job ignores a cancel for ``cancel_grace_seconds``
    is killed and restarted, and the job is recorded as cancelled; on :meth:`stop`, a worker that has not
    handed its job back within ``stop_grace_seconds`` is killed and its job re-queued at once.
    """

    def __init__(self, settings: WorkerSettings, count: int, gpus: list[int] | None = None,
                 extra_args: list[str] | None = None, worker_ids: list[str] | None = None):
        self.settings = settings
        self.children = [_Child(i, gpus[i] if gpus else None) for i in range(count)]
        self.worker_ids = worker_ids
        self.extra_args = extra_args or []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._watch, name="supervisor", daemon=True)
        self.store = JobStore.from_settings(settings)

    def start(self) -> None:
        for child in self.children:
            self._spawn(child)
        self._thread.start()

    def _spawn(self, child: _Child) -> None:
        if self.worker_ids:
            child.worker_id = self.worker_ids[child.index]
        else:
            tag = f"gpu{child.gpu}" if child.gpu is not None else f"cpu{child.index}"
            child.worker_id = f"{socket.gethostname()}:{tag}:{uuid.uuid4().hex[:6]}"
        env = dict(os.environ, DISTILL_SUPERVISOR_PID=str(os.getpid()))
        if child.gpu is not None:
            env["CUDA_VISIBLE_DEVICES"] = str(child.gpu)
        command = [sys.executable, "-m", "workers", "worker", "--in-process", "--worker-id", child.worker_id,
                   *self.extra_args]
        child.process = subprocess.Popen(command, env=env)
        child.started = time.monotonic()
        log.info("worker process started", extra={"pid": child.process.pid, "child_worker": child.worker_id})

    def _watch(self) -> None:
        while not self._stop.wait(1.0):
            for child in self.children:
                if child.process is None:
                    continue
                code = child.process.poll()
                if code is not None and not self._stop.is_set():
                    log.warning("worker process exited; restarting", extra={"code": code, "child_worker": child.worker_id})
                    child.restarts += 1
                    if self._stop.wait(min(30.0, 0.5 * 2 ** min(child.restarts, 6))):
                        return
                    self._spawn(child)
                    continue
                try:
                    self._enforce_cancel(child)
                except Exception:
                    log.warning("cancel enforcement failed", exc_info=True)

    def _running_jobs(self, child: _Child) -> list[Job]:
        return [job for job in self.store.running_jobs_of(child.worker_id) if job.worker_id == child.worker_id]

    def _enforce_cancel(self, child: _Child) -> None:
        for job in self._running_jobs(child):
            if job.cancel_requested_at is None:
                continue
            waited = (utcnow() - job.cancel_requested_at).total_seconds()
            if waited < self.settings.cancel_grace_seconds:
                continue
            log.warning("job ignored its cancel; killing its worker", extra={"job_id": job.id, "waited_s": waited})
            assert child.process is not None
            child.process.kill()
            child.process.wait(timeout=30)
            if self.store.finish(Lease(job.id, job.worker_id or "", job.attempts), "cancelled",
                                 error=("cancelled", f"cancelled (worker killed after {waited:.0f} s grace)")):
                discard_checkpoints(self.settings, job.id)
            self._spawn(child)  # a deliberate kill: no crash back-off before the next job
            return

    def stop(self, grace: float | None = None) -> None:
        """SIGTERM every worker; kill one still running after ``grace`` (default ``stop_grace_seconds``) and
        hand its job back to the queue (the attempt is not counted: the job was stopped, not lost)."""
        grace = self.settings.stop_grace_seconds if grace is None else grace
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout=30)  # no restart can race with the shutdown below
        for child in self.children:
            if child.process is not None and child.process.poll() is None:
                child.process.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + grace
        for child in self.children:
            if child.process is None:
                continue
            try:
                child.process.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                child.process.kill()
                child.process.wait()
                for job in self._running_jobs(child):
                    self.store.release(Lease(job.id, child.worker_id, job.attempts),
                                       f"worker killed {grace:g} s after its stop signal; job re-queued")
                    log.warning("worker killed after the stop grace; job re-queued", extra={"job_id": job.id})
        self.store.engine.dispose()
