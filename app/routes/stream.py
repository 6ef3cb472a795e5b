"""Live job events as Server-Sent Events: ``GET /jobs/{id}/stream`` (and ``/events`` asked for text/event-stream).

The stream sends, in order:

- ``event: log`` with ``id: <event id>`` and the JobEvent as JSON, for every event after ``Last-Event-ID``
  (or ``?after=``), so a reconnecting client misses nothing and sees nothing twice;
- ``event: status`` with the Job as JSON whenever its status, stage, progress or cancel flag changes;
- ``event: end`` with the final Job once it is finished, after its last events; then the stream closes.

The job store is the source of truth (workers write events there, possibly on other hosts), so the stream
polls it, off the event loop, every ``poll`` seconds. A stream also closes after ``max_seconds``
(clients reconnect with Last-Event-ID), so proxies and a server shutting down never wait on it for long.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from typing import Annotated

from fastapi import APIRouter, Header, HTTPException, Query, Request
from fastapi.responses import StreamingResponse
from starlette.concurrency import run_in_threadpool

from app import schemas
from app.deps import OwnerDep, StoreDep
from app.routes.common import JobId, Responses, to_schema
from workers.jobs import JobNotFound, JobStore

router = APIRouter(tags=["jobs"])

EVENT_STREAM = "text/event-stream"
POLL_SECONDS = 0.5
KEEPALIVE_SECONDS = 15.0
MAX_STREAM_SECONDS = 120.0


def sse(kind: str, data: str, event_id: int | None = None) -> str:
    head = f"id: {event_id}\n" if event_id is not None else ""
    return head + f"event: {kind}\n" + "".join(f"data: {line}\n" for line in data.splitlines() or [""]) + "\n"


def wants_stream(request: Request) -> bool:
    return EVENT_STREAM in request.headers.get("accept", "")


def resume_point(last_event_id: str | None, after: int | None) -> int | None:
    """Last-Event-ID (what a reconnecting EventSource sends) wins over ``?after=``; garbage means 'from the start'."""
    if last_event_id is not None and last_event_id.strip().isascii() and last_event_id.strip().isdigit() \
            and int(last_event_id) <= 2**62:  # a larger id is no event id (the store's ids are 64-bit): start over
        return int(last_event_id.strip())
    return after


async def job_stream(store: JobStore, job_id: str, owner: str, after: int | None, request: Request | None = None,
                     poll: float = POLL_SECONDS, max_seconds: float = MAX_STREAM_SECONDS) -> AsyncIterator[str]:
    yield "retry: 2000\n\n"
    started = last_write = time.monotonic()
    last_state: tuple | None = None
    while True:
        events, has_more = await run_in_threadpool(store.list_events, job_id, owner, after=after, limit=500)
        for e in events:
            event = schemas.JobEvent.model_validate(e, from_attributes=True)
            yield sse("log", event.model_dump_json(), e.id)
            after = e.id
            last_write = time.monotonic()
        if has_more:
            continue
        job = to_schema(await run_in_threadpool(store.get_job, job_id, owner))
        state = (job.status, job.stage, round(job.progress, 4), job.cancel_requested)
        if job.terminal:
            events, _ = await run_in_threadpool(store.list_events, job_id, owner, after=after, limit=1000)
            for e in events:  # written between the two reads
                event = schemas.JobEvent.model_validate(e, from_attributes=True)
                yield sse("log", event.model_dump_json(), e.id)
            yield sse("end", job.model_dump_json())
            return
        if state != last_state:
            yield sse("status", job.model_dump_json())
            last_state = state
            last_write = time.monotonic()
        now = time.monotonic()
        if now - started >= max_seconds:
            return  # the client reconnects with Last-Event-ID
        if now - last_write >= KEEPALIVE_SECONDS:
            yield ": keep-alive\n\n"
            last_write = now
        if request is not None and await request.is_disconnected():
            return
        await asyncio.sleep(poll)


def stream_response(store: JobStore, job_id: str, owner: str, after: int | None, request: Request) -> StreamingResponse:
    try:
        store.get_job(job_id, owner)  # 404 before the stream starts, not inside it
    except JobNotFound:
        raise HTTPException(404, f"no job {job_id}") from None
    return StreamingResponse(job_stream(store, job_id, owner, after, request), media_type=EVENT_STREAM,
                             headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})


SSE_EVENT = {  # one event as Server-Sent Events parsers (and schemathesis) see it
    "type": "object",
    "properties": {
        "event": {"type": "string", "enum": ["log", "status", "end"]},
        "id": {"type": "string", "description": "the job event's id (log events only): resume with Last-Event-ID"},
        "data": {"type": "string", "contentMediaType": "application/json",
                 "description": "log: a JobEvent; status and end: the Job"},
        "retry": {"type": "integer"},
    },
}
STREAM_DOC: Responses = {
    200: {"content": {EVENT_STREAM: {"schema": SSE_EVENT}},
          "description": "`event: log` (id = event id, data = JobEvent), `event: status` (data = Job) on every "
                         "change, `event: end` (data = the finished Job), then the stream closes"},
}


@router.get("/jobs/{job_id}/stream", response_class=StreamingResponse, responses={
    **STREAM_DOC, 401: {"model": schemas.Problem, "description": "missing or invalid API key"},
    404: {"model": schemas.Problem, "description": "no such job for this API key"}},
    summary="Follow a job live (Server-Sent Events), resumable with Last-Event-ID")
def stream_events(
    job_id: JobId,
    request: Request,
    owner: OwnerDep,
    store: StoreDep,
    after: Annotated[int | None, Query(ge=0, le=2**62, description="id of the last event already seen")] = None,
    last_event_id: Annotated[str | None, Header(alias="Last-Event-ID", max_length=32,
                                                description="sent by a reconnecting client")] = None,
) -> StreamingResponse:
    return stream_response(store, job_id, owner, resume_point(last_event_id, after), request)
