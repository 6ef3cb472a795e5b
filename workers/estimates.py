"""How long a job will take on this host, said at submit: from the stage times of earlier jobs of the same
method and dataset in the job store when there are any, else from a small static prior per method.

Scaling rule (both sources): a job's *work* is the training images it reads (``max_per_class`` or the
smallest class, times the classes), times its ``iterations`` for the iterative pixel-space methods (for
``oq``/``d4m`` ``iterations`` counts k-means passes, a negligible part of their time); stage times
scale linearly with work, relative to the most recent finished jobs. The prior is rough on purpose and says
so (``basis: "prior"``); the first finished job of a method replaces it with this host's own figures.
"""

from __future__ import annotations

from typing import Any

from workers.jobs import JobStore

HISTORY_JOBS = 3

# Static prior per method: (fixed seconds, seconds per unit of work, share of the time per stage). A unit of
# work is one training image at 32x32 pixels (times iterations for iterative methods). Order-of-magnitude
# figures for a small CPU host; a finished job on this host replaces them.
PRIORS: dict[str, tuple[float, float, list[tuple[str, float]]]] = {
    "random": (3.0, 2e-5, [("select", 0.6), ("archive", 0.4)]),
    "herding": (5.0, 3e-3, [("features", 0.8), ("select", 0.1), ("archive", 0.1)]),
    "kcenter": (5.0, 3e-3, [("features", 0.8), ("select", 0.1), ("archive", 0.1)]),
    # oq's default on small images refines for 200 DM steps after the encode: most of its time
    "oq": (20.0, 0.2, [("encode", 0.25), ("quantize", 0.02), ("decode", 0.03), ("refine", 0.7)]),
    "d4m": (20.0, 0.06, [("encode", 0.9), ("quantize", 0.05), ("decode", 0.05)]),
}
ITERATIVE_PRIOR = (10.0, 2e-5, [("distill", 0.95), ("archive", 0.05)])


def work_units(dataset: str, max_per_class: int | None, params: dict[str, Any], iterative: bool = True) -> float:
    """Training images read (at 32x32 pixels), times iterations for an iterative method: what estimates scale
    with."""
    from distill.data.registry import DATASETS, smallest_class

    spec = DATASETS.get(dataset)
    classes = spec.num_classes if spec is not None else 10
    size = spec.image_size if spec is not None else 32
    try:
        per_class = smallest_class(dataset)
    except Exception:  # an operator's folder that cannot be listed: the submit check reports it
        per_class = max_per_class or 1
    if max_per_class is not None:
        per_class = min(per_class, max_per_class)
    images = classes * per_class * (size / 32) ** 2
    iterations = params.get("iterations") if iterative else None
    return images * (iterations if isinstance(iterations, int) and iterations > 0 else 1)


def estimate(store: JobStore, method: str, dataset: str, max_per_class: int | None,
             params: dict[str, Any], defaults: dict[str, Any] | None = None) -> dict[str, Any]:
    """``{"seconds", "stages": [[stage, seconds], ...], "basis", "jobs", "work"}`` for a job about to be queued."""
    effective = {**(defaults or {}), **params}
    work = work_units(dataset, max_per_class, effective, iterative=method not in PRIORS)
    return _from_history_or_prior(store, method, dataset, "distill", work, PRIORS.get(method, ITERATIVE_PRIOR))


# An evaluation trains ``runs`` students for ``epochs`` on the distilled set, then the same on the random control:
# its work is runs x epochs x distilled images (at 32x32 pixels) x 2.
EVALUATION_PRIOR = (10.0, 2e-3, [("evaluate", 1.0)])


def estimate_evaluation(store: JobStore, dataset: str, images: int, runs: int, epochs: int) -> dict[str, Any]:
    from distill.data.registry import DATASETS

    spec = DATASETS.get(dataset)
    size = spec.image_size if spec is not None else 32
    work = 2.0 * runs * epochs * images * (size / 32) ** 2
    return _from_history_or_prior(store, "evaluate", dataset, "evaluate", work, EVALUATION_PRIOR)


def _from_history_or_prior(store: JobStore, method: str, dataset: str, kind: str, work: float,
                           prior: tuple[float, float, list[tuple[str, float]]]) -> dict[str, Any]:
    history = store.stage_history(method, dataset, limit=HISTORY_JOBS, kind=kind)
    if history:
        per_stage: dict[str, list[float]] = {}
        for past_work, log in history:
            seconds_of: dict[str, float] = {}  # a resumed job may list a stage twice
            for stage, seconds in log:
                seconds_of[str(stage)] = seconds_of.get(str(stage), 0.0) + float(seconds)
            for stage, seconds in seconds_of.items():
                per_stage.setdefault(stage, []).append(seconds / max(past_work, 1e-9))
        order = list(dict.fromkeys(str(stage) for stage, _ in history[0][1]))
        stages = [(stage, work * sorted(per_stage[stage])[len(per_stage[stage]) // 2]) for stage in order]
        basis = "history"
    else:
        fixed, rate, shares = prior
        seconds = fixed + rate * work
        stages = [(stage, seconds * share) for stage, share in shares]
        basis = "prior"
    # at least a second: a job waits for a worker's poll and its claim even when its stages take no time
    return {"seconds": max(1.0, round(sum(s for _, s in stages), 1)), "stages": [[s, round(t, 3)] for s, t in stages],
            "basis": basis, "jobs": len(history), "work": work}
