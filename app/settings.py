"""Service settings from the environment (``DISTILL_*``), shared by the API and the workers.

Paths (home, artifacts, cache) come from :func:`distill.config.get_settings`; this model only adds what the
service needs on top: API keys, the job database, worker tuning and the bind address.
"""

from __future__ import annotations

import importlib
from functools import lru_cache
from pathlib import Path
from typing import Annotated

from pydantic import AliasChoices, Field, field_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

from distill.config import get_settings as get_core_settings

LOOPBACK_HOSTS = {"127.0.0.1", "::1", "localhost"}


class ServiceSettings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="DISTILL_", extra="ignore")

    api_keys: Annotated[list[str], NoDecode] = Field(
        default_factory=list,
        description="Comma-separated bearer tokens; each key sees only its own jobs. Empty: loopback only.",
    )
    database_url: str | None = Field(
        None,
        validation_alias=AliasChoices("DISTILL_DATABASE_URL", "DATABASE_URL"),
        description="SQLAlchemy URL of the job store; default: SQLite file under DISTILL_HOME",
    )
    db_schema: str | None = Field(None, description="PostgreSQL schema holding the tables (default: public)")
    max_attempts: int = Field(3, ge=1, description="claims of one job before a lost worker makes it fail")
    lease_seconds: float = Field(60.0, gt=0, description="a running job with no heartbeat for this long is re-claimed")
    heartbeat_seconds: float = Field(5.0, gt=0, description="how often a worker heartbeats and reads cancel flags")
    poll_seconds: float = Field(1.0, gt=0, description="how often an idle worker looks for queued jobs")
    cancel_grace_seconds: float = Field(
        30.0, gt=0, description="`distill serve` kills a worker that ignores a cancel for this long"
    )
    host: str = Field("127.0.0.1", description="bind address of `distill serve`")
    port: int = Field(8000, ge=1, le=65535)
    max_body_bytes: int = Field(64 * 1024, ge=1024, description="largest accepted request body")
    max_ipc: int = Field(1000, ge=1, description="upper bound on ipc accepted by the API")
    device: str = Field("auto", description="torch device of local workers: auto, cpu, cuda")
    plugins: Annotated[list[str], NoDecode] = Field(
        default_factory=list, description="modules imported at start (e.g. to register site-specific methods)"
    )

    @field_validator("api_keys", "plugins", mode="before")
    @classmethod
    def _split_csv(cls, value: object) -> object:
        if isinstance(value, str):
            return [part.strip() for part in value.split(",") if part.strip()]
        return value

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

    def job_dir(self, job_id: str) -> Path:
        return self.home_dir / "jobs" / job_id

    def load_plugins(self) -> None:
        for name in self.plugins:
            importlib.import_module(name)


@lru_cache(maxsize=1)
def get_service_settings() -> ServiceSettings:
    return ServiceSettings()


def reload_service_settings() -> ServiceSettings:
    get_service_settings.cache_clear()
    from distill.config import reload_settings

    reload_settings()
    return get_service_settings()
