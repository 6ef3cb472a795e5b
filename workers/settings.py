"""Settings of the job layer from the environment (``DISTILL_*``): the job store, leases, heartbeats,
polling, cancellation grace, the workers' device and plugins.

Paths (home, artifacts, cache) come from :func:`distill.config.get_settings`; the HTTP API adds its own
settings on top (``app.settings``), so a worker never needs the API to start.
"""

from __future__ import annotations

import importlib
import os
import shutil
from functools import lru_cache
from pathlib import Path
from typing import Annotated, Literal

from pydantic import AliasChoices, Field, field_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

from distill.config import get_settings as get_core_settings
from distill.config import reload_settings as reload_core_settings
from distill.errors import DistillError

StorageState = Literal["ok", "low_space", "unwritable"]


def split_csv(value: object) -> object:
    """``"a, b"`` -> ``["a", "b"]`` for list settings given as one environment variable."""
    if isinstance(value, str):
        return [part.strip() for part in value.split(",") if part.strip()]
    return value


class WorkerSettings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="DISTILL_", extra="ignore")

    database_url: str | None = Field(
        default=None,
        validation_alias=AliasChoices("DISTILL_DATABASE_URL", "DATABASE_URL"),
        description="SQLAlchemy URL of the job store; default: SQLite file under DISTILL_HOME",
    )
    db_schema: str | None = Field(default=None, description="PostgreSQL schema holding the tables (default: public)")
    max_attempts: int = Field(default=3, ge=1, description="claims of one job before a lost worker makes it fail")
    lease_seconds: float = Field(default=60.0, gt=0, description="a running job with no heartbeat for this long is re-claimed")
    heartbeat_seconds: float = Field(default=5.0, gt=0, description="how often a worker heartbeats and reads cancel flags")
    poll_seconds: float = Field(default=1.0, gt=0, description="how often an idle worker looks for queued jobs")
    cancel_poll_seconds: float = Field(
        default=1.0, gt=0, description="how often a running job's worker reads its cancel flag between heartbeats"
    )
    cancel_grace_seconds: float = Field(
        default=10.0, gt=0, description="a worker (or Ray task) whose job ignores a cancel for this long is killed"
    )
    stop_grace_seconds: float = Field(
        default=4.0, gt=0, description="on SIGTERM, a worker whose job has not stopped after this long is killed "
                                       "and the job re-queued"
    )
    device: str = Field(default="auto", description="torch device of local workers: auto, cpu, cuda")
    retention_days: float | None = Field(
        default=None, gt=0, description="remove archives of jobs finished this long ago (default: keep them)"
    )
    min_free_bytes: int = Field(
        default=256 * 1024**2, ge=0, description="/healthz reports degraded below this much free space in DISTILL_HOME"
    )
    allow_hub: bool = Field(
        default=False, description="let jobs download models from the Hugging Face hub (default: offline)"
    )
    ray_gpus_per_task: float = Field(
        default=1.0, gt=0, le=1, description="GPU share of each Ray GPU child task (encode shard, decode batch); "
        "0.25 runs four per GPU, each with its own JPEG-decoding process, while the loader is the bottleneck")
    plugins: Annotated[list[str], NoDecode] = Field(
        default_factory=list, description="modules imported at start (e.g. to register site-specific methods)"
    )

    @field_validator("plugins", mode="before")
    @classmethod
    def _split_csv(cls, value: object) -> object:
        return split_csv(value)

    @property
    def resolved_database_url(self) -> str:
        if self.database_url:
            return self.database_url
        path = get_core_settings().home_dir / "jobs.sqlite3"
        return f"sqlite:///{path}"

    @property
    def home_dir(self) -> Path:
        return get_core_settings().home_dir

    @property
    def artifacts_dir(self) -> Path:
        return get_core_settings().artifacts_dir

    def artifact_path(self, name: str) -> Path:
        """Where a job's archive lives; only the file name recorded in the store is trusted."""
        return self.artifacts_dir / Path(name).name

    def job_dir(self, job_id: str) -> Path:
        return self.home_dir / "jobs" / job_id

    def check_home(self) -> None:
        """Create the state folders under DISTILL_HOME and test a write there: a service that cannot keep its
        state stops at once with one clear line, instead of a traceback from deep inside the job store."""
        home = get_core_settings().home.expanduser()
        try:
            for folder in (home, home / "artifacts", home / "jobs"):
                folder.mkdir(parents=True, exist_ok=True)
            probe = home / f".write-test-{os.getpid()}"
            probe.write_bytes(b"ok")
            probe.unlink()
        except OSError as exc:
            raise DistillError(f"DISTILL_HOME {home} is not writable: {exc.strerror or exc}") from None

    def storage_state(self) -> StorageState:
        """``ok``, ``low_space`` (under ``min_free_bytes`` free) or ``unwritable`` (a test write failed)."""
        try:
            self.check_home()
            free = shutil.disk_usage(get_core_settings().home.expanduser()).free
        except (DistillError, OSError):
            return "unwritable"
        return "ok" if free >= self.min_free_bytes else "low_space"

    def apply_hub_policy(self) -> None:
        """No model-hub access from a job unless the operator allows it (set before diffusers is imported)."""
        if not self.allow_hub:
            for name in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_DATASETS_OFFLINE"):
                os.environ[name] = "1"

    def load_plugins(self) -> None:
        """Import the operator's plugin modules; one that fails is an error naming it, not a traceback."""
        for name in self.plugins:
            try:
                importlib.import_module(name)
            except ImportError as exc:
                raise DistillError(f"cannot import plugin '{name}' (DISTILL_PLUGINS): {type(exc).__name__}: {exc}") from exc


@lru_cache(maxsize=1)
def get_worker_settings() -> WorkerSettings:
    return WorkerSettings()


def reload_worker_settings() -> WorkerSettings:
    """Drop the cached settings (tests change the environment)."""
    get_worker_settings.cache_clear()
    reload_core_settings()
    return get_worker_settings()
