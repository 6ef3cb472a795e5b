"""The estimate said at submit, before a method has run on this host (the prior): the order of magnitude of the
measured run times, and k-means passes of the latent methods are not counted as iterations of the work."""

from __future__ import annotations

from pathlib import Path

from workers.db import make_engine, migrate
from workers.estimates import estimate, work_units
from workers.jobs import JobStore


def test_the_prior_of_the_demo_job_is_minutes_not_hours(tmp_path: Path) -> None:
    engine = make_engine(f"sqlite:///{tmp_path / 'jobs.sqlite3'}", None)
    migrate(engine, None)
    store = JobStore(engine)
    # make demo's job (oq, MNIST, 500 images per class) runs in about 13 minutes on one CPU core (BENCHMARKS.md,
    # q-oq-mnist-10); its default k-means does 25 passes, which must not multiply the work
    demo = estimate(store, "oq", "mnist", 500, {}, {"iterations": 25, "refine_iterations": "auto"})
    assert demo["basis"] == "prior" and 5 * 60 <= demo["seconds"] <= 40 * 60, demo
    assert work_units("mnist", 500, {"iterations": 25}, iterative=False) == work_units("mnist", 500, {})
    # an iterative pixel-space method scales with its iterations
    dm = estimate(store, "dm", "mnist", 500, {"iterations": 200})
    assert estimate(store, "dm", "mnist", 500, {"iterations": 400})["seconds"] > 1.9 * dm["seconds"] - 20
