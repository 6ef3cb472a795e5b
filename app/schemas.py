"""Request and response models of the HTTP API: the only shapes that cross the wire."""

from __future__ import annotations

from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, StrictInt, field_serializer
from pydantic.json_schema import JsonDict, JsonValue

from distill.data.registry import dataset_names
from distill.methods.registry import METHODS
from workers.settings import StorageState

JobStatus = Literal["queued", "running", "succeeded", "failed", "cancelled"]


def _enum_of(names: Callable[[], list[str]]) -> Callable[[JsonDict], None]:
    """The names registered when the schema is generated (plugins and settings add them after this module loads)."""

    def extra(schema: JsonDict) -> None:
        values: list[JsonValue] = list(names())
        schema["enum"] = values

    return extra


class JobCreate(BaseModel):
    """A distillation request. Parameters are validated against the method's own model at submission."""

    model_config = ConfigDict(extra="forbid", strict=True, json_schema_extra={
        "examples": [{"dataset": "mnist", "method": "random", "ipc": 10, "params": {}, "seed": 0}]
    })

    dataset: str = Field(min_length=1, max_length=64, json_schema_extra=_enum_of(dataset_names),
                         description="a dataset registered on the server (GET /datasets); names only, never paths")
    method: str = Field(min_length=1, max_length=64, json_schema_extra=_enum_of(lambda: list(METHODS)),
                        description="a registered method (GET /methods)")
    ipc: StrictInt = Field(ge=1, le=10_000, description="images per class; at most the smallest class size")
    params: dict[str, Any] = Field(default_factory=dict, description="method parameters (GET /methods schema)")
    seed: StrictInt = Field(0, ge=0, le=2**31 - 1)
    max_per_class: StrictInt | None = Field(
        None, ge=1, le=1_000_000, description="use at most this many training images per class (quick jobs)"
    )


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


class Job(_UtcModel):
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
    available: bool = Field(description="whether this server has the dataset's files; jobs need it")


class ModelInfo(BaseModel):
    name: str = Field(description="a value for the model parameters encoder, prior, sd")
    builtin: bool = Field(description="a built-in encoder (true) or registered by the operator (false)")


class MethodInfo(BaseModel):
    name: str
    summary: str
    family: str
    parameters: dict[str, Any] = Field(description="JSON schema of the method's parameters, with defaults")


class Health(BaseModel):
    """Without an API key (when keys are configured) only ``status``: liveness, nothing about other keys' jobs."""

    status: Literal["ok", "degraded"]
    database: Literal["ok", "unreachable"] | None = None
    storage: StorageState | None = Field(
        default=None, description="DISTILL_HOME: free space above DISTILL_MIN_FREE_BYTES and a test write succeeds")
    version: str | None = None
    queued: int | None = None
    running: int | None = None


class Problem(BaseModel):
    detail: str
