"""Relative ``DISTILL_*`` paths mean "relative to where they were given" (the working directory for the
environment, the file's folder for a TOML config): the product resolves them once, and every process it starts
afterwards (a server, a CLI child, a worker) sees the same absolute folder, whatever its own working directory."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import httpx

from distill.config import absolutize_environment

REPO = Path(__file__).resolve().parents[2]

# Run in a parent process whose working directory is `tmp` and whose DISTILL_DATA_DIR is relative: importing the
# product resolves it; the children below are started from "/" and only inherit the environment.
LAUNCHER = r"""
import json, os, socket, subprocess, sys, time
import distill.config  # noqa: F401 - what every entry point of the product imports first

with socket.socket() as sock:
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
server = subprocess.Popen([sys.executable, "-m", "distill.cli", "api", "--port", str(port), "--no-access-log"],
                          cwd="/", stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
child = subprocess.run([sys.executable, "-m", "distill.cli", "config", "--json"], cwd="/", capture_output=True,
                       text=True, check=True)
listed = subprocess.run([sys.executable, "-m", "distill.cli", "datasets", "--json"], cwd="/", capture_output=True,
                        text=True, check=True)
print(json.dumps({"port": port, "pid": server.pid, "env": os.environ["DISTILL_DATA_DIR"],
                  "child": json.loads(child.stdout)["data_dir"],
                  "child_datasets": {d["name"]: d["available"] for d in json.loads(listed.stdout)}}))
"""


def test_relative_environment_paths_become_absolute_against_the_working_directory(tmp_path: Path) -> None:
    env = {"DISTILL_DATA_DIR": "data", "DISTILL_HOME": "~/x", "DISTILL_WEIGHTS_DIR": "/abs/weights",
           "DISTILL_DATABASE_URL": "sqlite:///jobs.db", "DISTILL_CONFIG": "../conf/c.toml"}
    cwd = os.getcwd()
    absolutize_environment(env)
    assert env == {"DISTILL_DATA_DIR": os.path.join(cwd, "data"), "DISTILL_HOME": "~/x",
                   "DISTILL_WEIGHTS_DIR": "/abs/weights", "DISTILL_DATABASE_URL": f"sqlite:///{cwd}/jobs.db",
                   "DISTILL_CONFIG": os.path.abspath(os.path.join(cwd, "..", "conf", "c.toml"))}


def test_a_toml_config_reads_relative_paths_against_its_own_folder(tmp_path: Path) -> None:
    (tmp_path / "conf").mkdir()
    (tmp_path / "conf" / "distill.toml").write_text('data_dir = "data"\nweights_dir = "../weights"\n')
    env = {k: v for k, v in os.environ.items() if k not in ("DISTILL_DATA_DIR", "DISTILL_WEIGHTS_DIR")}
    env.update(DISTILL_CONFIG="conf/distill.toml", PYTHONPATH=str(REPO))
    out = subprocess.run([sys.executable, "-m", "distill.cli", "config", "--json"], cwd=tmp_path, env=env,
                         capture_output=True, text=True, check=True)
    resolved = json.loads(out.stdout)
    assert resolved["data_dir"] == str(tmp_path.resolve() / "conf" / "data")
    assert resolved["weights_dir"] == str(tmp_path.resolve() / "conf" / "../weights")
    assert resolved["config"] == str(tmp_path / "conf" / "distill.toml")


def test_service_and_subprocess_started_elsewhere_see_the_same_relative_data(tmp_path: Path) -> None:
    data = tmp_path / "data"
    data.mkdir()
    (data / "mnist").symlink_to(Path(os.environ["DISTILL_DATA_DIR"]).resolve() / "mnist")
    env = {k: v for k, v in os.environ.items() if not k.startswith("DISTILL_")}
    env.update(DISTILL_DATA_DIR="data", DISTILL_HOME="home", DISTILL_FASHION_MNIST_DIR="no-fashion",
               PYTHONPATH=str(REPO), OMP_NUM_THREADS="1")
    launched = subprocess.run([sys.executable, "-c", LAUNCHER], cwd=tmp_path, env=env, capture_output=True,
                              text=True, timeout=120)
    assert launched.returncode == 0, launched.stderr
    seen = json.loads(launched.stdout)
    try:
        assert seen["env"] == seen["child"] == str(data)
        assert seen["child_datasets"]["mnist"] is True and seen["child_datasets"]["cifar10"] is False
        deadline = time.monotonic() + 60
        while True:
            try:
                listed = httpx.get(f"http://127.0.0.1:{seen['port']}/datasets", timeout=5).json()
                break
            except httpx.HTTPError:
                assert time.monotonic() < deadline, "the API did not start"
                time.sleep(0.3)
        assert {d["name"]: d["available"] for d in listed} == seen["child_datasets"]
        assert (tmp_path / "home").is_dir()  # DISTILL_HOME=home meant tmp/home for the server in "/" too
    finally:
        os.kill(seen["pid"], 15)
