"""A real `distill serve` (API + one local worker, SQLite, API keys) on a free loopback port, shared by the
interface tests: the Python client, the CLI commands against a server, and the web page in a real browser."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
from service_support.helpers import free_port

KEY = "interfaces-test-key"
OTHER_KEY = "interfaces-other-key"
QUICK = {"method": "random", "dataset": "mnist", "ipc": 2, "max_per_class": 20}
# A job that runs long enough to watch (and to cancel): DM with few iterations, no compilation.
SLOW_PARAMS = {"iterations": 100_000, "compile_real": "off", "compile_syn": "off", "batch_real": 8}


@dataclass
class Server:
    url: str
    home: Path
    env: dict[str, str]
    process: subprocess.Popen
    log: Path

    def tail(self, lines: int = 40) -> str:
        return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:])

    def cli(self, *args: str, key: str | None = KEY, timeout: float = 180, **env: str) -> subprocess.CompletedProcess:
        """Run `distill ARGS` against this server (DISTILL_SERVER / DISTILL_API_KEY from the environment)."""
        full = {**self.env, "DISTILL_SERVER": self.url, **env}
        full.pop("DISTILL_API_KEY", None)
        if key is not None:
            full["DISTILL_API_KEY"] = key
        distill = Path(sys.executable).with_name("distill")
        return subprocess.run([str(distill), *args], env=full, capture_output=True, text=True, timeout=timeout,
                              cwd=self.home)


def server_env(home: Path, **extra: str) -> dict[str, str]:
    env = dict(os.environ)
    for key in ("DISTILL_DATABASE_URL", "DISTILL_DB_SCHEMA", "DISTILL_CONFIG", "DISTILL_SERVER", "DISTILL_API_KEY"):
        env.pop(key, None)
    env.update(DISTILL_HOME=str(home), DISTILL_API_KEYS=f"{KEY},{OTHER_KEY}", DISTILL_HEARTBEAT_SECONDS="0.5",
               DISTILL_POLL_SECONDS="0.2", DISTILL_DEVICE="cpu", OMP_NUM_THREADS="1", DISTILL_NUM_THREADS="1",
               PYTHONUNBUFFERED="1")
    env.update(extra)
    return env


def start_server(home: Path, *args: str, **extra: str) -> Server:
    home.mkdir(parents=True, exist_ok=True)
    port = free_port()
    env = server_env(home, **extra)
    log = home / "serve.log"
    distill = Path(sys.executable).with_name("distill")
    with open(log, "wb") as handle:
        process = subprocess.Popen([str(distill), "serve", "--port", str(port), "--no-access-log", *args], env=env,
                                   stdout=handle, stderr=subprocess.STDOUT, start_new_session=True)
    server = Server(f"http://127.0.0.1:{port}", home, env, process, log)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"distill serve exited with {process.returncode}:\n{server.tail()}")
        try:
            if httpx.get(server.url + "/healthz", timeout=2).status_code == 200:
                return server
        except httpx.HTTPError:
            pass
        time.sleep(0.3)
    stop_server(server)
    raise RuntimeError(f"distill serve did not become healthy:\n{server.tail()}")


def stop_server(server: Server) -> None:
    if server.process.poll() is None:
        os.killpg(server.process.pid, signal.SIGTERM)
        try:
            server.process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(server.process.pid, signal.SIGKILL)
            server.process.wait(timeout=10)


def image_folder(root: Path, classes: tuple[str, ...] = ("daisy", "rose", "tulip"), per_class: int = 6) -> Path:
    """A small ImageFolder tree (train/ and test/) of 16 px PNGs, one colour family per class."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    for split, count in (("train", per_class), ("test", 2)):
        for k, name in enumerate(classes):
            folder = root / split / name
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(count):
                pixels = rng.integers(0, 80, (16, 16, 3), dtype=np.uint8)
                pixels[..., k] += 150
                Image.fromarray(pixels).save(folder / f"{i:03d}.png")
    return root


@pytest.fixture(scope="session")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    folder = image_folder(tmp_path_factory.mktemp("tiny-folder"))
    here = Path(__file__).resolve().parent
    running = start_server(tmp_path_factory.mktemp("interfaces-serve"), DISTILL_PLUGINS="site_datasets,site_methods",
                           INTERFACES_TEST_FOLDER=str(folder),
                           PYTHONPATH=os.pathsep.join(filter(None, [str(here), os.environ.get("PYTHONPATH")])))
    try:
        yield running
    finally:
        stop_server(running)
