"""Errors as RFC 9457 problem details (``application/problem+json``), everywhere in the API.

Every error response has ``type``, ``title``, ``status``, ``detail`` and ``errors`` (one entry per rejected
field, with FastAPI's ``loc``/``msg``/``type`` plus a JSON pointer into the body), whichever layer produced
it: a route's HTTPException, request validation, a user error from the core (DistillError), an unknown
route, a too-large body. :func:`document_problems` makes the OpenAPI schema say so.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Iterator, Sequence
from http import HTTPStatus
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.openapi.utils import get_openapi
from fastapi.responses import JSONResponse
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException

from distill.api_types import PROBLEM_CONTENT_TYPE, FieldError, Problem, field_pointer
from distill.errors import DistillError

PROBLEM_TYPES = "https://distillery.invalid/problems/"  # a stable URI namespace; not meant to be dereferenced


class ProblemResponse(JSONResponse):
    media_type = PROBLEM_CONTENT_TYPE


def title_of(status: int) -> str:
    try:
        return HTTPStatus(status).phrase
    except ValueError:
        return "Error"


def problem_response(status: int, detail: str | None = None, *, errors: Sequence[FieldError] = (),
                     kind: str | None = None, instance: str | None = None,
                     headers: dict[str, str] | None = None) -> ProblemResponse:
    problem = Problem(type=PROBLEM_TYPES + kind if kind else "about:blank", title=title_of(status), status=status,
                      detail=detail, instance=instance, errors=list(errors))
    return ProblemResponse(problem.model_dump(mode="json", exclude_none=True), status_code=status, headers=headers)


def field_errors(raw: Iterable[dict[str, Any]]) -> list[FieldError]:
    """FastAPI/pydantic error dicts (and the core's, which use the same keys) as FieldError entries."""
    out = []
    for error in raw:
        loc = [part if isinstance(part, int) else str(part) for part in error.get("loc", ())]
        out.append(FieldError(loc=loc, msg=str(error.get("msg", "invalid value")), type=str(error.get("type", "value_error")),
                              pointer=field_pointer(loc)))
    return out


def _summary(errors: list[FieldError]) -> str:
    def where(e: FieldError) -> str:
        loc = [str(p) for p in e.loc]
        return ".".join(loc[1:] if loc and loc[0] == "body" else loc) or "request"

    if len(errors) == 1:
        return f"{where(errors[0])}: {errors[0].msg}"
    return f"{len(errors)} fields were rejected: " + "; ".join(f"{where(e)}: {e.msg}" for e in errors[:5])


def install_problem_handlers(app: FastAPI, allowed_methods: Any = None, more_errors: Any = None) -> None:
    """Exception handlers that answer problem+json. ``allowed_methods(path) -> set[str]`` fills 405's Allow;
    ``more_errors(request, exc) -> list`` adds what a deeper layer finds in a request FastAPI already rejected
    (run in a thread: it may read the dataset's index), so one response lists every problem."""

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException) -> ProblemResponse:
        headers = dict(exc.headers or {})
        if exc.status_code == 405 and allowed_methods is not None:
            # Starlette names only the first route's methods; GET and POST /jobs are two routes.
            allowed = allowed_methods(request.url.path)
            if allowed:
                headers["Allow"] = ", ".join(sorted(allowed))
        detail = exc.detail if isinstance(exc.detail, str) else None
        errors = field_errors(exc.detail) if isinstance(exc.detail, list) else ()
        if exc.status_code == 404 and detail == "Not Found":
            detail = f"no route {request.method} {request.url.path}"
        return problem_response(exc.status_code, detail, errors=errors, instance=request.url.path, headers=headers or None)

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, exc: RequestValidationError) -> ProblemResponse:
        raw = list(exc.errors())
        if more_errors is not None:
            raw += await run_in_threadpool(more_errors, request, exc)
        errors = field_errors(raw)
        return problem_response(422, _summary(errors) if errors else "the request was rejected", errors=errors,
                                kind="invalid-request", instance=request.url.path)

    @app.exception_handler(DistillError)
    async def distill_error(request: Request, exc: DistillError) -> ProblemResponse:
        return problem_response(422, str(exc), kind=exc.code.replace("_", "-"), instance=request.url.path)


def allowed_methods_for(app: FastAPI) -> Any:
    """Path -> every method some route of ``app`` accepts on it (for 405's Allow header)."""
    from fastapi.routing import APIRoute

    def routes(items: list[Any]) -> Iterator[APIRoute]:
        for route in items:
            if isinstance(route, APIRoute):
                yield route
            elif hasattr(route, "original_router"):  # FastAPI >= 0.16x keeps included routers as one entry
                yield from routes(route.original_router.routes)

    def allowed(path: str) -> set[str]:
        methods: set[str] = set()
        for route in routes(app.router.routes):
            if route.path_regex.match(path):
                methods |= set(route.methods or ())
        return methods

    return allowed


_REF = re.compile(r"#/components/schemas/(HTTPValidationError|Problem)$")


def document_problems(app: FastAPI) -> None:
    """OpenAPI: every 4xx/5xx response is a Problem served as application/problem+json (422s included)."""

    def openapi() -> dict[str, Any]:
        if app.openapi_schema:
            return app.openapi_schema
        schema = get_openapi(title=app.title, version=app.version, summary=app.summary, description=app.description,
                             routes=app.routes)
        components = schema.setdefault("components", {}).setdefault("schemas", {})
        components["Problem"] = Problem.model_json_schema(ref_template="#/components/schemas/{model}")
        for name, sub in components["Problem"].pop("$defs", {}).items():
            components.setdefault(name, sub)
        ref = {"$ref": "#/components/schemas/Problem"}
        for path_item in schema.get("paths", {}).values():
            for operation in path_item.values():
                if not isinstance(operation, dict):
                    continue
                for code, response in operation.get("responses", {}).items():
                    if code[:1] not in ("4", "5"):
                        continue
                    content = response.get("content") or {}
                    body = content.get("application/json", {}).get("schema", {})
                    if not content or _REF.search(str(body.get("$ref", ""))) or code == "422":
                        response["content"] = {PROBLEM_CONTENT_TYPE: {"schema": ref}}
                        if code == "422":
                            response["description"] = "the request was rejected; `errors` names each field"
        for unused in ("HTTPValidationError", "ValidationError"):
            if unused in components and unused not in str(schema.get("paths")):
                components.pop(unused)
        app.openapi_schema = schema
        return schema

    app.openapi = openapi  # type: ignore[method-assign]
