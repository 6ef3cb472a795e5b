"""HTTP edges found by the hardening drills: every error is problem+json (Range, 416, unparsable requests),
HEAD on the archive, cancel twice is 409, a huge Last-Event-ID, a full or low disk, the page's security headers.

The API runs in-process (TestClient) over a SQLite store; a job is run to its end by the worker's own
``execute_job`` in this process, so the archive routes serve a real archive.
"""

from __future__ import annotations

import os
import socket
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from distill.api_types import PROBLEM_CONTENT_TYPE

QUICK = {"dataset": "mnist", "method": "random", "ipc": 1, "params": {}, "max_per_class": 5}


def make_app(home: Path, **worker: object):
    from app.main import create_app
    from app.settings import ApiSettings
    from workers.settings import WorkerSettings

    settings = WorkerSettings(database_url=f"sqlite:///{home / 'jobs.sqlite3'}", **worker)  # type: ignore[arg-type]
    return create_app(ApiSettings(api_keys=[]), settings), settings


def run_queued(app, settings) -> None:
    """What a worker does with the oldest queued job, in this process."""
    from workers.execution import execute_job

    claimed = app.state.store.claim("test-worker")
    assert claimed is not None
    execute_job(app.state.store, *claimed, settings)


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[TestClient, str]]:
    app, settings = make_app(tmp_path_factory.mktemp("edge-http"))
    with TestClient(app) as client:
        job = client.post("/jobs", json=QUICK).json()
        run_queued(app, settings)
        assert client.get(f"/jobs/{job['id']}").json()["status"] == "succeeded"
        yield client, job["id"]


def is_problem(response, status: int) -> dict:
    assert response.status_code == status, response.text
    assert response.headers["content-type"] == PROBLEM_CONTENT_TYPE
    body = response.json()
    assert body["status"] == status and body["title"]
    return body


def test_head_on_the_archive_gives_its_headers(served: tuple[TestClient, str]) -> None:
    client, job_id = served
    full = client.get(f"/jobs/{job_id}/artifact")
    head = client.head(f"/jobs/{job_id}/artifact")
    assert head.status_code == 200 and head.content == b""
    assert head.headers["content-length"] == str(len(full.content))
    for name in ("etag", "repr-digest", "accept-ranges"):
        assert head.headers[name] == full.headers[name]
    assert client.head(f"/jobs/{job_id}/artifact", headers={"If-None-Match": full.headers["etag"]}).status_code == 304
    missing = client.head("/jobs/job_nope/artifact")
    assert missing.status_code == 404 and missing.headers["content-type"] == PROBLEM_CONTENT_TYPE


def test_bad_and_unsatisfiable_ranges_are_problems(served: tuple[TestClient, str]) -> None:
    client, job_id = served
    size = len(client.get(f"/jobs/{job_id}/artifact").content)
    part = client.get(f"/jobs/{job_id}/artifact", headers={"Range": "bytes=0-9"})
    assert part.status_code == 206 and len(part.content) == 10
    assert is_problem(client.get(f"/jobs/{job_id}/artifact", headers={"Range": "bytes=abc"}), 400)["detail"]
    outside = client.get(f"/jobs/{job_id}/artifact", headers={"Range": f"bytes={size + 10}-"})
    assert "outside the archive" in is_problem(outside, 416)["detail"]
    assert outside.headers["content-range"] == f"bytes */{size}"


def test_cancelling_a_cancelled_job_is_409(served: tuple[TestClient, str]) -> None:
    client, _ = served
    job = client.post("/jobs", json={**QUICK, "seed": 7}).json()
    first = client.post(f"/jobs/{job['id']}/cancel")
    assert first.status_code == 200 and first.json()["status"] == "cancelled"
    assert is_problem(client.post(f"/jobs/{job['id']}/cancel"), 409)["detail"] == "job already cancelled"


@pytest.mark.parametrize("last_id", [str(2**63).encode(), str(2**64 + 5).encode(), b"9" * 30, b"\xb2", b"-1"])
def test_a_huge_or_odd_last_event_id_streams_from_the_start(served: tuple[TestClient, str], last_id: bytes) -> None:
    client, job_id = served
    with client.stream("GET", f"/jobs/{job_id}/stream", headers={"Last-Event-ID": last_id}) as response:
        assert response.status_code == 200
        text = "".join(response.iter_text())
    assert "event: log" in text and text.rstrip().splitlines()[-1].startswith("data: ")  # every event, then end
    assert "event: end" in text


def test_the_page_has_a_content_security_policy(served: tuple[TestClient, str]) -> None:
    client, _ = served
    page = client.get("/")
    policy = page.headers["content-security-policy"]
    assert "script-src 'self';" in policy and "unsafe-inline" not in policy and "object-src 'none'" in policy
    assert page.headers["x-content-type-options"] == "nosniff"
    # the page loads nothing inline: one external script, one stylesheet
    assert "<script src=\"static/app.js\"></script>" in page.text and "<script>" not in page.text
    assert "style=" not in page.text
    for path in ("/static/app.js", "/jobs", "/openapi.json"):
        assert client.get(path).headers["x-content-type-options"] == "nosniff"
    assert "'unsafe-inline'" in client.get("/docs").headers["content-security-policy"]  # Swagger UI's start-up


def test_submit_while_storage_is_low_is_503_not_a_failed_job(tmp_path: Path) -> None:
    app, _settings = make_app(tmp_path, min_free_bytes=2**62)
    with TestClient(app) as client:
        body = is_problem(client.post("/jobs", json=QUICK), 503)
        assert "storage" in body["detail"] and client.get("/jobs").json()["data"] == []
        assert client.get("/healthz").json()["storage"] == "low_space"


def test_oversized_headers_are_a_problem(tmp_path: Path) -> None:
    import uvicorn

    from app.main import problem_protocol

    app, _ = make_app(tmp_path)
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    # h11 refuses headers above its incomplete-event limit (16 KiB by default; lowered here so the test needs
    # to send little): the same path as any oversized or unparsable request
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, http=problem_protocol(),
                                           log_level="critical", lifespan="off", h11_max_incomplete_event_size=4096))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    try:
        deadline = time.monotonic() + 30
        while not server.started and time.monotonic() < deadline:
            time.sleep(0.05)
        with socket.create_connection(("127.0.0.1", port), timeout=10) as conn:
            conn.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * 10_000)  # headers not ended
            reply = b""
            while chunk := conn.recv(65536):
                reply += chunk
    finally:
        server.should_exit = True
        thread.join(timeout=10)
    head, _, body = reply.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 400") and b"content-type: application/problem+json" in head.lower()
    assert b'"status":400' in body


def _mount_tmpfs(folder: Path, size: str) -> bool:
    folder.mkdir(parents=True, exist_ok=True)
    if os.geteuid() != 0:
        return False
    return subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(folder)],
                          capture_output=True).returncode == 0


def test_delete_frees_a_full_disk(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """On a full DISTILL_HOME the job store cannot write: DELETE removes the archive first, so it succeeds and
    frees the space (submitting then works again)."""
    from distill.config import reload_settings

    home = tmp_path / "small-disk"
    if not _mount_tmpfs(home, "48m"):
        pytest.skip("needs root to mount a small tmpfs as a full disk")
    try:
        monkeypatch.setenv("DISTILL_HOME", str(home))
        reload_settings()
        app, settings = make_app(home, min_free_bytes=0)
        with TestClient(app) as client:
            job = client.post("/jobs", json={**QUICK, "ipc": 200, "max_per_class": 200}).json()
            run_queued(app, settings)
            archive = settings.artifact_path(f"{job['id']}.tar")
            assert archive.stat().st_size > 1_000_000
            filler = os.open(home / "filler", os.O_WRONLY | os.O_CREAT)
            for block in (1 << 16, 512, 1):  # fill the disk to the last byte
                try:
                    while True:
                        os.write(filler, b"\0" * block)
                except OSError:
                    pass
            os.close(filler)
            assert client.post("/jobs", json=QUICK).status_code == 503  # full: nothing accepted
            deleted = client.delete(f"/jobs/{job['id']}")
            assert deleted.status_code == 204, deleted.text
            assert not archive.exists() and client.get(f"/jobs/{job['id']}").status_code == 404
            app.state.store.engine.dispose()
    finally:
        monkeypatch.undo()  # the session's DISTILL_HOME back (deleting it sent later tests to ~/.distillery)
        reload_settings()
        subprocess.run(["umount", str(home)], capture_output=True)
