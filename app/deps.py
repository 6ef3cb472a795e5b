"""Request-scoped dependencies: the job store and the settings live on ``app.state``."""

from __future__ import annotations

from fastapi import Request

from app.metrics import ApiMetrics
from app.settings import ServiceSettings
from workers.jobs import JobStore


def get_store(request: Request) -> JobStore:
    return request.app.state.store


def get_settings(request: Request) -> ServiceSettings:
    return request.app.state.settings


def get_metrics(request: Request) -> ApiMetrics:
    return request.app.state.metrics
