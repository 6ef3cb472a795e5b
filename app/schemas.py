"""Request and response models of the HTTP API: the only shapes that cross the wire."""

from __future__ import annotations

from collections.abc import Callable
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, StrictInt
from pydantic.json_schema import JsonDict, JsonValue

from distill.api_types import (  # noqa: F401 - the response shapes, shared with distill.client
    Artifact,
    DatasetInfo,
    FieldError,
    Job,
    JobError,
    JobEvent,
    JobEventList,
    JobList,
    JobRequest,
    JobStatus,
    MethodInfo,
    Problem,
)
from distill.data.registry import dataset_names
from distill.methods.registry import METHODS
from workers.settings import StorageState


def _enum_of(names: Callable[[], list[str]]) -> Callable[[JsonDict], None]:
    """The names registered when the schema is generated (plugins and settings add them after this module loads)."""

    def extra(schema: JsonDict) -> None:
        values: list[JsonValue] = list(names())
        schema["enum"] = values

    return extra


# A person's label: printable text on one line, never interpreted (no paths, no markup meaning).
JobName = Annotated[str, Field(min_length=1, max_length=100, pattern=r"^[^\x00-\x1f\x7f]*$")]


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
    params: dict[str, Any] = Field(default_factory=dict, description=(
        "method parameters, validated against the method's schema (GET /methods): JSON types as given (no \"100\" "
        "for an integer, no true for a number); every string is an enum, a name matching the schema's pattern "
        "(networks, augmentation strategies) or a model registered on the server (GET /models), never a path or "
        "a hub id; at most 256 characters, no control characters. All problems of a request, core fields and "
        "parameters, come back in one 422."))
    seed: StrictInt = Field(0, ge=0, le=2**31 - 1)
    max_per_class: StrictInt | None = Field(
        None, ge=1, le=1_000_000, description="use at most this many training images per class (quick jobs)"
    )
    name: JobName | None = Field(None, description="a label for the job, shown in lists (bounded text)")


class ModelInfo(BaseModel):
    name: str = Field(description="a value for the model parameters encoder, prior, sd (and, when not built in, "
                                  "dq's teacher_weights)")
    builtin: bool = Field(description="a built-in encoder (true) or registered by the operator (false)")


class Health(BaseModel):
    """Without an API key (when keys are configured) only ``status``: liveness, nothing about other keys' jobs."""

    status: Literal["ok", "degraded"]
    database: Literal["ok", "unreachable"] | None = None
    storage: StorageState | None = Field(
        default=None, description="DISTILL_HOME: free space above DISTILL_MIN_FREE_BYTES and a test write succeeds")
    version: str | None = None
    queued: int | None = None
    running: int | None = None
