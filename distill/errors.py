"""User-facing errors: one clear line for the CLI (non-zero exit) and a 4xx for the HTTP API."""


class DistillError(Exception):
    """A problem the user can fix (bad input, missing files). Its message is shown as is."""

    code = "invalid_request"


class NotFoundError(DistillError):
    code = "not_found"


class ArchiveError(DistillError):
    code = "bad_archive"


class Cancelled(Exception):  # noqa: N818 - a control-flow signal, not an error
    """Raised inside a run when its job was cancelled."""
