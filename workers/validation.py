"""Everything checked before a job is queued: method, parameters, dataset availability and IPC bounds.

Problems come back as field errors (``loc``/``msg``/``type``), the same shape FastAPI uses for its own 422s,
so a client sees one format whichever layer rejected the request.
"""

from __future__ import annotations

import json
import logging
import os
import threading
from typing import Any

from pydantic import ValidationError

from distill.config import get_settings
from distill.data.registry import DATASETS
from distill.errors import DistillError

log = logging.getLogger("distill.api")

_counts_lock = threading.Lock()
_class_counts: dict[str, list[int]] = {}

# Smallest training class of the standard releases of the registered datasets, so a POST never has to decode a
# dataset (CIFAR-10 from JPEGs takes minutes). Counts measured on this server (a worker records them after its
# first run) take precedence; a dataset missing here is loaded once and its counts cached.
KNOWN_SMALLEST_CLASS = {name: spec.smallest_class for name, spec in DATASETS.items() if spec.smallest_class}


def _counts_path():  # noqa: ANN202
    return get_settings().cache_dir / "service" / "class_counts.json"


def _stored_counts() -> dict[str, list[int]]:
    path = _counts_path()
    if path.exists():
        try:
            return json.loads(path.read_text())
        except (OSError, json.JSONDecodeError):
            return {}
    return {}


def remember_class_counts(dataset: str, counts: list[int]) -> None:
    """Record measured class sizes (called by workers, which load the dataset anyway)."""
    with _counts_lock:
        stored = _stored_counts()
        if stored.get(dataset) == counts:
            return
        stored[dataset] = counts
        path = _counts_path()
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f"{path.name}.{os.getpid()}.{threading.get_ident()}.tmp")
        tmp.write_text(json.dumps(stored))
        tmp.replace(path)
        _class_counts[dataset] = counts


def smallest_class(dataset: str) -> int:
    if dataset in _class_counts:
        return min(_class_counts[dataset])
    stored = _stored_counts().get(dataset)
    if stored:
        _class_counts[dataset] = stored
        return min(stored)
    if dataset in KNOWN_SMALLEST_CLASS:
        return KNOWN_SMALLEST_CLASS[dataset]
    return min(class_counts(dataset))


class RequestProblems(ValueError):
    def __init__(self, errors: list[dict[str, Any]]):
        super().__init__("; ".join(e["msg"] for e in errors))
        self.errors = errors


def _problem(loc: list[str | int], msg: str, kind: str) -> dict[str, Any]:
    return {"loc": ["body", *loc], "msg": msg, "type": kind}


def class_counts(dataset: str) -> list[int]:
    """Training images per class, computed once per dataset (then cached in memory and under the cache dir)."""
    if dataset in _class_counts:
        return _class_counts[dataset]
    with _counts_lock:
        if dataset in _class_counts:
            return _class_counts[dataset]
        stored = _stored_counts()
        if dataset in stored:
            _class_counts[dataset] = stored[dataset]
            return stored[dataset]
    loaded = DATASETS[dataset].loader()  # not distill's lru cache: the API keeps only the counts
    counts = [int(c) for c in loaded.train.counts(loaded.num_classes)]
    remember_class_counts(dataset, counts)
    return counts


def method_class(name: str) -> type:
    from distill.methods.registry import METHODS, get_method

    if name not in METHODS:
        raise RequestProblems([_problem(["method"], f"unknown method '{name}'; known: {', '.join(METHODS)}",
                                        "value_error.unknown_method")])
    try:
        return get_method(name)
    except (ImportError, AttributeError):
        log.warning("method not importable", exc_info=True, extra={"method": name})
        raise RequestProblems([_problem(["method"], f"method '{name}' is not available on this server",
                                        "value_error.method_unavailable")]) from None


def validate_job_request(request: dict[str, Any], max_ipc: int) -> dict[str, Any]:
    """Check a request (already shape-validated) and return it with the method's parameters normalised."""
    problems: list[dict[str, Any]] = []
    method = method_class(request["method"])
    try:
        params = method.Params.model_validate(request.get("params") or {})
    except ValidationError as exc:
        for error in exc.errors():
            loc = [str(p) for p in error["loc"]]
            if error["type"] == "extra_forbidden":
                msg = f"unknown parameter for {request['method']} (known: {', '.join(method.Params.model_fields)})"
            else:
                msg = error["msg"]
            problems.append(_problem(["params", *loc], msg, error["type"]))
        params = None
    ipc = request["ipc"]
    if ipc > max_ipc:
        problems.append(_problem(["ipc"], f"ipc must be <= {max_ipc} on this server", "less_than_equal"))
    else:
        try:
            smallest = smallest_class(request["dataset"])
        except DistillError:
            log.warning("dataset not loadable", exc_info=True, extra={"dataset": request["dataset"]})
            problems.append(_problem(["dataset"], f"dataset '{request['dataset']}' is not available on this server",
                                     "value_error.dataset_unavailable"))
        else:
            limit = request.get("max_per_class")
            if limit is not None:
                smallest = min(smallest, limit)
            if ipc > smallest:
                problems.append(_problem(
                    ["ipc"], f"ipc {ipc} is larger than the smallest class of {request['dataset']} "
                             f"({smallest} training images{' with max_per_class' if limit is not None else ''})",
                    "value_error.ipc_too_large"))
    if problems:
        raise RequestProblems(problems)
    assert params is not None
    return {**request, "params": params.model_dump(mode="json", exclude_unset=True)}
