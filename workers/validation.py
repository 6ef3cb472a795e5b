"""Everything checked before a job is queued: method, parameters, dataset availability and IPC bounds.

Problems come back as field errors (``loc``/``msg``/``type``), the same shape FastAPI uses for its own 422s,
so a client sees one format whichever layer rejected the request.
"""

from __future__ import annotations

import json
import logging
import threading
from typing import Any

from pydantic import ValidationError

from distill.config import get_settings
from distill.data.registry import DATASETS
from distill.errors import DistillError

log = logging.getLogger("distill.api")

_counts_lock = threading.Lock()
_class_counts: dict[str, list[int]] = {}


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
        path = get_settings().cache_dir / "service" / "class_counts.json"
        stored: dict[str, list[int]] = {}
        if path.exists():
            try:
                stored = json.loads(path.read_text())
            except (OSError, json.JSONDecodeError):
                stored = {}
        if dataset not in stored:
            loaded = DATASETS[dataset].loader()  # not distill's lru cache: the API keeps only the counts
            stored[dataset] = [int(c) for c in loaded.train.counts(loaded.num_classes)]
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_suffix(".tmp")
            tmp.write_text(json.dumps(stored))
            tmp.replace(path)
        _class_counts[dataset] = stored[dataset]
        return _class_counts[dataset]


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
            counts = class_counts(request["dataset"])
        except DistillError:
            log.warning("dataset not loadable", exc_info=True, extra={"dataset": request["dataset"]})
            problems.append(_problem(["dataset"], f"dataset '{request['dataset']}' is not available on this server",
                                     "value_error.dataset_unavailable"))
        else:
            smallest = min(counts)
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
