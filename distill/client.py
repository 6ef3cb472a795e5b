"""A Python client for the job service: submit, follow, wait for and download distillation jobs.

    from distill.client import Client

    with Client("http://127.0.0.1:8000", api_key=None) as client:
        job = client.submit("random", "mnist", ipc=10, max_per_class=50)
        try:
            job = client.wait(job, timeout=600, on_progress=lambda j: print(j.stage, j.overall_progress))
        except JobFailed as exc:                     # failed or cancelled: exc.reason says why
            raise SystemExit(f"no archive: {exc.reason}")
        client.download(job, "mnist-random-10.tar")   # resumable, sha256-verified, atomic

Results are the API's own models (:mod:`distill.api_types`). Every error response becomes an
:class:`ApiError` carrying the server's RFC 9457 problem details (status, title, detail, field errors).
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx

from distill import __version__
from distill.api_types import (
    DatasetInfo,
    FieldError,
    Job,
    JobEvent,
    JobEventList,
    JobList,
    MethodInfo,
    Problem,
    field_pointer,
)

JobRef = Job | str
DEFAULT_SERVER = "http://127.0.0.1:8000"


class ClientError(Exception):
    """Anything the client could not do: the server said no, could not be reached, or sent a bad file."""


class ServerUnreachable(ClientError):
    pass


class ChecksumMismatch(ClientError):
    pass


class WaitTimeout(ClientError, TimeoutError):
    def __init__(self, job: Job, timeout: float):
        super().__init__(f"job {job.id} still {job.status} after {timeout:g}s")
        self.job = job


class JobFailed(ClientError):
    """The job ended without an archive (failed or cancelled): ``job`` is its final state, ``reason`` why."""

    def __init__(self, job: Job):
        self.job = job
        self.status = job.status
        self.reason = f"{job.error.code}: {job.error.message}" if job.error is not None else job.status
        super().__init__(f"job {job.id} {job.status}: {self.reason}")


class ApiError(ClientError):
    """An error response from the server, with its problem details."""

    def __init__(self, problem: Problem, method: str = "", url: str = ""):
        self.problem = problem
        self.method, self.url = method, url
        super().__init__(self.summary)

    @property
    def status(self) -> int:
        return self.problem.status

    @property
    def title(self) -> str:
        return self.problem.title

    @property
    def detail(self) -> str | None:
        return self.problem.detail

    @property
    def errors(self) -> list[FieldError]:
        return self.problem.errors

    @property
    def type(self) -> str:
        return self.problem.type

    @property
    def summary(self) -> str:
        text = f"{self.problem.status} {self.problem.title}"
        if self.problem.detail:
            text += f": {self.problem.detail}"
        return text

    def lines(self) -> list[str]:
        """One line per problem, for a person: each field error, or the summary when there are none."""
        if not self.errors:
            return [self.summary]
        return [f"{field_label(error)}: {error.msg}" for error in self.errors]


class Unauthorized(ApiError):
    """401/403: no API key, or a wrong one."""


class NotFound(ApiError):
    """404: no such job (for this API key), or no such route."""


class InvalidRequest(ApiError):
    """400/422: the request was rejected; ``errors`` names the fields."""


class Conflict(ApiError):
    """409: the job is not in a state that allows this (e.g. download before it succeeded)."""


def field_label(error: FieldError) -> str:
    """``["body", "params", "lr"]`` -> ``params.lr``; query/header inputs keep their location."""
    loc = [str(part) for part in error.loc]
    if loc and loc[0] == "body":
        loc = loc[1:]
    return ".".join(loc) or "request"


def problem_from_response(response: httpx.Response) -> Problem:
    """The server's problem details; older shapes (FastAPI's ``{"detail": ...}``) are converted."""
    try:
        body = response.json()
    except (json.JSONDecodeError, UnicodeDecodeError):
        body = None
    title = response.reason_phrase or "error"
    if isinstance(body, dict) and "status" in body and "title" in body:
        try:
            return Problem.model_validate(body)
        except ValueError:
            pass
    if isinstance(body, dict) and "detail" in body:
        detail = body["detail"]
        if isinstance(detail, list):
            errors = [FieldError(loc=list(item.get("loc", [])), msg=str(item.get("msg", "")),
                                 type=str(item.get("type", "")), pointer=field_pointer(list(item.get("loc", []))))
                      for item in detail if isinstance(item, dict)]
            return Problem(title=title, status=response.status_code, detail="the request was rejected", errors=errors)
        return Problem(title=title, status=response.status_code, detail=str(detail))
    text = response.text.strip()[:500] if body is None else json.dumps(body)[:500]
    return Problem(title=title, status=response.status_code, detail=text or None)


def _error_class(status: int) -> type[ApiError]:
    if status in (401, 403):
        return Unauthorized
    if status == 404:
        return NotFound
    if status == 409:
        return Conflict
    if status in (400, 422):
        return InvalidRequest
    return ApiError


def server_url(value: str) -> str:
    """``host:port`` (no scheme) means ``http://host:port``: what people type after seeing the server's banner."""
    value = value.strip().rstrip("/")
    return value if "://" in value else f"http://{value}"


def _job_id(job: JobRef) -> str:
    return job.id if isinstance(job, Job) else str(job)


class Client:
    """One server, one API key. Thread-compatible like ``httpx.Client`` (one per thread is safest)."""

    def __init__(self, url: str | None = None, api_key: str | None = None, *, timeout: float = 30.0,
                 transport: httpx.BaseTransport | None = None):
        self.url = server_url(url or os.environ.get("DISTILL_SERVER") or DEFAULT_SERVER)
        if api_key is None:
            api_key = os.environ.get("DISTILL_API_KEY") or None
        headers = {"User-Agent": f"distill-client/{__version__}", "Accept": "application/json"}
        if api_key:
            headers["Authorization"] = f"Bearer {api_key}"
        self._http = httpx.Client(base_url=self.url, headers=headers, timeout=timeout, transport=transport)

    # -- plumbing ------------------------------------------------------------------------------------------

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *_exc: object) -> None:
        self.close()

    def _request(self, method: str, path: str, **kwargs: Any) -> httpx.Response:
        try:
            response = self._http.request(method, path, **kwargs)
        except httpx.TransportError as exc:
            raise ServerUnreachable(f"cannot reach {self.url}: {exc}") from exc
        self._check(response, method, path)
        return response

    def _check(self, response: httpx.Response, method: str, path: str) -> None:
        if response.status_code >= 400:
            if not response.is_closed:
                response.read()
            problem = problem_from_response(response)
            raise _error_class(response.status_code)(problem, method, f"{self.url}{path}")

    # -- catalogue -----------------------------------------------------------------------------------------

    def methods(self) -> list[MethodInfo]:
        return [MethodInfo.model_validate(m) for m in self._request("GET", "/methods").json()]

    def datasets(self) -> list[DatasetInfo]:
        return [DatasetInfo.model_validate(d) for d in self._request("GET", "/datasets").json()]

    # -- jobs ----------------------------------------------------------------------------------------------

    def submit(self, method: str, dataset: str, ipc: int, *, params: dict[str, Any] | None = None, seed: int = 0,
               max_per_class: int | None = None, idempotency_key: str | None = None, name: str | None = None) -> Job:
        """Queue a job. With ``idempotency_key`` a retried submission returns the same job, never a second one."""
        body: dict[str, Any] = {"method": method, "dataset": dataset, "ipc": ipc, "params": params or {}, "seed": seed}
        if max_per_class is not None:
            body["max_per_class"] = max_per_class
        if name is not None:
            body["name"] = name
        headers = {"Idempotency-Key": idempotency_key} if idempotency_key else {}
        return Job.model_validate(self._request("POST", "/jobs", json=body, headers=headers).json())

    def get(self, job: JobRef) -> Job:
        return Job.model_validate(self._request("GET", f"/jobs/{_job_id(job)}").json())

    def list(self, status: str | None = None, limit: int | None = None, page_size: int = 100) -> Iterator[Job]:
        """The caller's jobs, newest first, across pages (at most ``limit`` of them)."""
        after: str | None = None
        seen = 0
        while True:
            size = min(page_size, 100, limit - seen) if limit is not None else min(page_size, 100)
            if size <= 0:
                return
            query: dict[str, Any] = {"limit": size}
            if status:
                query["status"] = status
            if after:
                query["after"] = after
            page = JobList.model_validate(self._request("GET", "/jobs", params=query).json())
            yield from page.data
            seen += len(page.data)
            if not page.has_more or not page.data:
                return
            after = page.data[-1].id

    def delete(self, job: JobRef) -> None:
        """Remove a finished job, its events, its evaluations and its archive."""
        self._request("DELETE", f"/jobs/{_job_id(job)}")

    def rerun(self, job: JobRef, *, name: str | None = None) -> Job:
        """Queue a new job with the same request (and name, unless another is given)."""
        return Job.model_validate(self._request("POST", f"/jobs/{_job_id(job)}/rerun",
                                                json={"name": name} if name is not None else {}).json())

    def evaluate(self, job: JobRef, *, runs: int | None = None, epochs: int | None = None,
                 test_limit: int | None = None) -> Job:
        """Queue an evaluation of a succeeded job's archive (`distill eval`'s protocol, with its random-subset
        control); returns the evaluation job. Its result appears as ``evaluation`` on both jobs."""
        body = {k: v for k, v in (("runs", runs), ("epochs", epochs), ("test_limit", test_limit)) if v is not None}
        return Job.model_validate(self._request("POST", f"/jobs/{_job_id(job)}/evaluations", json=body).json())

    def latest(self) -> Job | None:
        """The caller's newest job, or None."""
        return next(iter(self.list(limit=1)), None)

    def cancel(self, job: JobRef) -> Job:
        """Ask the job to stop (a queued job is cancelled at once, a running one at its next check)."""
        return Job.model_validate(self._request("POST", f"/jobs/{_job_id(job)}/cancel").json())

    def events(self, job: JobRef, *, after: int | None = None, follow: bool = False,
               poll: float = 1.0) -> Iterator[JobEvent]:
        """The job's events in order. ``follow=True`` keeps going until the job is finished: live over
        Server-Sent Events when the server offers them (resuming with Last-Event-ID after a dropped
        connection), by polling otherwise."""
        job_id = _job_id(job)
        if not follow:
            yield from self._event_pages(job_id, after)
            return
        last = after
        for event in self._stream_events(job_id, last):
            if event is None:  # the server has no stream: poll instead
                break
            last = event.id
            yield event
        else:
            return
        while True:
            for event in self._event_pages(job_id, last):
                last = event.id
                yield event
            if self.get(job_id).terminal:
                for event in self._event_pages(job_id, last):  # events written just before the end
                    last = event.id
                    yield event
                return
            time.sleep(poll)

    def _event_pages(self, job_id: str, after: int | None) -> Iterator[JobEvent]:
        while True:
            query: dict[str, Any] = {"limit": 1000}
            if after is not None:
                query["after"] = after
            page = JobEventList.model_validate(self._request("GET", f"/jobs/{job_id}/events", params=query).json())
            yield from page.data
            if not page.has_more or not page.data:
                return
            after = page.data[-1].id

    def _stream_events(self, job_id: str, after: int | None) -> Iterator[JobEvent | None]:
        """Events from the SSE stream; yields one None if the server answers with plain JSON instead."""
        retries = 0
        while True:
            headers = {"Accept": "text/event-stream"}
            if after is not None:
                headers["Last-Event-ID"] = str(after)
            path = f"/jobs/{job_id}/events"
            try:
                # the server sends a keep-alive at least every 15 s: a minute of silence is a dead connection
                with self._http.stream("GET", path, headers=headers, timeout=httpx.Timeout(30.0, read=60.0)) as response:
                    self._check(response, "GET", path)
                    if not response.headers.get("content-type", "").startswith("text/event-stream"):
                        yield None
                        return
                    for kind, event_id, data in parse_sse(response.iter_lines()):
                        retries = 0
                        if kind == "log":
                            event = JobEvent.model_validate_json(data)
                            after = event.id if event_id is None else int(event_id)
                            yield event
                        elif kind == "end":
                            return
            except httpx.TransportError as exc:
                retries += 1
                if retries > 5:
                    raise ServerUnreachable(f"lost the event stream of {job_id}: {exc}") from exc
                time.sleep(min(0.5 * 2 ** retries, 5.0))
                continue
            # the stream closed without an end event (server restart): reconnect where we were
            retries += 1
            if retries > 5:
                return
            time.sleep(0.5)

    def wait(self, job: JobRef, timeout: float | None = None, on_progress: Callable[[Job], None] | None = None,
             poll: float = 1.0, *, raise_on_failure: bool = True) -> Job:
        """Block until the job is finished and return it when it succeeded.

        A job that failed or was cancelled raises :class:`JobFailed` carrying the reason (``raise_on_failure=False``
        returns it instead). ``on_progress(job)`` is called whenever status, stage or progress change. Raises
        :class:`WaitTimeout` after ``timeout`` seconds (the job keeps running on the server)."""
        deadline = None if timeout is None else time.monotonic() + timeout
        current = self.get(job)
        seen: tuple[Any, ...] | None = None
        while True:
            state = (current.status, current.stage, round(current.progress, 4), current.cancel_requested)
            if on_progress is not None and state != seen:
                on_progress(current)
            seen = state
            if current.terminal:
                if raise_on_failure and current.status != "succeeded":
                    raise JobFailed(current)
                return current
            if deadline is not None and time.monotonic() >= deadline:
                raise WaitTimeout(current, timeout or 0)
            time.sleep(poll if deadline is None else max(0.0, min(poll, deadline - time.monotonic())))
            current = self.get(current.id)

    # -- results -------------------------------------------------------------------------------------------

    def download(self, job: JobRef, path: str | os.PathLike[str], *, on_progress: Callable[[int, int], None] | None = None,
                 attempts: int = 5) -> Path:
        """Download a succeeded job's archive to ``path`` and return it.

        Bytes go to ``.<name>.part`` beside the target; an interrupted download (a dropped connection, or an
        earlier call that died) resumes from there with a Range request. The sha256 of the whole file must
        equal the job's before the file is renamed to ``path``; a mismatch removes the partial file and
        raises :class:`ChecksumMismatch`. ``on_progress(done_bytes, total_bytes)`` follows the transfer."""
        target = Path(path)
        current = job if isinstance(job, Job) and job.artifact is not None else self.get(job)
        if current.artifact is None:
            problem = Problem(title="Conflict", status=409, detail=f"job {current.id} is {current.status}: no archive")
            raise Conflict(problem, "GET", f"{self.url}/jobs/{current.id}/artifact")
        artifact = current.artifact
        target.parent.mkdir(parents=True, exist_ok=True)
        part = target.with_name(f".{target.name}.part")
        for attempt in range(1, attempts + 1):
            try:
                self._fetch_into(part, artifact.url, artifact.sha256, artifact.bytes, on_progress)
                break
            except httpx.TransportError as exc:
                if attempt == attempts:
                    raise ServerUnreachable(f"download of {current.id} failed {attempts} times: {exc}") from exc
                time.sleep(min(0.5 * 2 ** attempt, 5.0))
        digest = _sha256_file(part)
        if digest != artifact.sha256:
            part.unlink(missing_ok=True)
            raise ChecksumMismatch(f"downloaded archive of {current.id} has sha256 {digest[:16]}…, "
                                   f"the job says {artifact.sha256[:16]}…; removed it")
        os.replace(part, target)
        return target

    def _fetch_into(self, part: Path, url: str, sha256: str, total: int,
                    on_progress: Callable[[int, int], None] | None) -> None:
        have = part.stat().st_size if part.exists() else 0
        if have > total:
            part.unlink()
            have = 0
        if have == total and total > 0:
            return
        headers = {"Accept": "*/*"}
        if have:
            headers["Range"] = f"bytes={have}-"
            headers["If-Range"] = f'"{sha256}"'
        with self._http.stream("GET", url, headers=headers, timeout=httpx.Timeout(30.0, read=120.0)) as response:
            if response.status_code == 416:
                part.unlink(missing_ok=True)
                raise httpx.RemoteProtocolError("range not satisfiable; starting over")
            self._check(response, "GET", url)
            mode = "ab" if response.status_code == 206 else "wb"
            done = have if mode == "ab" else 0
            with open(part, mode) as handle:
                for chunk in response.iter_bytes(1 << 20):
                    handle.write(chunk)
                    done += len(chunk)
                    if on_progress is not None:
                        on_progress(done, total)


def _sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def parse_sse(lines: Iterator[str]) -> Iterator[tuple[str, str | None, str]]:
    """Server-Sent Events (WHATWG HTML, "event stream interpretation"): yields (event type, id, data)."""
    kind: str = "message"
    event_id: str | None = None
    data: list[str] = []
    for raw in lines:
        line = raw.rstrip("\r\n")
        if not line:
            if data:
                yield kind, event_id, "\n".join(data)
            kind, event_id, data = "message", None, []
            continue
        if line.startswith(":"):
            continue
        name, _, value = line.partition(":")
        value = value[1:] if value.startswith(" ") else value
        if name == "event":
            kind = value
        elif name == "data":
            data.append(value)
        elif name == "id":
            event_id = value
    if data:
        yield kind, event_id, "\n".join(data)
