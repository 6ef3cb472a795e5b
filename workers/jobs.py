"""The job store: :class:`JobStore` over SQLAlchemy sessions, used by the API (submit, list, cancel) and by the
workers (claim, heartbeat, finish, sweep), in the API process as much as in each worker process.

The database row is the single source of truth for a job. Workers hold a *lease* on a running job
(``worker_id`` + ``attempts``) that they renew by heartbeating; a job whose lease has expired is taken back
by :meth:`JobStore.sweep_stale` and claimed again (or failed after ``max_attempts`` claims).
"""

from __future__ import annotations

import hashlib
import json
import secrets
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any, cast

from sqlalchemy import ColumnElement, CursorResult, Delete, Engine, Update, and_, case, delete, func, select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session, aliased

from workers.db import is_postgres, make_engine, make_sessionmaker, migrate
from workers.models import TERMINAL, Job, JobEvent, utcnow
from workers.settings import WorkerSettings


class JobNotFound(LookupError):
    """No such job for this owner (other owners' jobs are reported the same way)."""


class IdempotencyConflict(ValueError):
    """The Idempotency-Key was used before with a different request body."""


class InvalidState(ValueError):
    """The operation does not apply to the job's current status."""


@dataclass(frozen=True)
class Lease:
    """Proof that a worker holds a running job: it must match the row for any update to apply."""

    job_id: str
    worker_id: str
    attempt: int


@dataclass(frozen=True)
class HeartbeatResult:
    held: bool
    cancel_requested: bool


def _updated(session: Session, statement: Update | Delete) -> int:
    """Run an UPDATE or DELETE and return how many rows it changed."""
    return cast(CursorResult[Any], session.execute(statement)).rowcount


def new_job_id() -> str:
    return "job_" + secrets.token_hex(12)


def fingerprint(request: dict[str, Any]) -> str:
    """Canonical hash of a job request (what an Idempotency-Key is bound to)."""
    canonical = json.dumps(request, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(canonical.encode()).hexdigest()


def _position(session: Session, job_id: str) -> tuple[str | None, float | None]:
    """The job's current stage and progress, for an event that happens between the method's own reports."""
    row = session.execute(select(Job.stage, Job.progress).where(Job.id == job_id)).first()
    return (row.stage, row.progress) if row is not None else (None, None)


def job_request(job: Job) -> dict[str, Any]:
    return {
        "dataset": job.dataset,
        "method": job.method,
        "ipc": job.ipc,
        "params": job.params,
        "seed": job.seed,
        "max_per_class": job.max_per_class,
    }


class JobStore:
    """The jobs and job_events tables behind a small API. Thread-safe: a process shares one between threads."""

    def __init__(self, engine: Engine, *, max_attempts: int = 3, lease_seconds: float = 60.0):
        self.engine = engine
        self.max_attempts = max_attempts
        self.lease_seconds = lease_seconds
        self._read = make_sessionmaker(engine)
        # SQLite: writers take the lock at BEGIN (see workers.db); PostgreSQL ignores the option.
        self._write = make_sessionmaker(engine.execution_options(sqlite_immediate=True))
        self.postgres = is_postgres(engine)

    @classmethod
    def from_settings(cls, settings: WorkerSettings, *, migrate_schema: bool = True) -> JobStore:
        engine = make_engine(settings.resolved_database_url, settings.db_schema)
        if migrate_schema:
            migrate(engine, settings.db_schema)
        return cls(engine, max_attempts=settings.max_attempts, lease_seconds=settings.lease_seconds)

    @contextmanager
    def read(self) -> Iterator[Session]:
        with self._read() as session:
            yield session

    @contextmanager
    def write(self) -> Iterator[Session]:
        with self._write() as session, session.begin():
            session.connection()  # BEGIN now (SQLite: takes the write lock), so timestamps taken inside are fresh
            yield session

    def ping(self) -> None:
        with self.read() as session:
            session.execute(select(1))

    # ------------------------------------------------------------------------------------ API side
    def create_job(self, owner: str, request: dict[str, Any], idempotency_key: str | None = None, *,
                   name: str | None = None, estimate: dict[str, Any] | None = None, kind: str = "distill",
                   parent_id: str | None = None) -> tuple[Job, bool]:
        """Queue a job; with an idempotency key, a repeat of the same request returns the first job.

        Returns ``(job, replayed)``. Raises :class:`IdempotencyConflict` when the key was used for another body.
        """
        digest = fingerprint({**request, **({"name": name} if name else {}),
                              **({"kind": kind, "parent_id": parent_id} if kind != "distill" else {})})
        if idempotency_key is not None:
            existing = self._by_idempotency_key(owner, idempotency_key)
            if existing is not None:
                return self._check_replay(existing, digest), True
        job = Job(
            id=new_job_id(),
            owner=owner,
            status="queued",
            dataset=request["dataset"],
            method=request["method"],
            ipc=request["ipc"],
            seed=request.get("seed", 0),
            max_per_class=request.get("max_per_class"),
            params=request.get("params") or {},
            idempotency_key=idempotency_key,
            fingerprint=digest,
            progress=0.0,
            attempts=0,
            created_at=utcnow(),
            name=name,
            kind=kind,
            parent_id=parent_id,
            estimate=estimate,
        )
        try:
            with self.write() as session:
                session.add(job)
                session.add(JobEvent(job_id=job.id, created_at=job.created_at, level="info", stage="queued",
                                     message="job queued", progress=0.0))
        except IntegrityError:
            # Two requests with the same key raced; the other one won.
            existing = self._by_idempotency_key(owner, idempotency_key) if idempotency_key else None
            if existing is None:
                raise
            return self._check_replay(existing, digest), True
        return job, False

    def _by_idempotency_key(self, owner: str, key: str) -> Job | None:
        with self.read() as session:
            return session.scalars(select(Job).where(Job.owner == owner, Job.idempotency_key == key)).first()

    @staticmethod
    def _check_replay(job: Job, digest: str) -> Job:
        if job.fingerprint != digest:
            raise IdempotencyConflict("Idempotency-Key was already used with a different request body")
        return job

    def get_job(self, job_id: str, owner: str | None = None) -> Job:
        with self.read() as session:
            query = select(Job).where(Job.id == job_id)
            if owner is not None:
                query = query.where(Job.owner == owner)
            job = session.scalars(query).first()
        if job is None:
            raise JobNotFound(job_id)
        return job

    def list_jobs(
        self, owner: str | None, *, status: str | None = None, limit: int = 20, after: str | None = None
    ) -> tuple[list[Job], bool]:
        """Newest first; ``after`` is the id of the last job of the previous page."""
        with self.read() as session:
            query = select(Job)
            if owner is not None:
                query = query.where(Job.owner == owner)
            if status is not None:
                query = query.where(Job.status == status)
            if after is not None:
                cursor = session.scalars(select(Job.seq).where(Job.id == after, *(
                    [Job.owner == owner] if owner is not None else []))).first()
                if cursor is None:
                    raise JobNotFound(after)
                query = query.where(Job.seq < cursor)
            rows = list(session.scalars(query.order_by(Job.seq.desc()).limit(limit + 1)))
        return rows[:limit], len(rows) > limit

    def cancel_job(self, job_id: str, owner: str | None = None) -> Job:
        """Queued -> cancelled at once; running -> cancel requested (the worker stops at its next check)."""
        job = self.get_job(job_id, owner)
        with self.write() as session:
            now = utcnow()
            done = _updated(
                session,
                update(Job).where(Job.id == job.id, Job.status == "queued")
                .values(status="cancelled", finished_at=now, cancel_requested_at=now,
                        error_code="cancelled", error_message="cancelled before it started")
            )
            requested = 0
            if done:
                session.add(JobEvent(job_id=job.id, created_at=now, level="info", stage=job.stage or "queued",
                                     message="cancelled while queued", progress=job.progress))
            else:
                requested = _updated(
                    session,
                    update(Job).where(Job.id == job.id, Job.status == "running", Job.cancel_requested_at.is_(None))
                    .values(cancel_requested_at=now)
                )
                if requested:
                    session.add(JobEvent(job_id=job.id, created_at=now, level="info", stage=job.stage,
                                         message="cancel requested", progress=job.progress))
        job = self.get_job(job_id, owner)
        if job.status in ("succeeded", "failed") or (job.status == "cancelled" and not done and not requested):
            raise InvalidState(f"job already {job.status}")
        return job

    def delete_job(self, job_id: str, owner: str | None = None) -> Job:
        """Remove a finished job, its events and its finished evaluations from the store (the caller removes
        its files). A job with an evaluation still queued or running is refused: cancel that first."""
        job = self.get_job(job_id, owner)
        if job.status not in TERMINAL:
            raise InvalidState(f"job is {job.status}: cancel it first")
        with self.write() as session:
            children = list(session.scalars(select(Job).where(Job.parent_id == job.id)))
            busy = [child.id for child in children if child.status not in TERMINAL]
            if busy:
                raise InvalidState(f"evaluation {busy[0]} of this job is not finished: cancel it first")
            ids = [job.id, *(child.id for child in children)]
            session.execute(delete(JobEvent).where(JobEvent.job_id.in_(ids)))
            session.execute(delete(Job).where(Job.parent_id == job.id, Job.status.in_(TERMINAL)))
            if not _updated(session, delete(Job).where(Job.id == job.id, Job.status.in_(TERMINAL))):
                raise InvalidState("job changed meanwhile")
        return job

    def latest_evaluations(self, job_ids: list[str]) -> dict[str, Job]:
        """The newest evaluation job of each of these jobs (those that have one)."""
        if not job_ids:
            return {}
        with self.read() as session:
            rows = session.scalars(select(Job).where(Job.parent_id.in_(job_ids), Job.kind == "evaluate")
                                   .order_by(Job.seq)).all()
        return {row.parent_id: row for row in rows if row.parent_id is not None}

    def statuses(self, job_ids: list[str]) -> dict[str, str]:
        with self.read() as session:
            rows = session.execute(select(Job.id, Job.status).where(Job.id.in_(job_ids))).all()
        return {job_id: status for job_id, status in rows}

    def expired_artifacts(self, before: datetime) -> list[Job]:
        with self.read() as session:
            return list(session.scalars(select(Job).where(Job.status == "succeeded", Job.finished_at < before,
                                                          Job.artifact_path.is_not(None))))

    def forget_artifact(self, job_id: str, reason: str) -> None:
        with self.write() as session:
            session.execute(update(Job).where(Job.id == job_id).values(artifact_path=None))
            stage, progress = _position(session, job_id)
            session.add(JobEvent(job_id=job_id, created_at=utcnow(), level="info", message=reason, stage=stage,
                                 progress=progress))

    def list_events(self, job_id: str, owner: str | None, *, after: int | None = None,
                    limit: int = 100) -> tuple[list[JobEvent], bool]:
        self.get_job(job_id, owner)
        with self.read() as session:
            query = select(JobEvent).where(JobEvent.job_id == job_id)
            if after is not None:
                query = query.where(JobEvent.id > after)
            rows = list(session.scalars(query.order_by(JobEvent.id).limit(limit + 1)))
        return rows[:limit], len(rows) > limit

    def counts_by_status(self) -> dict[str, int]:
        with self.read() as session:
            return dict(session.execute(select(Job.status, func.count()).group_by(Job.status)).all())

    def stage_history(self, method: str, dataset: str, limit: int = 3,
                      kind: str = "distill") -> list[tuple[float, list[list[Any]]]]:
        """(work, stage log) of the most recent succeeded jobs of a method on a dataset (evaluations: of any
        method), newest first: what an estimate learns from (:mod:`workers.estimates`)."""
        with self.read() as session:
            same = [Job.kind == kind] + ([Job.method == method] if kind == "distill" else [])
            rows = session.execute(
                select(Job.estimate, Job.stage_log).where(
                    Job.status == "succeeded", *same, Job.dataset == dataset,
                    Job.stage_log.is_not(None), Job.estimate.is_not(None))
                .order_by(Job.seq.desc()).limit(limit)
            ).all()
        return [(float(estimate.get("work") or 1.0), list(log)) for estimate, log in rows
                if isinstance(estimate, dict) and log]

    def stage_timings(self, recent: int = 1000) -> dict[str, tuple[int, float]]:
        """Per stage: (jobs, total seconds) over the most recent succeeded jobs."""
        with self.read() as session:
            rows = session.scalars(
                select(Job.timings).where(Job.status == "succeeded", Job.timings.is_not(None))
                .order_by(Job.seq.desc()).limit(recent)
            ).all()
        out: dict[str, tuple[int, float]] = {}
        for timings in rows:
            for stage, seconds in (timings or {}).items():
                count, total = out.get(stage, (0, 0.0))
                out[stage] = (count + 1, total + float(seconds))
        return out

    # ------------------------------------------------------------------------------------ worker side
    def claim(self, worker_id: str) -> tuple[Job, Lease] | None:
        """Atomically move the oldest queued job to running under this worker's lease."""
        queued = aliased(Job, name="queued_job")
        pick = select(queued.seq).where(queued.status == "queued").order_by(queued.seq).limit(1)
        if self.postgres:
            pick = pick.with_for_update(skip_locked=True)
        with self.write() as session:
            now = utcnow()
            # Clocks of different processes (and a job committed just after `now`): never start before creation.
            first_start = case((Job.created_at > now, Job.created_at), else_=now)
            claimed = session.execute(
                update(Job)
                .where(Job.seq == pick.scalar_subquery(), Job.status == "queued")
                .values(status="running", worker_id=worker_id, attempts=Job.attempts + 1, heartbeat_at=now,
                        started_at=func.coalesce(Job.started_at, first_start))
                .returning(Job.id, Job.attempts)
            ).first()
            if claimed is None:
                return None
            job_id, attempt = claimed
            stage, progress = _position(session, job_id)
            session.add(JobEvent(job_id=job_id, created_at=now, level="info", stage=stage or "starting",
                                 progress=progress,
                                 message=f"claimed by {worker_id} (attempt {attempt} of {self.max_attempts})"))
        job = self.get_job(job_id)
        return job, Lease(job_id, worker_id, attempt)

    def _held(self, lease: Lease) -> ColumnElement[bool]:
        return and_(Job.id == lease.job_id, Job.worker_id == lease.worker_id, Job.attempts == lease.attempt,
                    Job.status == "running")

    def heartbeat(self, lease: Lease, stage: str | None = None, progress: float | None = None,
                  stage_log: list[list[Any]] | None = None) -> HeartbeatResult:
        values: dict[str, Any] = {"heartbeat_at": utcnow()}
        if stage_log is not None:
            values["stage_log"] = stage_log
        if stage is not None:
            values["stage"] = stage
        if progress is not None:
            values["progress"] = progress
        with self.write() as session:
            held = _updated(session, update(Job).where(self._held(lease)).values(**values))
            cancel = session.scalar(select(Job.cancel_requested_at).where(Job.id == lease.job_id))
        return HeartbeatResult(held=bool(held), cancel_requested=cancel is not None)

    def lease_state(self, lease: Lease) -> HeartbeatResult:
        """Whether the lease still holds and a cancel was requested, read without writing (between heartbeats)."""
        with self.read() as session:
            row = session.execute(select(Job.status, Job.worker_id, Job.attempts, Job.cancel_requested_at)
                                  .where(Job.id == lease.job_id)).first()
        if row is None:
            return HeartbeatResult(held=False, cancel_requested=False)
        held = row.status == "running" and row.worker_id == lease.worker_id and row.attempts == lease.attempt
        return HeartbeatResult(held=held, cancel_requested=row.cancel_requested_at is not None)

    def add_event(self, job_id: str, message: str, *, level: str = "info", stage: str | None = None,
                  progress: float | None = None) -> None:
        """Every event says where the job was: a caller that names no stage gets the job's current one."""
        with self.write() as session:
            if stage is None or progress is None:
                current_stage, current_progress = _position(session, job_id)
                stage = stage if stage is not None else current_stage
                progress = progress if progress is not None else current_progress
            session.add(JobEvent(job_id=job_id, created_at=utcnow(), level=level, stage=stage,
                                 message=message[:4000], progress=progress))

    def finish(self, lease: Lease, status: str, *, error: tuple[str, str] | None = None,
               artifact: tuple[str, int, str] | None = None, timings: dict[str, float] | None = None,
               stage_log: list[list[Any]] | None = None, result: dict[str, Any] | None = None) -> bool:
        """Record the end of a job; a no-op (returns False) when the lease was lost meanwhile."""
        assert status in TERMINAL
        values: dict[str, Any] = {"status": status}
        if status == "succeeded":
            values.update(progress=1.0, stage="done")
        if error is not None:
            values.update(error_code=error[0], error_message=error[1][:4000])
        if artifact is not None:
            values.update(artifact_path=artifact[0], artifact_bytes=artifact[1], artifact_sha256=artifact[2])
        if timings is not None:
            values["timings"] = timings
        if stage_log is not None:
            values["stage_log"] = stage_log
        if result is not None:
            values["result"] = result
        with self.write() as session:
            now = values["finished_at"] = values["heartbeat_at"] = utcnow()
            stage, progress = _position(session, lease.job_id)
            done = _updated(session, update(Job).where(self._held(lease)).values(**values))
            if done:
                message = status if error is None else f"{status}: {error[1]}"
                session.add(JobEvent(job_id=lease.job_id, created_at=now, level="error" if status == "failed" else "info",
                                     stage=values.get("stage", stage), message=message[:4000],
                                     progress=values.get("progress", progress)))
        return bool(done)

    def sweep_stale(self, now: datetime | None = None) -> int:
        """Take back running jobs whose worker stopped heartbeating: re-queue, or fail after max attempts."""
        changed = 0
        with self.write() as session:
            now = now or utcnow()
            cutoff = now - timedelta(seconds=self.lease_seconds)
            query = select(Job).where(Job.status == "running", Job.heartbeat_at < cutoff)
            if self.postgres:
                query = query.with_for_update(skip_locked=True)
            for job in session.scalars(query).all():
                lost = f"worker {job.worker_id} stopped heartbeating during attempt {job.attempts}"
                if job.cancel_requested_at is not None:
                    job.status, job.finished_at = "cancelled", now
                    job.error_code, job.error_message = "cancelled", "cancelled (its worker was lost)"
                    message = f"{lost}; job was being cancelled: cancelled"
                elif job.attempts >= self.max_attempts:
                    job.status, job.finished_at = "failed", now
                    job.error_code = "worker_lost"
                    job.error_message = f"{lost}; giving up after {job.attempts} of {self.max_attempts} attempts"
                    message = job.error_message
                else:
                    job.status, job.worker_id, job.heartbeat_at = "queued", None, None
                    message = f"{lost}; re-queued (attempt {job.attempts + 1} of {self.max_attempts} next)"
                session.add(JobEvent(job_id=job.id, created_at=now, level="warn", stage=job.stage,
                                     message=message, progress=job.progress))
                changed += 1
        return changed

    def release(self, lease: Lease, reason: str) -> bool:
        """Hand a running job back to the queue (graceful worker shutdown); the attempt is not counted."""
        with self.write() as session:
            now = utcnow()
            done = _updated(
                session,
                update(Job).where(self._held(lease))
                .values(status="queued", worker_id=None, heartbeat_at=None, attempts=Job.attempts - 1)
            )
            if done:
                stage, progress = _position(session, lease.job_id)
                session.add(JobEvent(job_id=lease.job_id, created_at=now, level="warn", message=reason, stage=stage,
                                     progress=progress))
        return bool(done)

    def abandon(self, lease: Lease, reason: str) -> None:
        """The process running a job died (e.g. its Ray task crashed): re-queue it now, as a stale sweep would."""
        with self.write() as session:
            session.execute(update(Job).where(self._held(lease)).values(heartbeat_at=datetime(1970, 1, 1)))
        self.add_event(lease.job_id, reason, level="warn")
        self.sweep_stale()

    def running_jobs_of(self, worker_prefix: str) -> list[Job]:
        with self.read() as session:
            return list(session.scalars(select(Job).where(Job.status == "running",
                                                          Job.worker_id.startswith(worker_prefix))))


def make_store(url: str, schema: str | None = None, **kwargs: Any) -> JobStore:
    engine = make_engine(url, schema)
    migrate(engine, schema)
    return JobStore(engine, **kwargs)
