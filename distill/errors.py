"""User-facing errors: one clear line for the CLI (non-zero exit) and a 4xx for the HTTP API."""

from __future__ import annotations

from typing import TypedDict


class DistillError(Exception):
    """A problem the user can fix (bad input, missing files). Its message is shown as is."""

    code = "invalid_request"


class NotFoundError(DistillError):
    code = "not_found"


class ArchiveError(DistillError):
    code = "bad_archive"


class Problem(TypedDict):
    """One thing wrong with a request: where (``loc``, a path into the request), what (``msg``), which kind."""

    loc: list[str | int]
    msg: str
    type: str


def problem(loc: list[str | int], msg: str, kind: str) -> Problem:
    return {"loc": loc, "msg": msg, "type": kind}


class InvalidRequest(DistillError):
    """A request with one or more problems. ``str()`` is the CLI's one line; the API sends ``problems``
    as 422 field errors (``loc`` under ``body``)."""

    def __init__(self, problems: list[Problem]):
        if not problems:
            raise ValueError("InvalidRequest needs at least one problem")
        super().__init__("; ".join(p["msg"] for p in problems))
        self.problems = problems


class MethodUnavailable(DistillError):
    """A registered method whose code cannot be imported on this machine (a missing or broken dependency)."""

    code = "method_unavailable"


class Cancelled(Exception):
    """Raised inside a run when its job was cancelled (a control-flow signal, not an error)."""
