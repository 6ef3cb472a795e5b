"""The shapes that cross the wire between the job service and its clients.

They live in the core package (not in ``app/``) so that the HTTP API (``app.schemas``) and the Python client
(``distill.client``) use the same models: a field added here shows up in the OpenAPI schema and in the
client's typed results at once. Request bodies (validated against the registries) stay in ``app.schemas``.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_serializer

JobStatus = Literal["queued", "running", "succeeded", "failed", "cancelled"]
TERMINAL_STATUSES: frozenset[str] = frozenset({"succeeded", "failed", "cancelled"})
PROBLEM_CONTENT_TYPE = "application/problem+json"


class _UtcModel(BaseModel):
    """Timestamps are stored as naive UTC; they leave the API with an explicit offset."""

    @field_serializer("*", when_used="json")
    def _utc(self, value: Any) -> Any:
        if isinstance(value, datetime) and value.tzinfo is None:
            return value.replace(tzinfo=UTC).isoformat()
        return value


class JobRequest(BaseModel):
    dataset: str
    method: str
    ipc: int
    params: dict[str, Any]
    seed: int
    max_per_class: int | None


class JobError(BaseModel):
    code: str = Field(description="machine-readable: invalid_request, internal_error, worker_lost, cancelled ...")
    message: str


class Artifact(BaseModel):
    url: str = Field(description="download URL of the archive (tar), relative to the API root")
    bytes: int
    sha256: str
    preview_url: str


class StageEstimate(BaseModel):
    name: str
    seconds: float = Field(description="estimated wall time of the stage on this host")


class Estimate(BaseModel):
    seconds: float = Field(description="estimated wall time of the whole job on this host, made at submit")
    stages: list[StageEstimate]
    basis: Literal["history", "prior"] = Field(
        description="history: stage times of earlier jobs of this method and dataset on this host, scaled by the "
                    "images read (times iterations); prior: a rough static figure per method, until one has run")
    jobs: int = Field(0, description="earlier jobs the estimate comes from (0 for the prior)")


class StageState(BaseModel):
    name: str
    state: Literal["done", "running", "pending"]
    seconds: float | None = Field(None, description="done: measured; running/pending: estimated")


class Score(BaseModel):
    mean: float = Field(description="test accuracy in percent, mean over the runs")
    std: float = Field(description="standard deviation over the runs (0 for one run)")
    runs: int


class EvaluationResult(BaseModel):
    """`distill eval`'s protocol on a finished job's archive: students trained on the distilled set, and the
    control: the same protocol on a random real subset of the same size."""

    job_id: str = Field(description="the evaluation job")
    status: JobStatus
    accuracy: Score | None = None
    control: Score | None = None
    gain: float | None = Field(None, description="accuracy minus control, in points")
    protocol: dict[str, Any] = Field(default_factory=dict, description="model, epochs, runs, augmentation ...")


class Job(_UtcModel):
    model_config = ConfigDict(extra="ignore")  # a newer server may add fields; an older client keeps working

    object: Literal["job"] = "job"
    id: str
    status: JobStatus
    stage: str | None = Field(description="current stage of the method (select, encode, kmeans, archive ...)")
    progress: float = Field(ge=0, le=1, description="fraction of the current stage done")
    created_at: datetime
    started_at: datetime | None
    finished_at: datetime | None
    attempts: int = Field(description="times a worker claimed the job (a lost worker's job is claimed again)")
    cancel_requested: bool
    request: JobRequest
    error: JobError | None
    artifact: Artifact | None
    name: str | None = Field(None, description="the submitter's label for the job")
    kind: Literal["distill", "evaluate"] = Field(
        "distill", description="distill makes an archive; evaluate trains students on the archive of parent_id")
    parent_id: str | None = Field(None, description="evaluate: the job whose archive is evaluated")
    estimate: Estimate | None = None
    overall_progress: float = Field(0.0, ge=0, le=1, description="fraction of the whole job done, across stages")
    elapsed_seconds: float | None = Field(None, description="wall time since the job started (until it ended)")
    eta_seconds: float | None = Field(None, description="estimated seconds left (running jobs)")
    stages: list[StageState] = Field(default_factory=list, description="the job's stages in order")
    evaluation: EvaluationResult | None = Field(
        None, description="distill: its latest evaluation; evaluate: its own result")

    @property
    def terminal(self) -> bool:
        return self.status in TERMINAL_STATUSES


class JobList(BaseModel):
    object: Literal["list"] = "list"
    data: list[Job]
    has_more: bool


class JobEvent(_UtcModel):
    id: int
    created_at: datetime
    level: Literal["info", "warn", "error"]
    stage: str | None
    message: str
    progress: float | None


class JobEventList(BaseModel):
    object: Literal["list"] = "list"
    data: list[JobEvent]
    has_more: bool


class DatasetInfo(BaseModel):
    name: str
    description: str
    num_classes: int | None = Field(description="null for an operator's ImageFolder whose files are missing")
    channels: int | None = Field(description="null for an operator's ImageFolder (known once loaded)")
    image_size: int | None = Field(description="null for an operator's ImageFolder (known once loaded)")
    available: bool = Field(True, description="whether this server has the dataset's files; jobs need it")
    unavailable_reason: str | None = Field(None, description="why jobs cannot use it here, when they cannot")


class MethodInfo(BaseModel):
    name: str
    summary: str
    family: str
    parameters: dict[str, Any] = Field(description="JSON schema of the method's parameters, with defaults")
    available: bool = Field(True, description="whether this server can run the method with its defaults now")
    unavailable_reason: str | None = Field(None, description="what is missing when it cannot (package, weights)")
    requirements: list[str] = Field(default_factory=list,
                                    description="what the method needs with its defaults (packages, weights)")
    devices: dict[str, bool] = Field(default_factory=dict, description=(
        "the devices some parameters only have an effect on (their schema's \"x-device\", e.g. cuda), each with "
        "whether this server has it; such a parameter is accepted on any server"))


class FieldError(BaseModel):
    """One rejected input: where (``loc``, as FastAPI writes it, and a JSON pointer into the body), and why."""

    loc: list[str | int] = Field(description='path of the offending input, e.g. ["body", "params", "lr"]')
    msg: str = Field(description="what is wrong, for a person")
    type: str = Field(description="machine-readable kind, e.g. missing, extra_forbidden, value_error.ipc_too_large")
    pointer: str | None = Field(default=None, description="JSON pointer (RFC 6901) into the request body, when it is one")


class Problem(BaseModel):
    """An error response as RFC 9457 problem details (``application/problem+json``)."""

    model_config = ConfigDict(extra="allow")

    type: str = Field(default="about:blank", description="URI naming the kind of problem")
    title: str = Field(description="short summary of the kind of problem (the HTTP reason phrase for about:blank)")
    status: int = Field(description="the HTTP status code")
    detail: str | None = Field(default=None, description="what went wrong with this request, for a person")
    instance: str | None = Field(default=None, description="the request path")
    errors: list[FieldError] = Field(default_factory=list, description="one entry per rejected input field")


def field_pointer(loc: list[str | int] | tuple[str | int, ...]) -> str | None:
    """``["body", "params", "lr"]`` -> ``/params/lr`` (RFC 6901); None for query, path and header inputs."""
    if not loc or loc[0] != "body":
        return None
    parts = [str(part).replace("~", "~0").replace("/", "~1") for part in loc[1:]]
    return "/" + "/".join(parts) if parts else ""
