"""Settings of the HTTP API from the environment (``DISTILL_*``): API keys, request limits, bind address.

The job store, leases and workers are configured by :mod:`workers.settings`; the API reads both.
"""

from __future__ import annotations

from functools import lru_cache
from typing import Annotated

from pydantic import Field, field_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

from workers.settings import reload_worker_settings, split_csv

LOOPBACK_HOSTS = {"127.0.0.1", "::1", "localhost"}


class ApiSettings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="DISTILL_", extra="ignore")

    api_keys: Annotated[list[str], NoDecode] = Field(
        default_factory=list,
        description="Comma-separated bearer tokens; each key sees only its own jobs. Empty: loopback only.",
    )
    host: str = Field(default="127.0.0.1", description="bind address of `distill serve` / `distill api`")
    port: int = Field(default=8000, ge=1, le=65535)
    max_body_bytes: int = Field(default=64 * 1024, ge=1024, description="largest accepted request body")
    max_ipc: int = Field(default=1000, ge=1, description="upper bound on ipc accepted by the API")
    max_iterations: int = Field(
        default=100_000, ge=1, description="upper bound on every method's iterations accepted by the API (GET /methods)"
    )

    @field_validator("api_keys", mode="before")
    @classmethod
    def _split_csv(cls, value: object) -> object:
        return split_csv(value)


@lru_cache(maxsize=1)
def get_api_settings() -> ApiSettings:
    return ApiSettings()


def reload_api_settings() -> ApiSettings:
    """Drop the cached API, worker and core settings (tests change the environment)."""
    get_api_settings.cache_clear()
    reload_worker_settings()
    return get_api_settings()
