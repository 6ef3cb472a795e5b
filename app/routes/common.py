"""Pieces the job routes share (``jobs``, ``stream``, ``results``): path parameters, documented error responses,
the Job schema of a stored job, the estimate recorded at submit, and the dependency that finds a finished job's archive.

They live here, not in one of the route modules, so that no route module imports another.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, cast

from fastapi import Depends, HTTPException
from fastapi import Path as PathParam

from app import schemas
from app.deps import OwnerDep, StoreDep, WorkerSettingsDep
from app.jobview import job_fields
from workers.jobs import JobNotFound, JobStore, job_request
from workers.models import Job

JobId = Annotated[str, PathParam(min_length=1, max_length=40, description="job id (job_...)")]
Responses = dict[int | str, dict[str, Any]]
NOT_FOUND: Responses = {404: {"model": schemas.Problem, "description": "no such job for this API key"}}
UNAUTHORIZED: Responses = {401: {"model": schemas.Problem, "description": "missing or invalid API key"}}


def to_schema(job: Job, evaluation: Job | None = None) -> schemas.Job:
    """The API's view of a stored job, with its latest evaluation's results when it has one."""
    artifact = None
    if job.status == "succeeded" and job.artifact_path and job.artifact_sha256:
        artifact = schemas.Artifact(url=f"/jobs/{job.id}/artifact", bytes=job.artifact_bytes or 0,
                                    sha256=job.artifact_sha256, preview_url=f"/jobs/{job.id}/preview.png")
    error = schemas.JobError(code=job.error_code, message=job.error_message or "") if job.error_code else None
    return schemas.Job(
        id=job.id, status=cast(schemas.JobStatus, job.status), stage=job.stage, progress=min(max(job.progress or 0.0, 0.0), 1.0),
        created_at=job.created_at, started_at=job.started_at, finished_at=job.finished_at, attempts=job.attempts,
        cancel_requested=job.cancel_requested_at is not None, request=schemas.JobRequest(**job_request(job)),
        error=error, artifact=artifact, **job_fields(job, evaluation),
    )


def estimate_for(store: JobStore, request: dict[str, Any]) -> dict[str, Any] | None:
    """The duration estimate recorded with a new job; a job is never refused for want of one."""
    from distill.methods.registry import get_method
    from workers.estimates import estimate

    try:
        defaults = get_method(request["method"]).Params().model_dump(mode="json")
        return estimate(store, request["method"], request["dataset"], request.get("max_per_class"),
                        request.get("params") or {}, defaults)
    except Exception:
        return None


def find_job(store: JobStore, job_id: str, owner: str) -> Job:
    """The caller's job, or 404 (another owner's job is not found either)."""
    try:
        return store.get_job(job_id, owner)
    except JobNotFound:
        raise HTTPException(404, f"no job {job_id}") from None


ARTIFACT_RESPONSES: Responses = {
    **UNAUTHORIZED, **NOT_FOUND,
    409: {"model": schemas.Problem, "description": "the job has not succeeded (yet)"},
    410: {"model": schemas.Problem, "description": "the archive was removed from storage"},
}


def finished_archive(job_id: JobId, owner: OwnerDep, store: StoreDep, settings: WorkerSettingsDep) -> tuple[Job, Path]:
    """Dependency of the download routes: the caller's succeeded job and its archive on disk (409/410 otherwise)."""
    job = find_job(store, job_id, owner)
    if job.status != "succeeded":
        raise HTTPException(409, f"job is {job.status}: no archive")
    if not job.artifact_path:
        raise HTTPException(410, "the archive was removed (retention policy)")
    path = settings.artifact_path(job.artifact_path)
    if not path.is_file():
        raise HTTPException(410, "the archive is no longer in storage")
    return job, path


ArchiveDep = Annotated[tuple[Job, Path], Depends(finished_archive)]
