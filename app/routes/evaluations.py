"""/jobs/{id}/evaluations and /jobs/{id}/rerun: what a user does with a finished job.

An evaluation is a job of its own (``kind: evaluate``, ``parent_id`` the evaluated job) that a worker runs with
`distill eval`'s protocol and its random-subset control, so it has progress, cancel and a place in the list;
its accuracy, control and gain then show on both jobs (``evaluation``). A rerun queues the same request again.
"""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, HTTPException, Response
from pydantic import BaseModel, ConfigDict, Field, StrictInt

from app import schemas
from app.deps import OwnerDep, SettingsDep, StoreDep
from app.routes.common import NOT_FOUND, UNAUTHORIZED, JobId, Responses, estimate_for, find_job, to_schema
from app.validation import checked_job_request
from workers.jobs import JobStore, job_request

router = APIRouter(tags=["jobs"])
BODY: Responses = {400: {"model": schemas.Problem, "description": "body is not UTF-8 JSON"},
                   413: {"model": schemas.Problem, "description": "request body too large"}}


class EvaluationCreate(BaseModel):
    """The evaluation's budget; the protocol is `distill eval`'s (students per run, test split, control)."""

    model_config = ConfigDict(extra="forbid", strict=True)

    runs: StrictInt | None = Field(None, ge=1, le=20, description="students trained (default 5, as distill eval)")
    epochs: StrictInt | None = Field(None, ge=1, le=2000, description="epochs per student (default: the protocol's)")
    test_limit: StrictInt | None = Field(None, ge=100, le=1_000_000,
                                         description="evaluate on a seeded stratified subset of the test split")


class Rerun(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)

    name: schemas.JobName | None = Field(None, description="the new job's name (default: the original's)")


@router.post(
    "/jobs/{job_id}/evaluations", status_code=202, response_model=schemas.Job,
    responses={**UNAUTHORIZED, **NOT_FOUND, **BODY,
               409: {"model": schemas.Problem, "description": "the job has no archive"}},
    summary="Evaluate a succeeded job's archive (accuracy, random-subset control, gain) as a job of its own",
)
def create_evaluation(job_id: JobId, body: EvaluationCreate, response: Response, owner: OwnerDep,
                      store: StoreDep) -> schemas.Job:
    parent = find_job(store, job_id, owner)
    if parent.kind != "distill":
        raise HTTPException(409, "an evaluation cannot be evaluated; evaluate the job it belongs to")
    if parent.status != "succeeded" or not parent.artifact_path:
        raise HTTPException(409, f"job is {parent.status}: no archive to evaluate")
    params = body.model_dump(exclude_none=True)
    request = {**job_request(parent), "params": params}
    job, _ = store.create_job(owner, request, name=parent.name, kind="evaluate", parent_id=parent.id,
                              estimate=evaluation_estimate(store, parent.dataset, parent.ipc, params))
    response.headers["Location"] = f"/jobs/{job.id}"
    return to_schema(job)


def evaluation_estimate(store: JobStore, dataset: str, ipc: int, params: dict[str, int]) -> dict[str, Any] | None:
    """The evaluation's duration on this host, from the budget `distill eval` would use (a guess never refuses)."""
    from distill.data.registry import DATASETS
    from workers.estimates import estimate_evaluation
    from workers.execution import evaluation_config

    try:
        config = evaluation_config(params, "cpu")
        classes = DATASETS[dataset].num_classes if dataset in DATASETS else 10
        return estimate_evaluation(store, dataset, ipc * classes, config.runs, config.resolved_epochs())
    except Exception:
        return None


@router.post(
    "/jobs/{job_id}/rerun", status_code=202, response_model=schemas.Job,
    responses={**UNAUTHORIZED, **NOT_FOUND, **BODY,
               409: {"model": schemas.Problem, "description": "not a distillation job"}},
    summary="Queue a new job with the same request (checked again: this server may have changed)",
)
def rerun(job_id: JobId, response: Response, owner: OwnerDep, store: StoreDep, settings: SettingsDep,
          body: Rerun | None = None) -> schemas.Job:
    original = find_job(store, job_id, owner)
    if original.kind != "distill":
        raise HTTPException(409, "rerun the evaluated job, or evaluate it again")
    name = body.name if body is not None and body.name is not None else original.name
    create = schemas.JobCreate.model_validate({**job_request(original), "name": name})
    request = checked_job_request(create, settings)
    job, _ = store.create_job(owner, request, name=name, estimate=estimate_for(store, request))
    response.headers["Location"] = f"/jobs/{job.id}"
    return to_schema(job)
