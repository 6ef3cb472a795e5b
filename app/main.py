"""The FastAPI application: ``create_app(settings)`` wires the job store, metrics, limits and routes.

Run it with ``distill serve`` (API + local workers) or ``distill api`` (API only), see :mod:`app.cli`.
"""

from __future__ import annotations

import errno
import logging
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI, HTTPException, Request
from sqlalchemy.exc import SQLAlchemyError
from starlette.concurrency import run_in_threadpool
from starlette.datastructures import Headers
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from app.metrics import ApiMetrics
from app.problems import (
    ProblemResponse,
    allowed_methods_for,
    document_problems,
    install_problem_handlers,
    problem_response,
)
from app.routes import evaluations, jobs, meta, results, stream
from app.settings import ApiSettings, get_api_settings
from app.validation import other_problems
from app.web import mount_web
from distill import __version__
from distill.api_types import PROBLEM_CONTENT_TYPE
from distill.methods.registry import available_methods
from workers.jobs import JobStore
from workers.logs import job_id_var
from workers.settings import WorkerSettings, get_worker_settings

log = logging.getLogger("distill.api")


class BodySizeLimit:
    """Reject bodies over ``max_bytes`` with 413, whether or not the client sent Content-Length."""

    def __init__(self, app: ASGIApp, max_bytes: int):
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = dict(scope["headers"]).get(b"content-length")
        if declared is not None and (not declared.isdigit() or int(declared) > self.max_bytes):
            await self._reject(scope, receive, send)
            return
        received = 0
        started = False

        async def limited_receive() -> Message:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_bytes:
                    raise HTTPException(413, f"request body larger than {self.max_bytes} bytes")
            return message

        async def tracking_send(message: Message) -> None:
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, limited_receive, tracking_send)
        except HTTPException as exc:
            if exc.status_code != 413 or started:
                raise
            await self._reject(scope, receive, send)

    async def _reject(self, scope: Scope, receive: Receive, send: Send) -> None:
        response = problem_response(413, f"request body larger than {self.max_bytes} bytes")
        await response(scope, receive, send)


class ProblemBodies:
    """Error responses that bypass the exception handlers (a file response's malformed ``Range`` 400 and its
    416) become problem+json too, keeping their status and headers (416's Content-Range)."""

    def __init__(self, app: ASGIApp):
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        held: Message | None = None
        body = b""

        async def rewriting_send(message: Message) -> None:
            nonlocal held, body
            if message["type"] == "http.response.start":
                kind = dict(message.get("headers", [])).get(b"content-type", b"")
                if message["status"] >= 400 and not kind.startswith((b"application/problem+json", b"application/json")):
                    held = message
                    return
            elif held is not None and message["type"] == "http.response.body":
                body += message.get("body", b"")
                if message.get("more_body"):
                    return
                status = held["status"]
                detail = body.decode(errors="replace").strip() or None
                if status == 416:
                    detail = "the requested range is outside the archive (Content-Range gives its size)"
                keep = {k: v for k, v in Headers(raw=held.get("headers", [])).items()
                        if k.lower() not in ("content-type", "content-length")}
                response = problem_response(status, detail, headers=keep, instance=scope.get("path"))
                if scope.get("method") == "HEAD":
                    response.body = b""
                await response(scope, receive, send)
                return
            await send(message)

        await self.app(scope, receive, rewriting_send)


class SecurityHeaders:
    """``X-Content-Type-Options: nosniff`` on every response; a Content-Security-Policy on every page: the job
    page loads only its own script, style and API (images from blob: and data: URLs it creates itself); /docs
    (Swagger UI's inline start-up script) gets the same with inline scripts allowed."""

    PAGE = ("default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' blob: data:; "
            "connect-src 'self'; object-src 'none'; base-uri 'none'; frame-ancestors 'none'; form-action 'self'")
    DOCS = PAGE.replace("script-src 'self'", "script-src 'self' 'unsafe-inline'").replace(
        "style-src 'self'", "style-src 'self' 'unsafe-inline'")

    def __init__(self, app: ASGIApp):
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        policy = (self.DOCS if scope.get("path") == "/docs" else self.PAGE).encode()

        async def headed_send(message: Message) -> None:
            if message["type"] == "http.response.start":
                headers = list(message.get("headers", []))
                headers.append((b"x-content-type-options", b"nosniff"))
                if dict(headers).get(b"content-type", b"").startswith(b"text/html"):
                    headers.append((b"content-security-policy", policy))
                message = {**message, "headers": headers}
            await send(message)

        await self.app(scope, receive, headed_send)


class StorageGuard:
    """``POST /jobs`` while DISTILL_HOME is low on space or unwritable: 503 at once (what /healthz reports),
    rather than a job that is accepted and then fails deep inside. Deleting and reading stay possible."""

    def __init__(self, app: ASGIApp, settings: WorkerSettings):
        self.app = app
        self.settings = settings

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope.get("method") == "POST" and scope.get("path") == "/jobs":
            state = await run_in_threadpool(self.settings.storage_state)
            if state != "ok":
                reason = ("the server is low on storage space; retry later" if state == "low_space"
                          else "the server's storage is not writable; retry later")
                response = problem_response(503, reason, kind="storage-unavailable", instance="/jobs",
                                            headers={"Retry-After": "30"})
                await response(scope, receive, send)
                return
        await self.app(scope, receive, send)


class Observe:
    """Request metrics by route template, and the job id (from /jobs/{id}/...) on every log line."""

    def __init__(self, app: ASGIApp, metrics: ApiMetrics):
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        parts = scope.get("path", "").split("/")
        token = job_id_var.set(parts[2] if len(parts) > 2 and parts[1] == "jobs" else None)
        start = time.perf_counter()
        status = 500

        async def observed_send(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, observed_send)
        finally:
            template = getattr(scope.get("route"), "path", "unmatched")
            method = scope.get("method", "")
            self.metrics.requests.labels(method, template, str(status)).inc()
            self.metrics.latency.labels(method, template).observe(time.perf_counter() - start)
            job_id_var.reset(token)


def problem_protocol() -> type:
    """uvicorn's h11 protocol answering a request it cannot parse (oversized or malformed headers, a bad request
    line) with problem+json instead of ``text/plain``: ``uvicorn.run(app, http=problem_protocol())``."""
    import h11
    from uvicorn.protocols.http.h11_impl import H11Protocol

    class ProblemH11Protocol(H11Protocol):
        def send_400_response(self, msg: str) -> None:
            body = bytes(problem_response(400, f"{msg} (request line or headers malformed or too large)").body)
            headers = [(b"content-type", PROBLEM_CONTENT_TYPE.encode()), (b"content-length", str(len(body)).encode()),
                       (b"x-content-type-options", b"nosniff"), (b"connection", b"close")]
            for event in (h11.Response(status_code=400, headers=headers, reason=b"Bad Request"), h11.Data(data=body),
                          h11.EndOfMessage()):
                self.transport.write(self.conn.send(event))
            self.transport.close()

    return ProblemH11Protocol


def _without_auth_in_schema(app: FastAPI) -> None:
    """No API keys configured (loopback only): the OpenAPI schema must not declare Bearer auth on any route.
    The schema is generated here, once every route is in, and kept (FastAPI serves ``app.openapi_schema``)."""
    schema: dict[str, Any] = app.openapi()
    for operations in schema.get("paths", {}).values():
        for operation in operations.values():
            operation.pop("security", None)
    schema.get("components", {}).pop("securitySchemes", None)


NO_SPACE = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)


def storage_reason(exc: BaseException) -> str | None:
    """What a client is told about a storage failure (no paths), or None when it is not one."""
    cause = getattr(exc, "orig", None) or exc
    text = str(cause).lower()
    if (isinstance(cause, OSError) and cause.errno in NO_SPACE) or "disk is full" in text or "no space" in text:
        return "the server is out of storage space; retry later"
    if isinstance(cause, OSError) and cause.errno == errno.EROFS:
        return "the server's storage is read-only; retry later"
    if isinstance(exc, SQLAlchemyError) and ("disk i/o" in text or "readonly" in text):
        return "the job store cannot write; retry later"
    return None


def unavailable(reason: str, request: Request) -> ProblemResponse:
    return problem_response(503, reason, kind="storage-unavailable", instance=request.url.path,
                            headers={"Retry-After": "30"})


def create_app(
    settings: ApiSettings | None = None,
    worker_settings: WorkerSettings | None = None,
    store: JobStore | None = None,
) -> FastAPI:
    """The API over the job store of ``worker_settings`` (created and migrated unless ``store`` is given).

    Every registered method is imported first: a method whose code cannot be imported stops the start with
    an error naming what is missing (:class:`distill.errors.MethodUnavailable`), instead of a shorter list.
    """
    settings = settings or get_api_settings()
    worker_settings = worker_settings or get_worker_settings()
    available_methods()
    store = store or JobStore.from_settings(worker_settings)  # migrates the schema
    metrics = ApiMetrics(store)

    @asynccontextmanager
    async def lifespan(_app: FastAPI) -> AsyncIterator[None]:
        log.info("api started", extra={"database": store.engine.url.render_as_string(hide_password=True),
                                      "auth": "api-keys" if settings.api_keys else "none (loopback only)"})
        yield
        store.engine.dispose()

    app = FastAPI(
        title="distillery",
        version=__version__,
        summary="Dataset distillation as a service: submit a job, poll it, download the distilled set.",
        lifespan=lifespan,
        docs_url=None,  # app.web serves /docs from the package (no CDN)
        redoc_url=None,
    )
    app.state.settings = settings
    app.state.worker_settings = worker_settings
    app.state.store = store
    app.state.metrics = metrics
    app.include_router(jobs.router)
    app.include_router(evaluations.router)
    app.include_router(stream.router)
    app.include_router(results.router)
    app.include_router(meta.router)
    mount_web(app)

    app.add_middleware(ProblemBodies)
    app.add_middleware(StorageGuard, settings=worker_settings)
    app.add_middleware(Observe, metrics=metrics)
    app.add_middleware(BodySizeLimit, max_bytes=settings.max_body_bytes)
    app.add_middleware(SecurityHeaders)

    install_problem_handlers(app, allowed_methods_for(app), more_errors=other_problems)

    @app.exception_handler(SQLAlchemyError)
    async def store_error(request: Request, exc: SQLAlchemyError) -> ProblemResponse:
        """The job store failed (full disk, database down): 503 with a reason, never a bare 500."""
        log.warning("job store error", exc_info=exc)
        return unavailable(storage_reason(exc) or "the job store is unavailable; retry later", request)

    @app.exception_handler(OSError)
    async def os_error(request: Request, exc: OSError) -> ProblemResponse:
        reason = storage_reason(exc)
        if reason is None:
            raise exc
        log.warning("storage error", exc_info=exc)
        return unavailable(reason, request)

    document_problems(app)
    if not settings.api_keys:
        _without_auth_in_schema(app)  # after document_problems: it strips the schema that function builds
    return app
