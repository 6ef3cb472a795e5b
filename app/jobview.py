"""What a job row means for a person, computed when it is read: overall progress across stages, elapsed time,
ETA, the stage list with the current one marked, and the evaluation result (the job's own or its latest).

The estimate itself is made once at submit (:mod:`workers.estimates`); here it is only compared with what the
worker has reported since (the stage log and the current stage's fraction).
"""

from __future__ import annotations

from typing import Any

from distill.api_types import Estimate, EvaluationResult, JobStatus, Score, StageState
from distill.progress import overall_progress
from workers.execution import PREPARE_STAGE
from workers.models import Job, utcnow


def _plan(job: Job) -> tuple[list[tuple[str, float]], Estimate | None]:
    if not isinstance(job.estimate, dict):
        return [], None
    try:
        estimate = Estimate.model_validate({**job.estimate, "stages": [
            {"name": stage, "seconds": seconds} for stage, seconds in job.estimate.get("stages", [])]})
    except (ValueError, TypeError):
        return [], None
    return [(s.name, s.seconds) for s in estimate.stages], estimate


def _done(job: Job) -> list[tuple[str, float]]:
    out: dict[str, float] = {}
    for item in job.stage_log or []:
        if isinstance(item, list | tuple) and len(item) == 2:
            out[str(item[0])] = out.get(str(item[0]), 0.0) + float(item[1])
    return list(out.items())


def progress_fields(job: Job) -> dict[str, Any]:
    """overall_progress, elapsed_seconds, eta_seconds, stages and estimate of the API's Job."""
    planned, estimate = _plan(job)
    done = _done(job)
    elapsed = None
    if job.started_at is not None:
        elapsed = max(0.0, ((job.finished_at or utcnow()) - job.started_at).total_seconds())
    running = job.status == "running"
    # a running job that has not reported a stage yet is loading its data and models
    current = (job.stage or PREPARE_STAGE) if running else None
    if job.status == "succeeded":
        overall, eta = 1.0, None
    elif job.status == "queued":
        overall, eta = 0.0, (estimate.seconds if estimate is not None else None)
    else:
        overall, eta = overall_progress(planned, done, current, job.progress or 0.0, elapsed if running else None)
        if not planned and current is not None:
            overall = 0.0
        eta = eta if running else None
    stages: list[StageState] = [StageState(name=name, state="done", seconds=round(seconds, 1)) for name, seconds in done
                                if name != current]
    seen = {s.name for s in stages}
    if current is not None and current not in seen:
        stages.append(StageState(name=current, state="running", seconds=dict(planned).get(current)))
        seen.add(current)
    if job.status in ("queued", "running"):
        stages += [StageState(name=name, state="pending", seconds=round(seconds, 1)) for name, seconds in planned
                   if name not in seen]
    return {"overall_progress": round(overall, 4), "elapsed_seconds": None if elapsed is None else round(elapsed, 1),
            "eta_seconds": None if eta is None else round(eta, 1), "stages": stages, "estimate": estimate}


def _score(value: Any) -> Score | None:
    return Score.model_validate(value) if isinstance(value, dict) else None


def evaluation_of(evaluation: Job | None) -> EvaluationResult | None:
    """An evaluation job as the result shown beside the job it evaluated."""
    if evaluation is None:
        return None
    result = evaluation.result if isinstance(evaluation.result, dict) else {}
    status: JobStatus = evaluation.status  # type: ignore[assignment]
    return EvaluationResult(job_id=evaluation.id, status=status, accuracy=_score(result.get("accuracy")),
                            control=_score(result.get("control")), gain=result.get("gain"),
                            protocol=result.get("protocol") or {})


def job_fields(job: Job, evaluation: Job | None = None) -> dict[str, Any]:
    """Every field of the API's Job that is not a plain column copy."""
    own = job if job.kind == "evaluate" else evaluation
    return {"name": job.name, "kind": job.kind or "distill", "parent_id": job.parent_id,
            "evaluation": evaluation_of(own), **progress_fields(job)}
