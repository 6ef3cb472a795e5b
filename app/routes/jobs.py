"""/jobs: submit, inspect, list, cancel, follow events, download the archive and its preview."""

from __future__ import annotations

import base64
from pathlib import Path
from typing import Annotated

from fastapi import APIRouter, Header, HTTPException, Query, Request, Response
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse

from app import schemas
from app.deps import MetricsDep, OwnerDep, SettingsDep, StoreDep, WorkerSettingsDep
from app.routes import stream
from app.routes.common import (
    ARTIFACT_RESPONSES,
    NOT_FOUND,
    UNAUTHORIZED,
    ArchiveDep,
    JobId,
    estimate_for,
    find_job,
    to_schema,
)
from app.validation import checked_job_request
from distill.files import atomic_write_bytes
from workers.janitor import delete_finished_job, discard_job_files
from workers.jobs import IdempotencyConflict, InvalidState, JobNotFound

router = APIRouter(tags=["jobs"])

@router.post(
    "/jobs", status_code=202, response_model=schemas.Job,
    responses={**UNAUTHORIZED, 400: {"model": schemas.Problem, "description": "body is not UTF-8 JSON"},
               409: {"model": schemas.Problem, "description": "the Idempotency-Key was used with another body"},
               413: {"model": schemas.Problem, "description": "request body too large"},
               503: {"model": schemas.Problem, "description": "the job store cannot take the job now (e.g. disk full)"}},
    summary="Submit a distillation job",
)
def create_job(
    body: schemas.JobCreate,
    response: Response,
    owner: OwnerDep,
    store: StoreDep,
    settings: SettingsDep,
    metrics: MetricsDep,
    idempotency_key: Annotated[str | None, Header(
        alias="Idempotency-Key", min_length=1, max_length=255,
        description="retry-safe submission: same key and body -> same job")] = None,
) -> schemas.Job:
    request = checked_job_request(body, settings)
    try:
        job, replayed = store.create_job(owner, request, idempotency_key, name=body.name,
                                         estimate=estimate_for(store, request))
    except IdempotencyConflict as exc:
        raise HTTPException(409, str(exc)) from None
    if not replayed:
        metrics.submitted.labels(job.method).inc()
    response.headers["Location"] = f"/jobs/{job.id}"
    if replayed:
        response.headers["Idempotent-Replayed"] = "true"
    return to_schema(job)


@router.get("/jobs", response_model=schemas.JobList, responses=UNAUTHORIZED, summary="List jobs, newest first")
def list_jobs(
    owner: OwnerDep,
    store: StoreDep,
    status: Annotated[schemas.JobStatus | None, Query(description="only jobs in this status")] = None,
    limit: Annotated[int, Query(ge=1, le=100)] = 20,
    after: Annotated[str | None, Query(min_length=1, max_length=40,
                                       description="id of the last job of the previous page")] = None,
) -> schemas.JobList:
    try:
        jobs, has_more = store.list_jobs(owner, status=status, limit=limit, after=after)
    except JobNotFound:
        raise RequestValidationError([{"loc": ["query", "after"], "msg": f"no job {after}",
                                       "type": "value_error.unknown_cursor"}]) from None
    evaluations = store.latest_evaluations([j.id for j in jobs])
    return schemas.JobList(data=[to_schema(j, evaluations.get(j.id)) for j in jobs], has_more=has_more)


@router.get("/jobs/{job_id}", response_model=schemas.Job, responses={**UNAUTHORIZED, **NOT_FOUND})
def get_job(job_id: JobId, owner: OwnerDep, store: StoreDep) -> schemas.Job:
    job = find_job(store, job_id, owner)
    return to_schema(job, store.latest_evaluations([job.id]).get(job.id))


@router.post(
    "/jobs/{job_id}/cancel", response_model=schemas.Job,
    responses={**UNAUTHORIZED, **NOT_FOUND, 409: {"model": schemas.Problem, "description": "job already finished"}},
    summary="Cancel a queued or running job (a running job stops at its next check)",
)
def cancel_job(job_id: JobId, owner: OwnerDep, store: StoreDep) -> schemas.Job:
    try:
        return to_schema(store.cancel_job(job_id, owner))
    except JobNotFound:
        raise HTTPException(404, f"no job {job_id}") from None
    except InvalidState as exc:
        raise HTTPException(409, str(exc)) from None


@router.delete(
    "/jobs/{job_id}", status_code=204, response_class=Response,
    responses={**UNAUTHORIZED, **NOT_FOUND, 409: {"model": schemas.Problem, "description": "job not finished"}},
    summary="Delete a finished job, its events and its archive",
)
def delete_job(job_id: JobId, owner: OwnerDep, store: StoreDep, settings: WorkerSettingsDep) -> Response:
    try:
        job = delete_finished_job(store, settings, job_id, owner)  # files first: frees a full disk
    except JobNotFound:
        raise HTTPException(404, f"no job {job_id}") from None
    except InvalidState as exc:
        raise HTTPException(409, str(exc)) from None
    discard_job_files(settings, job.id, job.artifact_path)
    return Response(status_code=204)


@router.get("/jobs/{job_id}/events", response_model=schemas.JobEventList, responses={**UNAUTHORIZED, **NOT_FOUND},
            summary="A job's events (with Accept: text/event-stream, the live stream of GET /jobs/{id}/stream)")
def list_events(
    job_id: JobId,
    owner: OwnerDep,
    store: StoreDep,
    request: Request,
    after: Annotated[int | None, Query(ge=0, le=2**62, description="id of the last event already seen")] = None,
    limit: Annotated[int, Query(ge=1, le=1000)] = 100,
) -> schemas.JobEventList | Response:
    if stream.wants_stream(request):
        return stream.stream_response(store, job_id, owner, stream.resume_point(request.headers.get("last-event-id"),
                                                                                after), request)
    try:
        events, has_more = store.list_events(job_id, owner, after=after, limit=limit)
    except JobNotFound:
        raise HTTPException(404, f"no job {job_id}") from None
    return schemas.JobEventList(
        data=[schemas.JobEvent.model_validate(e, from_attributes=True) for e in events],
        has_more=has_more,
    )


@router.get(
    "/jobs/{job_id}/artifact", response_class=FileResponse, responses={
        200: {"content": {"application/x-tar": {}}, "description": "the archive (Range requests supported)"},
        206: {"content": {"application/x-tar": {}}, "description": "part of the archive"},
        304: {"description": "not modified: If-None-Match named the archive's ETag"},
        416: {"description": "range not satisfiable"},
        **ARTIFACT_RESPONSES,
    },
    summary="Download the distilled-set archive",
)
def download_artifact(
    found: ArchiveDep,
    if_none_match: Annotated[str | None, Header(max_length=4096, description="ETags already held: 304 if one matches")] = None,
) -> Response:
    job, path = found
    sha = job.artifact_sha256 or ""
    etag = f'"{sha}"'
    cache = {"ETag": etag, "Cache-Control": "private, max-age=3600"}
    if if_none_match is not None and _etag_matches(if_none_match, etag):
        return Response(status_code=304, headers=cache)
    digest = base64.b64encode(bytes.fromhex(sha)).decode()
    filename = f"{job.dataset}-{job.method}-ipc{job.ipc}-{job.id}.tar"
    return FileResponse(path, media_type="application/x-tar", filename=filename,
                        headers={"Repr-Digest": f"sha-256=:{digest}:", "X-Checksum-Sha256": sha, **cache})


@router.head("/jobs/{job_id}/artifact", response_class=Response, responses={
    200: {"description": "the archive's headers: Content-Length, ETag, Repr-Digest, Accept-Ranges"},
    **ARTIFACT_RESPONSES}, summary="The archive's size and digest, without its bytes")
def artifact_headers(
    found: ArchiveDep,
    if_none_match: Annotated[str | None, Header(max_length=4096, description="ETags already held: 304 if one matches")] = None,
) -> Response:
    return download_artifact(found, if_none_match)  # a file response sends only its headers to HEAD


def _etag_matches(header: str, etag: str) -> bool:
    """If-None-Match (RFC 9110 13.1.2): ``*`` or a list of (possibly weak) entity tags, compared weakly."""
    tags = [t.strip().removeprefix("W/") for t in header.split(",")]
    return "*" in tags or etag in tags


@router.get(
    "/jobs/{job_id}/preview.png", response_class=Response,
    responses={200: {"content": {"image/png": {}}, "description": "one row per class"}, **ARTIFACT_RESPONSES},
    summary="A PNG grid of the distilled images, one row per class",
)
def preview(found: ArchiveDep) -> Response:
    job, path = found
    cached = path.with_name(f"{job.id}.preview.png")
    if not cached.exists():
        atomic_write_bytes(cached, render_preview(path))
    return Response(cached.read_bytes(), media_type="image/png", headers={"Cache-Control": "private, max-age=3600"})


def render_preview(archive: Path) -> bytes:
    from distill.archive import preview_png, preview_sample

    # only the PNGs shown are read, never the whole archive (which can be gigabytes)
    return preview_png(preview_sample(archive))
