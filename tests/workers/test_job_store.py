"""The job store itself, on a real SQLite file and a real PostgreSQL schema: atomic claims under concurrency,
lease expiry, the attempts limit and cancellation of a job whose worker died."""

from __future__ import annotations

import threading
import time
import uuid
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path

import pytest
from service_support.helpers import BACKENDS, POSTGRES_URL, drop_schema
from sqlalchemy import update

from distill.config import reload_settings
from workers.db import make_engine, migrate
from workers.janitor import sweep_files
from workers.jobs import JobStore
from workers.models import Job, utcnow
from workers.settings import WorkerSettings

REQUEST = {"dataset": "mnist", "method": "random", "ipc": 1, "params": {}, "seed": 0, "max_per_class": None}


@pytest.fixture(params=BACKENDS)
def store(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[JobStore]:
    schema = None
    if request.param == "sqlite":
        url = f"sqlite:///{tmp_path / 'store.sqlite3'}"
    else:
        url, schema = POSTGRES_URL, f"svc_store_{uuid.uuid4().hex[:10]}"
    engine = make_engine(url, schema)
    migrate(engine, schema)
    migrate(engine, schema)  # idempotent: every process migrates at start-up
    store = JobStore(engine, max_attempts=3, lease_seconds=0.2)
    try:
        yield store
    finally:
        engine.dispose()
        if schema:
            drop_schema(schema)


def test_concurrent_claims_take_each_job_exactly_once(store: JobStore) -> None:
    ids = {store.create_job("owner", {**REQUEST, "seed": i})[0].id for i in range(24)}
    claimed: list[str] = []
    lock = threading.Lock()

    def worker(n: int) -> None:
        while (got := store.claim(f"w{n}")) is not None:
            with lock:
                claimed.append(got[0].id)

    threads = [threading.Thread(target=worker, args=(n,)) for n in range(6)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    assert sorted(claimed) == sorted(ids)  # every job once, none twice
    assert store.counts_by_status() == {"running": 24}


def test_claims_are_fifo_and_idempotency_is_per_owner(store: JobStore) -> None:
    first, _ = store.create_job("a", REQUEST, "key")
    again, replayed = store.create_job("a", REQUEST, "key")
    other, other_replayed = store.create_job("b", REQUEST, "key")
    assert again.id == first.id and replayed and other.id != first.id and not other_replayed
    claimed = store.claim("w")
    assert claimed is not None and claimed[0].id == first.id


def test_lost_worker_requeues_then_fails_after_max_attempts(store: JobStore) -> None:
    job, _ = store.create_job("owner", REQUEST)
    for attempt in (1, 2, 3):
        claimed = store.claim(f"w{attempt}")
        assert claimed is not None and claimed[1].attempt == attempt
        assert store.heartbeat(claimed[1]).held
        time.sleep(0.3)  # the worker "dies": no heartbeat for longer than the 0.2 s lease
        assert store.sweep_stale() == 1
        assert not store.heartbeat(claimed[1]).held  # a zombie cannot touch the job any more
        assert not store.finish(claimed[1], "succeeded")
    final = store.get_job(job.id)
    assert final.status == "failed" and final.error_code == "worker_lost"
    assert "giving up after 3 of 3 attempts" in (final.error_message or "")
    assert store.claim("w4") is None


def test_cancel_of_a_job_whose_worker_died(store: JobStore) -> None:
    job, _ = store.create_job("owner", REQUEST)
    claimed = store.claim("w")
    assert claimed is not None
    assert store.cancel_job(job.id, "owner").cancel_requested_at is not None
    assert store.heartbeat(claimed[1]).cancel_requested
    time.sleep(0.3)
    store.sweep_stale()
    assert store.get_job(job.id).status == "cancelled"


def test_release_on_shutdown_does_not_count_an_attempt(store: JobStore) -> None:
    job, _ = store.create_job("owner", REQUEST)
    claimed = store.claim("w")
    assert claimed is not None
    assert store.release(claimed[1], "shutting down")
    again = store.claim("w2")
    assert again is not None and again[0].id == job.id and again[1].attempt == 1


def test_retention_removes_old_archives_and_orphaned_checkpoints(store: JobStore, tmp_path: Path,
                                                                monkeypatch: pytest.MonkeyPatch) -> None:
    """Issue 13 item 7: after DISTILL_RETENTION_DAYS a finished job's archive goes (the job stays, its
    download is then 410); checkpoint folders of jobs that ended, or that the store does not know, go too."""
    monkeypatch.setenv("DISTILL_HOME", str(tmp_path / "home"))
    reload_settings()
    settings = WorkerSettings(retention_days=1)
    old, _ = store.create_job("owner", REQUEST)
    new, _ = store.create_job("owner", {**REQUEST, "seed": 1})
    running, _ = store.create_job("owner", {**REQUEST, "seed": 2})
    for job in (old, new):
        claimed = store.claim("w")
        assert claimed is not None
        settings.artifact_path(f"{job.id}.tar").write_bytes(b"archive")
        assert store.finish(claimed[1], "succeeded", artifact=(f"{job.id}.tar", 7, "0" * 64))
    assert store.claim("w") is not None
    with store.write() as session:  # the first finished two days ago
        session.execute(update(Job).where(Job.id == old.id).values(finished_at=utcnow() - timedelta(days=2)))
    for job_id in (old.id, running.id, "job_unknown"):
        (settings.job_dir(job_id) / "checkpoints").mkdir(parents=True)
    try:
        assert sweep_files(store, settings) == 3  # old's folder and archive, the unknown folder
        assert not settings.artifact_path(f"{old.id}.tar").exists() and settings.artifact_path(f"{new.id}.tar").exists()
        assert store.get_job(old.id).artifact_path is None and store.get_job(new.id).artifact_path is not None
        assert not settings.job_dir(old.id).exists() and not settings.job_dir("job_unknown").exists()
        assert settings.job_dir(running.id).exists()  # still running: its checkpoints stay
        assert sweep_files(store, settings) == 0
    finally:
        monkeypatch.undo()
        reload_settings()
