"""Catalogue and operations: /datasets, /methods, /healthz, /metrics."""

from __future__ import annotations

from functools import lru_cache

from fastapi import APIRouter, Response
from fastapi.responses import JSONResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from app import schemas
from app.deps import MaybeOwnerDep, MetricsDep, OwnerDep, SettingsDep, StoreDep, WorkerSettingsDep
from distill import __version__

router = APIRouter()
MISSING_FILES = "its files are not on this server (the operator can fetch them: distill fetch)"


@router.get("/datasets", response_model=list[schemas.DatasetInfo], tags=["catalogue"])
def list_datasets() -> list[schemas.DatasetInfo]:
    """Datasets registered on this server, and whether their files are here (jobs need them). Requests name one
    of these; paths are never accepted."""
    from distill.data.registry import DATASETS, dataset_available, dataset_names, imagefolder_class_counts, operator_datasets
    from distill.errors import DistillError

    out = []
    operator = operator_datasets()
    for name in dataset_names():
        available = dataset_available(name)
        spec = DATASETS.get(name)
        if spec is not None:
            out.append(schemas.DatasetInfo(name=name, description=spec.description, num_classes=spec.num_classes,
                                           channels=spec.channels, image_size=spec.image_size, available=available,
                                           unavailable_reason=None if available else MISSING_FILES))
            continue
        try:
            num_classes: int | None = len(imagefolder_class_counts(operator[name])) if available else None
        except DistillError:
            num_classes, available = None, False
        out.append(schemas.DatasetInfo(name=name, description="ImageFolder registered by the operator",
                                       num_classes=num_classes, channels=None, image_size=None, available=available,
                                       unavailable_reason=None if available else MISSING_FILES))
    return out


@lru_cache(maxsize=4)
def _methods(max_iterations: int) -> tuple[schemas.MethodInfo, ...]:
    from distill.methods.base import device_parameters, host_has
    from distill.methods.registry import available_methods
    from distill.requirements import method_requirements

    out = []
    for name, cls in available_methods().items():
        parameters = cls.Params.model_json_schema()
        iterations = parameters.get("properties", {}).get("iterations", {})
        for option in iterations.get("anyOf", [iterations]):  # this server's ceiling, documented
            if option.get("type") == "integer":
                option["maximum"] = min(option.get("maximum", max_iterations), max_iterations)
        needs, reason = method_requirements(name, cls.Params().model_dump())
        devices = {device: host_has(device) for device in sorted(set(device_parameters(parameters).values()))}
        out.append(schemas.MethodInfo(name=name, summary=cls.summary, family=cls.family, parameters=parameters,
                                      available=reason is None, unavailable_reason=reason, requirements=needs,
                                      devices=devices))
    return tuple(out)


@router.get("/methods", response_model=list[schemas.MethodInfo], tags=["catalogue"])
def list_methods(settings: SettingsDep) -> list[schemas.MethodInfo]:
    """Methods available on this server, each with its parameters as JSON schema: defaults from its paper,
    bounds on every budget parameter ("maximum", with this server's ceiling on iterations), and whether this
    server can run it with its defaults (a missing package or weights: ``unavailable_reason``). A parameter that
    only has an effect on one kind of device carries ``x-device`` in its schema; ``devices`` says whether this
    server has each such device."""
    return list(_methods(settings.max_iterations))


@router.get("/models", response_model=list[schemas.ModelInfo], tags=["catalogue"])
def list_models() -> list[schemas.ModelInfo]:
    """Model names this server accepts for the parameters encoder, prior and sd, and (registered ones only) dq's
    teacher_weights; never paths or hub ids."""
    from distill.models import BUILTIN_MODELS, model_names

    return [schemas.ModelInfo(name=name, builtin=name in BUILTIN_MODELS) for name in model_names()]


@router.get("/healthz", response_model=schemas.Health, response_model_exclude_none=True, tags=["operations"],
            responses={503: {"model": schemas.Health, "description": "the job store or DISTILL_HOME is not usable"}})
def healthz(store: StoreDep, settings: WorkerSettingsDep, owner: MaybeOwnerDep) -> JSONResponse:
    """Liveness for anyone; with a valid API key (or none configured) also the job store, the storage under
    DISTILL_HOME (free space, a test write), the version and the queue."""
    try:
        counts: dict[str, int] | None = store.counts_by_status()
    except Exception:
        counts = None
    storage = settings.storage_state()
    healthy = counts is not None and storage == "ok"
    body = schemas.Health(status="ok" if healthy else "degraded")
    if owner is not None:
        body = schemas.Health(status=body.status, database="ok" if counts is not None else "unreachable",
                              storage=storage, version=__version__, queued=(counts or {}).get("queued", 0),
                              running=(counts or {}).get("running", 0))
    return JSONResponse(body.model_dump(exclude_none=True), status_code=200 if healthy else 503)


@router.get("/metrics", response_class=Response, tags=["operations"],
            responses={200: {"content": {"text/plain": {}}, "description": "Prometheus text format"},
                       401: {"model": schemas.Problem, "description": "keys are configured and none was given"}})
def metrics(metrics: MetricsDep, _owner: OwnerDep) -> Response:
    """Prometheus metrics (totals over every key: behind an API key when keys are configured)."""
    return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)
