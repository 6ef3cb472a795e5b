"""The files a job leaves under DISTILL_HOME: its checkpoints (``jobs/<id>/``), its archive and preview
(``artifacts/<id>.tar``, ``<id>.preview.png``). Checkpoints go when a job ends without success (nothing will
resume it); a finished job's files go with ``DELETE /jobs/{id}``, or after ``DISTILL_RETENTION_DAYS``."""

from __future__ import annotations

import logging
import shutil
from datetime import timedelta

from workers.jobs import JobStore
from workers.models import TERMINAL, Job, utcnow
from workers.settings import WorkerSettings

log = logging.getLogger("distill.worker")


def discard_checkpoints(settings: WorkerSettings, job_id: str) -> None:
    shutil.rmtree(settings.job_dir(job_id), ignore_errors=True)


def discard_job_files(settings: WorkerSettings, job_id: str, artifact_name: str | None) -> None:
    """Everything a finished job left: checkpoints, archive, preview."""
    discard_checkpoints(settings, job_id)
    if artifact_name:
        archive = settings.artifact_path(artifact_name)
        archive.unlink(missing_ok=True)
        archive.with_name(f"{job_id}.preview.png").unlink(missing_ok=True)


def delete_finished_job(store: JobStore, settings: WorkerSettings, job_id: str, owner: str | None) -> Job:
    """``DELETE /jobs/{id}``: a finished job's files first, then its row. On a full disk the store's own delete
    needs space (SQLite's journal), so freeing the archive first is what lets the delete, and the next ones,
    succeed. Raises JobNotFound, or InvalidState for a job that has not finished (nothing is removed then)."""
    job = store.get_job(job_id, owner)
    if job.status in TERMINAL:
        discard_job_files(settings, job.id, job.artifact_path)
    return store.delete_job(job_id, owner)


def sweep_files(store: JobStore, settings: WorkerSettings) -> int:
    """Checkpoint folders of jobs that ended (or are unknown to the store), and archives past the retention
    period. Returns the number of jobs whose files were removed."""
    removed = 0
    jobs_dir = settings.home_dir / "jobs"
    folders = [p.name for p in jobs_dir.iterdir() if p.is_dir()] if jobs_dir.is_dir() else []
    if folders:
        statuses = store.statuses(folders)
        for job_id in folders:
            if statuses.get(job_id) in (None, "succeeded", "failed", "cancelled"):
                discard_checkpoints(settings, job_id)
                removed += 1
    if settings.retention_days is not None:
        for job in store.expired_artifacts(utcnow() - timedelta(days=settings.retention_days)):
            discard_job_files(settings, job.id, job.artifact_path)
            store.forget_artifact(job.id, f"archive removed after {settings.retention_days:g} days (retention policy)")
            removed += 1
    if removed:
        log.info("removed files of finished jobs", extra={"jobs": removed})
    return removed
