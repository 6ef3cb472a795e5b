"""Execute one claimed job to an archive: the glue between the job store and :func:`distill.runner.run_to_archive`.

Used unchanged by the local worker process and inside a Ray task. While the method runs, a heartbeat thread
renews the lease and reads the cancel flag; the progress sink writes stage changes as events and throttled
progress to the job row. Checkpoints live under DISTILL_HOME/jobs/<id>/checkpoints, so a job claimed again
after its worker died resumes from its last completed stage.
"""

from __future__ import annotations

import logging
import re
import threading
import time
from pathlib import Path
from typing import Any

from distill.config import get_settings as get_core_settings
from distill.errors import Cancelled, DistillError
from distill.methods.base import Executor
from distill.models import registered_models
from distill.progress import score_text
from workers.janitor import discard_checkpoints
from workers.jobs import HeartbeatResult, JobStore, Lease
from workers.logs import job_context
from workers.models import Job
from workers.settings import WorkerSettings

log = logging.getLogger("distill.worker")

PROGRESS_WRITE_SECONDS = 0.5
PREPARE_STAGE = "prepare"


def artifact_name(job_id: str) -> str:
    return f"{job_id}.tar"


_ABSOLUTE_PATH = re.compile(r"(?<![\w.~$<-])/[^\s'\"()\[\],:;]+")


def redact_paths(text: str) -> str:
    """Job errors and events reach HTTP clients: no path of this server in them. The configured folders
    become their setting's name, registered models their name, and any other absolute path ``<path>``."""
    core = get_core_settings()
    named: list[tuple[Path | None, str]] = [
        (core.weights_dir, "$DISTILL_WEIGHTS_DIR"), (core.data_dir, "$DISTILL_DATA_DIR"), (core.home, "$DISTILL_HOME"),
        (core.fashion_mnist_dir, "$DISTILL_FASHION_MNIST_DIR"),
    ]
    try:
        named += [(folder, f"<model {name}>") for name, folder in registered_models().items()]
    except DistillError:
        pass
    replacements: dict[str, str] = {}
    for folder, label in named:
        if folder is None:
            continue
        for form in (folder.expanduser(), folder.expanduser().resolve()):
            if str(form) != "/":
                replacements.setdefault(str(form).rstrip("/"), label)
    for prefix in sorted(replacements, key=len, reverse=True):  # the longest (most specific) first
        text = text.replace(prefix, replacements[prefix])
    return _ABSOLUTE_PATH.sub("<path>", text)


class _JobControl:
    """Shared state between the method's thread (progress, cancel checks) and the heartbeat thread."""

    def __init__(self, store: JobStore, lease: Lease, settings: WorkerSettings, stop_flag: threading.Event | None,
                 resumed_log: list[Any] | None = None):
        self.store = store
        self.lease = lease
        self.heartbeat_seconds = settings.heartbeat_seconds
        self.cancel_poll_seconds = min(settings.cancel_poll_seconds, settings.heartbeat_seconds)
        self.stop_flag = stop_flag
        self.stage: str | None = None
        self.fraction = 0.0
        # [[stage, seconds], ...] of the stages finished so far, in order (the job row keeps it for estimates)
        self.stage_log: list[list[Any]] = [list(item) for item in (resumed_log or [])]
        self._stage_started = time.monotonic()
        self._log_dirty = False
        self.cancel_requested = False
        self.lost = False
        self._last_write = 0.0
        self._lock = threading.Lock()
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._beat, name=f"heartbeat-{lease.job_id}", daemon=True)

    # -- lifecycle
    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._done.set()
        self._thread.join(timeout=10)

    def _beat(self) -> None:
        """Heartbeat every ``heartbeat_seconds``; in between, read the cancel flag every ``cancel_poll_seconds``
        (a cheap read), so a cancel reaches the job within about a second whatever the heartbeat period."""
        next_beat = time.monotonic() + self.heartbeat_seconds
        while not self._done.wait(self.cancel_poll_seconds):
            if time.monotonic() >= next_beat:
                next_beat = time.monotonic() + self.heartbeat_seconds
                self._write(force=True)
                continue
            try:
                self._record(self.store.lease_state(self.lease))
            except Exception:  # a database hiccup: the next poll or beat retries
                log.debug("cancel poll failed", exc_info=True)

    def _write(self, force: bool = False) -> None:
        now = time.monotonic()
        with self._lock:
            if not force and now - self._last_write < PROGRESS_WRITE_SECONDS:
                return
            self._last_write = now
            stage, fraction = self.stage, self.fraction
            stage_log = [list(item) for item in self.stage_log] if self._log_dirty else None
            self._log_dirty = False
        try:
            result = self.store.heartbeat(self.lease, stage, fraction, stage_log)
        except Exception:  # a database hiccup must not kill the job; the next beat retries
            log.warning("heartbeat failed", exc_info=True)
            return
        self._record(result)

    def _record(self, result: HeartbeatResult) -> None:
        self.cancel_requested = self.cancel_requested or result.cancel_requested
        if not result.held and not self.lost:
            self.lost = True
            log.warning("lease lost: the job was taken back (worker considered dead or job cancelled)")

    # -- what the method sees
    def progress(self, stage: str, fraction: float, message: str | None = None) -> None:
        changed = stage != self.stage
        with self._lock:
            if changed:
                self._close_stage()
            self.stage, self.fraction = stage, fraction
        if changed:
            self._event(f"stage {stage} started", stage, fraction)
            log.info("stage started", extra={"stage": stage})
        if message:
            self._event(message, stage, fraction)
        self._write(force=changed)

    def _close_stage(self) -> None:
        """Record the time of the stage that just ended (called under the lock)."""
        now = time.monotonic()
        # before the method's first report the job loads its data and models: "prepare", real time too
        self.stage_log.append([self.stage or PREPARE_STAGE, round(now - self._stage_started, 3)])
        self._log_dirty = True
        self._stage_started = now

    def finished_log(self) -> list[list[Any]]:
        with self._lock:
            self._close_stage()
            self.stage = None
            return [list(item) for item in self.stage_log]

    def log(self, message: str) -> None:
        log.info(message, extra={"stage": self.stage})
        self._event(message, self.stage, self.fraction)

    def _event(self, message: str, stage: str | None, fraction: float) -> None:
        try:
            self.store.add_event(self.lease.job_id, redact_paths(message), stage=stage, progress=fraction)
        except Exception:  # an event lost to a database hiccup must not fail an hour-long job
            log.warning("could not record event", exc_info=True, extra={"event": message})

    def is_cancelled(self) -> bool:
        return self.cancel_requested or self.lost or (self.stop_flag is not None and self.stop_flag.is_set())


def execute_job(
    store: JobStore,
    job: Job,
    lease: Lease,
    settings: WorkerSettings,
    *,
    executor: Executor | None = None,
    stop_flag: threading.Event | None = None,
) -> str:
    """Run a claimed job to its end and record the outcome. Returns the final status (or 'lost'/'released')."""
    from distill.runner import RunRequest, run_to_archive

    if job.kind == "evaluate":
        return execute_evaluation(store, job, lease, settings, stop_flag=stop_flag)
    with job_context(job.id):
        control = _JobControl(store, lease, settings, stop_flag, resumed_log=job.stage_log)
        checkpoint_dir = settings.job_dir(job.id) / "checkpoints"
        resumed = sorted(p.stem for p in checkpoint_dir.glob("*.pt")) if checkpoint_dir.exists() else []
        log.info("job started", extra={"attempt": lease.attempt, "method": job.method, "dataset": job.dataset})
        if resumed:
            control.log(f"resuming attempt {lease.attempt} from checkpoints: {', '.join(resumed)}")
        out = settings.artifact_path(artifact_name(job.id))
        request = RunRequest(dataset=job.dataset, method=job.method, ipc=job.ipc, params=dict(job.params or {}),
                             seed=job.seed, max_per_class=job.max_per_class, device=settings.device, paths=False)
        control.start()
        started = time.perf_counter()
        try:
            result = run_to_archive(request, out, progress=control.progress, checkpoint_dir=checkpoint_dir,
                                    is_cancelled=control.is_cancelled, log=control.log, executor=executor)
        except Cancelled:
            outcome = _stopped(store, lease, control, stop_flag)
            if outcome == "cancelled":
                discard_checkpoints(settings, job.id)
            return outcome
        except DistillError as exc:
            control.stop()
            if store.finish(lease, "failed", error=(exc.code, redact_paths(str(exc)))):
                discard_checkpoints(settings, job.id)
            log.warning("job failed", extra={"error": str(exc)})
            return "failed"
        except Exception as exc:  # a bug or a resource problem: record it, keep the worker alive
            control.stop()
            log.exception("job crashed")
            if store.finish(lease, "failed", error=("internal_error", redact_paths(f"{type(exc).__name__}: {exc}"))):
                discard_checkpoints(settings, job.id)
            return "failed"
        control.stop()
        size = Path(result.path).stat().st_size
        timings = {k: float(v) for k, v in result.manifest.get("timings", {}).items()}
        if store.finish(lease, "succeeded", artifact=(artifact_name(job.id), size, result.sha256), timings=timings,
                        stage_log=control.finished_log()):
            discard_checkpoints(settings, job.id)
            log.info("job succeeded", extra={"bytes": size, "sha256": result.sha256,
                                            "seconds": round(time.perf_counter() - started, 3)})
            return "succeeded"
        log.warning("job finished but its lease was lost; result not recorded")
        return "lost"


def _stopped(store: JobStore, lease: Lease, control: _JobControl, stop_flag: threading.Event | None) -> str:
    control.stop()
    if control.lost:
        log.warning("stopped: lease lost")
        return "lost"
    if control.cancel_requested:
        store.finish(lease, "cancelled", error=("cancelled", "cancelled while running"))
        log.info("job cancelled")
        return "cancelled"
    # The worker is shutting down: hand the job back so another worker resumes it from its checkpoints.
    store.release(lease, "worker shutting down; job re-queued")
    log.info("job released (worker shutting down)")
    return "released"


EVALUATION_STAGE = "evaluate"


def evaluation_config(params: dict[str, Any], device: str) -> Any:
    """`distill eval`'s protocol with the job's budget (runs, epochs, test images); everything else its defaults."""
    from distill.evaluate import EvalConfig

    config = EvalConfig(device=device)
    for key in ("runs", "epochs", "test_limit"):
        if params.get(key) is not None:
            setattr(config, key, int(params[key]))
    return config


def execute_evaluation(store: JobStore, job: Job, lease: Lease, settings: WorkerSettings, *,
                       stop_flag: threading.Event | None = None) -> str:
    """Train students on the parent job's archive and on the random-subset control (`distill eval`'s protocol),
    reporting one ``evaluate`` stage whose fraction covers both, and record accuracy, control and gain."""
    from distill.archive import read_archive
    from distill.data.registry import get_dataset
    from distill.evaluate import evaluate_distilled
    from distill.runner import resolve_device

    with job_context(job.id):
        control = _JobControl(store, lease, settings, stop_flag)
        control.start()

        def progress(_stage: str, fraction: float) -> None:
            if control.is_cancelled():
                raise Cancelled("evaluation cancelled")
            control.progress(EVALUATION_STAGE, min(max(fraction, 0.0), 1.0))

        try:
            parent = store.get_job(job.parent_id or "")
            if parent.status != "succeeded" or not parent.artifact_path:
                raise DistillError(f"job {job.parent_id} has no archive to evaluate")
            path = settings.artifact_path(parent.artifact_path)
            if not path.is_file():
                raise DistillError(f"the archive of {parent.id} is no longer in storage")
            progress(EVALUATION_STAGE, 0.0)
            loaded = read_archive(path)
            dataset = get_dataset(loaded.dataset)
            config = evaluation_config(dict(job.params or {}), str(resolve_device(settings.device)))
            ipc = int(loaded.manifest.get("ipc") or len(loaded.distilled) // dataset.num_classes)
            result = evaluate_distilled(loaded.distilled, dataset, config, progress=progress, control_ipc=ipc)
        except Cancelled:
            return _stopped(store, lease, control, stop_flag)
        except Exception as exc:  # DistillError or a bug: record it, keep the worker alive
            control.stop()
            code = exc.code if isinstance(exc, DistillError) else "internal_error"
            message = str(exc) if isinstance(exc, DistillError) else f"{type(exc).__name__}: {exc}"
            if not isinstance(exc, DistillError):
                log.exception("evaluation crashed")
            store.finish(lease, "failed", error=(code, redact_paths(message)), stage_log=control.finished_log())
            return "failed"
        control.stop()
        summary = evaluation_summary(result)
        control.log(f"accuracy {_score_text(summary['accuracy'])}"
                    + (f", control {_score_text(summary['control'])}, gain {summary['gain']:+.2f} points"
                       if summary.get("control") else ""))
        if store.finish(lease, "succeeded", result=summary, stage_log=control.finished_log()):
            return "succeeded"
        return "lost"


def _score_text(score: dict[str, Any]) -> str:
    return score_text(score["mean"], score["std"], score["runs"])


def evaluation_summary(result: Any) -> dict[str, Any]:
    """An EvalResult as the job row keeps it: accuracy and control (mean, std, runs), gain, protocol."""

    def score(r: Any) -> dict[str, Any]:
        return {"mean": round(r.accuracy_mean, 3), "std": round(r.accuracy_std, 3), "runs": r.runs}

    return {"accuracy": score(result), "control": score(result.control) if result.control is not None else None,
            "gain": round(result.gain, 3) if result.gain is not None else None,
            "protocol": {"protocol": result.protocol, "model": result.model, "epochs": result.epochs,
                         "runs": result.runs, "test_images": result.test_images, "seconds": result.wall_seconds}}
