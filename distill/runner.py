"""One entry point that turns a request (dataset, method, ipc, params, seed) into an archive.

The CLI, the local worker and the Ray worker all call :func:`run_to_archive`; they differ only in the
progress sink, the checkpoint folder and the cancellation check they pass in.
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from distill.archive import build_manifest, write_archive
from distill.data.registry import (
    Dataset,
    check_ipc,
    dataset_available,
    dataset_names,
    get_dataset,
    ipc_problems,
    smallest_class,
    unavailable_dataset,
    unknown_dataset,
)
from distill.errors import DistillError, InvalidRequest, Problem, problem
from distill.methods.base import CheckpointStore, DistilledSet, Executor, Method, MethodParams, ProgressSink, RunContext
from distill.methods.registry import METHODS, get_method, param_problems, unknown_method
from distill.models import resolve_models
from distill.requirements import requirement_problems


@dataclass
class RunRequest:
    dataset: str
    method: str
    ipc: int
    params: dict[str, Any]
    seed: int = 0
    max_per_class: int | None = None
    device: str = "auto"
    paths: bool = True  # False for requests from the HTTP API: registered dataset and model names only


@dataclass
class RunResult:
    path: Path
    sha256: str
    manifest: dict[str, Any]
    distilled: DistilledSet


def resolve_device(name: str = "auto") -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError as exc:
        raise DistillError(f"unknown device '{name}'") from exc
    if device.type == "cuda" and not torch.cuda.is_available():
        raise DistillError(f"device '{name}' requested but CUDA is not available")
    return device


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)


def check_request(
    request: RunRequest, *, max_ipc: int | None = None, max_iterations: int | None = None
) -> tuple[type[Method], MethodParams]:
    """Everything that can be checked before any work, without decoding a registered dataset: method,
    parameters (with the operator's ``max_iterations`` ceiling), dataset name, ``max_per_class`` and ipc
    (against the operator's ``max_ipc`` and the smallest class).
    ``request.paths=False`` (the HTTP API) accepts registered dataset and model names only, never paths.

    Raises :class:`InvalidRequest` listing every problem found; the CLI prints it as one line, the API as
    422 field errors. A method whose code cannot be imported raises :class:`MethodUnavailable`.
    """
    problems: list[Problem] = []
    method_cls: type[Method] | None = None
    params: MethodParams | None = None
    if request.method in METHODS:
        method_cls = get_method(request.method)
        params, found = param_problems(method_cls, request.params, paths=request.paths)
        problems += found
        if params is not None:  # packages and weights the values need, before minutes of work
            problems += requirement_problems(request.method, request.params, params.model_dump())
        iterations = getattr(params, "iterations", None)
        if max_iterations is not None and isinstance(iterations, int) and iterations > max_iterations:
            problems.append(problem(["params", "iterations"], f"iterations must be <= {max_iterations} on this server",
                                    "less_than_equal"))
    else:
        problems.append(unknown_method(request.method))
    if request.max_per_class is not None and request.max_per_class < 1:
        problems.append(problem(["max_per_class"], f"max_per_class must be >= 1 (got {request.max_per_class})",
                                "greater_than_equal"))
    registered = request.dataset in dataset_names()
    known_dataset = registered or (request.paths and request.dataset.startswith("imagefolder:"))
    if not known_dataset:
        problems.append(unknown_dataset(request.dataset, request.paths))
    elif not request.paths and not dataset_available(request.dataset):
        problems.append(unavailable_dataset(request.dataset))
        known_dataset = False
    if max_ipc is not None and request.ipc > max_ipc:
        problems.append(problem(["ipc"], f"ipc must be <= {max_ipc} on this server", "less_than_equal"))
    elif request.ipc < 1:
        problems.append(problem(["ipc"], f"ipc must be >= 1 (got {request.ipc})", "greater_than_equal"))
    elif known_dataset and (registered or not problems):  # imagefolder:PATH is read: only if needed
        try:
            smallest = smallest_class(request.dataset)
        except DistillError as exc:  # files that cannot be listed: the CLI says where, the API does not
            problems.append(problem(["dataset"], str(exc), "value_error.dataset_unavailable") if request.paths
                            else unavailable_dataset(request.dataset))
        else:
            problems += ipc_problems(request.dataset, smallest, request.ipc, request.max_per_class)
    if problems:
        raise InvalidRequest(problems)
    assert method_cls is not None and params is not None
    return method_cls, params


def validate_request(request: RunRequest) -> tuple[type[Method], MethodParams, Dataset]:
    """:func:`check_request`, then load the dataset and check ipc against its real class sizes."""
    method_cls, params = check_request(request)
    dataset = get_dataset(request.dataset)
    check_ipc(dataset, request.ipc, request.max_per_class)
    return method_cls, params, dataset


def run_to_archive(
    request: RunRequest,
    out: Path,
    *,
    progress: ProgressSink | None = None,
    checkpoint_dir: Path | None = None,
    is_cancelled: Callable[[], bool] = lambda: False,
    log: Callable[[str], None] = lambda message: None,
    show_progress_bars: bool = False,
    executor: Executor | None = None,
) -> RunResult:
    method_cls, params, dataset = validate_request(request)
    device = resolve_device(request.device)
    seed_everything(request.seed)
    ctx = RunContext(
        dataset=dataset,
        ipc=request.ipc,
        seed=request.seed,
        device=device,
        max_per_class=request.max_per_class,
        progress_sink=progress,
        checkpoints=CheckpointStore(checkpoint_dir),
        is_cancelled=is_cancelled,
        log=log,
        show_progress_bars=show_progress_bars,
        executor=executor,
    )
    start = time.perf_counter()
    # The method loads models from directories; the manifest keeps the names the request gave.
    resolved = resolve_models(params.model_dump(), paths=request.paths)
    distilled = method_cls().run(ctx, params.model_copy(update=resolved))
    for key, folder in resolved.items():  # a method that reports its model reports the name, never the folder
        if distilled.metrics.get(key) == folder:
            distilled.metrics[key] = getattr(params, key)
    ctx.timings["total"] = time.perf_counter() - start
    _check_output(distilled, dataset.num_classes, request.ipc)
    manifest = build_manifest(
        distilled,
        dataset=dataset.describe(),
        method=request.method,
        ipc=request.ipc,
        params=params.model_dump(mode="json"),
        seed=request.seed,
        timings=ctx.timings,
        extra={"max_per_class": request.max_per_class, "device": str(device)},
    )
    ctx.progress("archive", 0.0)
    sha = write_archive(out, distilled, manifest)
    ctx.progress("archive", 1.0)
    return RunResult(path=Path(out), sha256=sha, manifest=manifest, distilled=distilled)


def _check_output(distilled: DistilledSet, num_classes: int, ipc: int) -> None:
    counts = torch.bincount(distilled.labels, minlength=num_classes)
    if len(counts) != num_classes or (counts != ipc).any():
        raise RuntimeError(f"method produced {counts.tolist()} images per class, expected {ipc} each")
