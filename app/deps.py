"""Request-scoped dependencies as ``Annotated`` aliases: the job store, the settings and the metrics live on
``app.state``; the owner comes from the API key (:mod:`app.auth`)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Annotated, Any

from fastapi import Depends, Request

from app.auth import current_owner, optional_owner
from app.metrics import ApiMetrics
from app.settings import ApiSettings
from workers.jobs import JobStore
from workers.settings import WorkerSettings


def _app_state(attribute: str) -> Callable[[Request], Any]:
    """A dependency returning ``app.state.<attribute>``, set once by :func:`app.main.create_app`; the alias
    below says its type."""

    def dependency(request: Request) -> Any:
        return getattr(request.app.state, attribute)

    dependency.__name__ = f"get_{attribute}"
    return dependency


StoreDep = Annotated[JobStore, Depends(_app_state("store"))]
SettingsDep = Annotated[ApiSettings, Depends(_app_state("settings"))]
WorkerSettingsDep = Annotated[WorkerSettings, Depends(_app_state("worker_settings"))]
MetricsDep = Annotated[ApiMetrics, Depends(_app_state("metrics"))]
OwnerDep = Annotated[str, Depends(current_owner)]
MaybeOwnerDep = Annotated[str | None, Depends(optional_owner)]
