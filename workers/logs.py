"""Logs on stdout: one JSON object per line (with the job id on every line logged inside a job) when stdout is
not a terminal, plain readable lines on a terminal; DISTILL_LOG_FORMAT=json|plain|auto chooses.

The job id and worker id live in context variables, so any logger (ours, uvicorn's, a method's) picks them
up without being passed them.
"""

from __future__ import annotations

import contextvars
import json
import logging
import os
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime

job_id_var: contextvars.ContextVar[str | None] = contextvars.ContextVar("job_id", default=None)
worker_id_var: contextvars.ContextVar[str | None] = contextvars.ContextVar("worker_id", default=None)

_RESERVED = set(vars(logging.makeLogRecord({}))) | {"message", "asctime", "taskName"}


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        payload: dict[str, object] = {
            "ts": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        job_id = getattr(record, "job_id", None) or job_id_var.get()
        if job_id:
            payload["job_id"] = job_id
        worker_id = getattr(record, "worker_id", None) or worker_id_var.get()
        if worker_id:
            payload["worker_id"] = worker_id
        for key, value in vars(record).items():
            if key not in _RESERVED and key not in payload and not key.startswith("_"):
                payload[key] = value if isinstance(value, str | int | float | bool | type(None)) else repr(value)
        if record.exc_info:
            payload["exc"] = self.formatException(record.exc_info)
        return json.dumps(payload, ensure_ascii=False)


class PlainFormatter(logging.Formatter):
    """``12:03:04 info  job started  job=job_.. method=oq``: what a person watching a terminal reads."""

    def format(self, record: logging.LogRecord) -> str:
        when = datetime.fromtimestamp(record.created).strftime("%H:%M:%S")
        extras = []
        job_id = getattr(record, "job_id", None) or job_id_var.get()
        if job_id:
            extras.append(f"job={job_id}")
        for key, value in vars(record).items():
            if key not in _RESERVED and key not in ("job_id", "worker_id") and not key.startswith("_") \
                    and key != "color_message":
                extras.append(f"{key}={value}")
        text = f"{when} {record.levelname.lower():<7} {record.getMessage()}" + ("  " + " ".join(extras) if extras else "")
        if record.exc_info:
            text += "\n" + self.formatException(record.exc_info)
        return text


def log_format() -> str:
    """json or plain: DISTILL_LOG_FORMAT when set to one of them, else plain on a terminal and JSON elsewhere."""
    chosen = os.environ.get("DISTILL_LOG_FORMAT", "auto").strip().lower()
    if chosen in ("json", "plain"):
        return chosen
    try:
        return "plain" if sys.stdout.isatty() else "json"
    except (AttributeError, ValueError):
        return "json"


class AutoFormatter(logging.Formatter):
    """The formatter :func:`log_format` picks, decided once per process (uvicorn builds it from a dict config)."""

    def __init__(self, *args: object, **kwargs: object) -> None:
        super().__init__()
        self._inner: logging.Formatter = PlainFormatter() if log_format() == "plain" else JsonFormatter()

    def format(self, record: logging.LogRecord) -> str:
        return self._inner.format(record)


def configure_logging(level: str = "INFO") -> None:
    """Route the root, uvicorn and our loggers through one handler on stdout (idempotent)."""
    handler = logging.StreamHandler(sys.stdout)
    handler.setFormatter(AutoFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
    for name in ("uvicorn", "uvicorn.error", "uvicorn.access"):
        logger = logging.getLogger(name)
        logger.handlers[:] = []
        logger.propagate = True
    logging.getLogger("alembic").setLevel(logging.WARNING)  # every process migrates at start-up


# uvicorn's own log config, pointing every logger at the JSON formatter (passed as uvicorn's log_config).
UVICORN_LOG_CONFIG: dict = {
    "version": 1,
    "disable_existing_loggers": False,
    "formatters": {"json": {"()": "workers.logs.AutoFormatter"}},
    "handlers": {"stdout": {"class": "logging.StreamHandler", "formatter": "json", "stream": "ext://sys.stdout"}},
    "root": {"handlers": ["stdout"], "level": "INFO"},
    "loggers": {
        "uvicorn": {"handlers": [], "level": "INFO", "propagate": True},
        "uvicorn.error": {"handlers": [], "level": "INFO", "propagate": True},
        "uvicorn.access": {"handlers": [], "level": "WARNING", "propagate": True},
    },
}


@contextmanager
def job_context(job_id: str) -> Iterator[None]:
    token = job_id_var.set(job_id)
    try:
        yield
    finally:
        job_id_var.reset(token)
