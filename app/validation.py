"""The API's side of request validation: a thin adapter over the core's :func:`distill.runner.check_request`.

The core lists its problems (``loc``/``msg``/``type``); here they become FastAPI's own 422 field errors
(``loc`` under ``body``), so a client sees one format whichever layer rejected the request.
"""

from __future__ import annotations

from typing import Any

from fastapi.exceptions import RequestValidationError

from app import schemas
from app.settings import ApiSettings
from distill.errors import InvalidRequest
from distill.runner import RunRequest, check_request


def body_errors(exc: InvalidRequest) -> list[dict[str, Any]]:
    return [{"loc": ["body", *p["loc"]], "msg": p["msg"], "type": p["type"]} for p in exc.problems]


def checked_job_request(body: schemas.JobCreate, settings: ApiSettings) -> dict[str, Any]:
    """The request as the job store records it (method parameters normalised), or a 422."""
    request = RunRequest(dataset=body.dataset, method=body.method, ipc=body.ipc, params=body.params,
                         seed=body.seed, max_per_class=body.max_per_class, paths=False)
    try:
        _method, params = check_request(request, max_ipc=settings.max_ipc, max_iterations=settings.max_iterations)
    except InvalidRequest as exc:
        raise RequestValidationError(body_errors(exc)) from None
    return {**body.model_dump(), "params": params.model_dump(mode="json", exclude_unset=True)}
