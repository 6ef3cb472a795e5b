"""The API's side of request validation: a thin adapter over the core's :func:`distill.runner.check_request`.

The core lists its problems (``loc``/``msg``/``type``); here they become FastAPI's own 422 field errors
(``loc`` under ``body``), so a client sees one format whichever layer rejected the request. A request that
FastAPI rejects for its core fields (``ipc: 0``) is also run through the core with those fields set aside
(:func:`other_problems`), so one response names every problem: core fields and method parameters together.
"""

from __future__ import annotations

from typing import Any

from fastapi import Request
from fastapi.exceptions import RequestValidationError

from app import schemas
from app.settings import ApiSettings
from distill.errors import DistillError, InvalidRequest
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


def other_problems(request: Request, exc: RequestValidationError) -> list[dict[str, Any]]:
    """For a ``POST /jobs`` body that FastAPI rejected: what the core finds in the fields FastAPI accepted
    (method parameters, dataset, ipc against the dataset), so the client hears about all of them at once."""
    body = getattr(exc, "body", None)
    if request.method != "POST" or request.url.path != "/jobs" or not isinstance(body, dict):
        return []
    rejected = {e["loc"][1] for e in exc.errors() if len(e.get("loc", ())) > 1 and e["loc"][0] == "body"}

    def field(name: str, kind: type | tuple[type, ...], default: Any) -> Any:
        value = body.get(name, default)
        ok = name not in rejected and isinstance(value, kind) and not isinstance(value, bool)
        return value if ok else default

    core = RunRequest(dataset=field("dataset", str, ""), method=field("method", str, ""), ipc=field("ipc", int, 1),
                      params=field("params", dict, {}), seed=field("seed", int, 0),
                      max_per_class=field("max_per_class", int, None), paths=False)
    settings: ApiSettings = request.app.state.settings
    try:
        check_request(core, max_ipc=settings.max_ipc, max_iterations=settings.max_iterations)
    except InvalidRequest as found:
        return [e for e in body_errors(found) if e["loc"][1] not in rejected and e["loc"][1] in body]
    except DistillError:
        return []
    return []
