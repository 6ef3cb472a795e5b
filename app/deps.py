"""Request-scoped dependencies as ``Annotated`` aliases: the job store, the settings and the metrics live on
``app.state``; the owner comes from the API key (:mod:`app.auth`)."""

from __future__ import annotations

from typing import Annotated

from fastapi import Depends, Request

from app.auth import current_owner, optional_owner
from app.metrics import ApiMetrics
from app.settings import ApiSettings
from workers.jobs import JobStore
from workers.settings import WorkerSettings


def get_store(request: Request) -> JobStore:
    store: JobStore = request.app.state.store
    return store


def get_settings(request: Request) -> ApiSettings:
    settings: ApiSettings = request.app.state.settings
    return settings


def get_worker_settings(request: Request) -> WorkerSettings:
    settings: WorkerSettings = request.app.state.worker_settings
    return settings


def get_metrics(request: Request) -> ApiMetrics:
    metrics: ApiMetrics = request.app.state.metrics
    return metrics


StoreDep = Annotated[JobStore, Depends(get_store)]
SettingsDep = Annotated[ApiSettings, Depends(get_settings)]
WorkerSettingsDep = Annotated[WorkerSettings, Depends(get_worker_settings)]
MetricsDep = Annotated[ApiMetrics, Depends(get_metrics)]
OwnerDep = Annotated[str, Depends(current_owner)]
MaybeOwnerDep = Annotated[str | None, Depends(optional_owner)]
