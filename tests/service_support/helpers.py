"""Helpers and fixtures for the service tests of tests/app and tests/workers: a real API (``distill api``,
uvicorn) and real worker processes (``distill worker``) on loopback, over a real SQLite file or a real
PostgreSQL schema created for this run and dropped afterwards."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TypeVar

import httpx
import pytest

TESTS = Path(__file__).resolve().parents[1]
REPO = TESTS.parent
PLUGIN = "service_support.plugin"  # test-only methods, loaded into every service process (DISTILL_PLUGINS)
# The repository before tests/: tests/app and tests/workers must not shadow the packages app and workers.
PYTHONPATH = os.pathsep.join([str(REPO), str(TESTS)])
POSTGRES_URL = os.environ.get("DISTILL_TEST_POSTGRES_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/test")
KEY_A, KEY_B = "test-key-alpha", "test-key-bravo"
BACKENDS = ["sqlite", "postgres"]
T = TypeVar("T")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def drop_schema(schema: str) -> None:
    from sqlalchemy import create_engine, text

    engine = create_engine(POSTGRES_URL)
    with engine.begin() as conn:
        conn.execute(text(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE'))
    engine.dispose()


def service_env(home: Path, backend: str, **extra: str) -> dict[str, str]:
    """Environment of the API and worker processes: short leases and heartbeats so tests run quickly."""
    env = dict(os.environ)
    for key in ("DISTILL_DATABASE_URL", "DATABASE_URL", "DISTILL_DB_SCHEMA", "DISTILL_CONFIG"):
        env.pop(key, None)
    env.update(
        DISTILL_HOME=str(home),
        DISTILL_API_KEYS=f"{KEY_A},{KEY_B}",
        DISTILL_LEASE_SECONDS="3",
        DISTILL_HEARTBEAT_SECONDS="0.5",
        DISTILL_POLL_SECONDS="0.2",
        DISTILL_MAX_ATTEMPTS="3",
        DISTILL_CANCEL_GRACE_SECONDS="5",
        DISTILL_PLUGINS=PLUGIN,
        DISTILL_DEVICE="cpu",
        PYTHONPATH=os.pathsep.join([PYTHONPATH, env.get("PYTHONPATH", "")]).rstrip(os.pathsep),
        OMP_NUM_THREADS="1",
        PYTHONUNBUFFERED="1",
    )
    if backend == "sqlite":
        env["DISTILL_DATABASE_URL"] = f"sqlite:///{home / 'jobs.sqlite3'}"
    else:
        env["DISTILL_DATABASE_URL"] = POSTGRES_URL
        env["DISTILL_DB_SCHEMA"] = f"svc_test_{uuid.uuid4().hex[:10]}"
    env.update(extra)
    return env


class Proc:
    """``distill ARGS...`` as a child process with its output in a log file (shown when a test fails)."""

    def __init__(self, args: list[str], env: dict[str, str], log_path: Path):
        self.args, self.env, self.log_path = args, env, log_path
        self.process: subprocess.Popen | None = None

    def start(self) -> Proc:
        handle = open(self.log_path, "ab")
        self.process = subprocess.Popen([sys.executable, "-m", "distill.cli", *self.args], env=self.env, cwd=REPO,
                                        stdout=handle, stderr=subprocess.STDOUT)
        handle.close()
        return self

    @property
    def pid(self) -> int:
        assert self.process is not None
        return self.process.pid

    def kill(self) -> None:
        """SIGKILL: no cleanup, no goodbye (a crashed or OOM-killed worker)."""
        if self.process is not None and self.process.poll() is None:
            os.kill(self.process.pid, signal.SIGKILL)
            self.process.wait(timeout=10)

    def stop(self, timeout: float = 15) -> None:
        if self.process is None or self.process.poll() is not None:
            return
        self.process.send_signal(signal.SIGTERM)
        try:
            self.process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.kill()

    def tail(self, lines: int = 40) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""


class Stack:
    """One API process plus worker processes sharing one job store."""

    def __init__(self, home: Path, backend: str, env: dict[str, str]):
        self.home, self.backend, self.env = home, backend, env
        self.port = free_port()
        self.base_url = f"http://127.0.0.1:{self.port}"
        self.api: Proc | None = None
        self.workers: list[Proc] = []

    def start_api(self) -> None:
        self.api = Proc(["api", "--port", str(self.port), "--no-access-log"], self.env,
                        self.home / "api.log").start()
        wait_until(lambda: self._healthy(), timeout=90, what=f"API on {self.base_url}\n{self.api.tail()}")

    def _healthy(self) -> bool:
        assert self.api is not None
        if self.api.process is not None and self.api.process.poll() is not None:
            raise RuntimeError(f"API exited with {self.api.process.returncode}:\n{self.api.tail()}")
        try:
            return httpx.get(self.base_url + "/healthz", timeout=2).status_code in (200, 503)  # up (maybe degraded)
        except httpx.HTTPError:
            return False

    def start_worker(self, name: str | None = None, supervised: bool = False) -> Proc:
        """``distill worker``; by default ``--in-process`` (the process that runs the job: tests kill it)."""
        name = name or f"test-worker-{len(self.workers)}"
        args = ["worker", "--worker-id", name, *([] if supervised else ["--in-process"])]
        proc = Proc(args, self.env, self.home / f"{name}.log").start()
        self.workers.append(proc)
        return proc

    def client(self, key: str | None = KEY_A) -> httpx.Client:
        headers = {"Authorization": f"Bearer {key}"} if key else {}
        return httpx.Client(base_url=self.base_url, headers=headers, timeout=30)

    def logs(self) -> str:
        parts = [f"--- api\n{self.api.tail()}" if self.api else ""]
        parts += [f"--- {w.log_path.name}\n{w.tail()}" for w in self.workers]
        return "\n".join(parts)

    def stop(self) -> None:
        for proc in self.workers:
            proc.stop()
        if self.api is not None:
            self.api.stop()


@contextmanager
def started_stack(home: Path, backend: str, env: dict[str, str], workers: int = 1, supervised: bool = False
                  ) -> Iterator[Stack]:
    """A Stack with ``workers`` workers and the API started; on exit all stopped and a PostgreSQL schema dropped."""
    stack = Stack(home, backend, env)
    try:
        for _ in range(workers):
            stack.start_worker(supervised=supervised)
        stack.start_api()
        yield stack
    finally:
        stack.stop()
        if backend == "postgres":
            drop_schema(env["DISTILL_DB_SCHEMA"])


def wait_until(predicate: Callable[[], T], timeout: float = 60, interval: float = 0.1, what: str = "condition") -> T:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout} s waiting for {what}")


def wait_for_job(client: httpx.Client, job_id: str, statuses: tuple[str, ...] = ("succeeded", "failed", "cancelled"),
                 timeout: float = 90, stack: Stack | None = None) -> dict:
    def done() -> dict | None:
        job = client.get(f"/jobs/{job_id}").raise_for_status().json()
        return job if job["status"] in statuses else None

    try:
        return wait_until(done, timeout=timeout, interval=0.1, what=f"job {job_id} to reach {statuses}")
    except AssertionError as exc:
        raise AssertionError(f"{exc}\n{stack.logs() if stack else ''}") from None


@pytest.fixture(scope="module", params=BACKENDS)
def stack(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    """API + one worker, per backend, shared by the tests of a module."""
    home = tmp_path_factory.mktemp(f"svc-{request.param}")
    with started_stack(home, request.param, service_env(home, request.param)) as stack:
        yield stack
