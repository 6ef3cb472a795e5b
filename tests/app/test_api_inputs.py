"""Every bad input gets a 4xx with field errors and queues nothing; schemathesis fuzzes the OpenAPI schema.

The API runs alone here (no worker), so anything accepted would stay visible as a queued job.
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from service_support.helpers import KEY_A, KEY_B, Proc, Stack, service_env, started_stack, wait_until

GOOD = {"dataset": "mnist", "method": "random", "ipc": 1, "params": {}, "max_per_class": 10}


@pytest.fixture(scope="module")
def api(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    home = tmp_path_factory.mktemp("svc-inputs")
    with started_stack(home, "sqlite", service_env(home, "sqlite", DISTILL_MAX_ITERATIONS="50000"), workers=0) as stack:
        yield stack


BAD_BODIES = [
    ({**GOOD, "ipc": 0}, ["body", "ipc"]),
    ({**GOOD, "ipc": -3}, ["body", "ipc"]),
    ({**GOOD, "ipc": 6000, "max_per_class": None}, ["body", "ipc"]),  # above MNIST's smallest class (5421)
    ({**GOOD, "ipc": 11}, ["body", "ipc"]),  # above max_per_class
    ({**GOOD, "ipc": "2"}, ["body", "ipc"]),
    ({**GOOD, "ipc": 2.5}, ["body", "ipc"]),
    ({**GOOD, "ipc": True}, ["body", "ipc"]),
    ({**GOOD, "dataset": "nope"}, ["body", "dataset"]),
    ({**GOOD, "dataset": "imagefolder:/etc"}, ["body", "dataset"]),
    ({**GOOD, "dataset": "../../mnist"}, ["body", "dataset"]),
    ({**GOOD, "method": "nope"}, ["body", "method"]),
    ({**GOOD, "method": "../x"}, ["body", "method"]),
    ({**GOOD, "params": {"bogus": 1}}, ["body", "params", "bogus"]),
    ({**GOOD, "method": "herding", "params": {"batch_size": "big"}}, ["body", "params", "batch_size"]),
    ({**GOOD, "method": "herding", "params": {"features": "pixels"}}, ["body", "params", "features"]),
    ({**GOOD, "params": []}, ["body", "params"]),
    ({**GOOD, "seed": -1}, ["body", "seed"]),
    ({**GOOD, "max_per_class": 0}, ["body", "max_per_class"]),
    ({**GOOD, "surprise": 1}, ["body", "surprise"]),
    ({k: v for k, v in GOOD.items() if k != "method"}, ["body", "method"]),
    # Budgets are bounded (issue 13 item 3): per method, and by the operator's ceiling on iterations.
    ({**GOOD, "method": "dm", "params": {"iterations": 10**12}}, ["body", "params", "iterations"]),
    ({**GOOD, "method": "dm", "params": {"iterations": 60_000}}, ["body", "params", "iterations"]),
    ({**GOOD, "method": "mtt", "params": {"syn_steps": 10**9}}, ["body", "params", "syn_steps"]),
    ({**GOOD, "method": "herding", "params": {"teacher_epochs": 10**7}}, ["body", "params", "teacher_epochs"]),
    ({**GOOD, "method": "oq", "params": {"steps": 10**6}}, ["body", "params", "steps"]),
]


def _count(client: httpx.Client) -> int:
    return len(client.get("/jobs", params={"limit": 100}).raise_for_status().json()["data"])


@pytest.mark.parametrize(("body", "loc"), BAD_BODIES, ids=[str(i) for i in range(len(BAD_BODIES))])
def test_bad_bodies_are_422_with_field_errors(api: Stack, body: dict, loc: list) -> None:
    with api.client() as client:
        before = _count(client)
        response = client.post("/jobs", json=body)
        assert response.status_code == 422, response.text
        assert loc in [e["loc"] for e in response.json()["errors"]], response.json()
        assert _count(client) == before


def test_other_bad_requests(api: Stack) -> None:
    with api.client() as client:
        before = _count(client)
        assert client.post("/jobs", content=b"{not json", headers={"content-type": "application/json"}).status_code == 422
        big = {**GOOD, "params": {"x" * 10: "y" * 70_000}}
        assert client.post("/jobs", json=big).status_code == 413

        def chunks() -> Iterator[bytes]:  # no Content-Length: the limit is counted while streaming
            yield b'{"dataset": "mnist", "method": "random", "ipc": 1, "params": {"a": "'
            for _ in range(100):
                yield b"z" * 1000
            yield b'"}}'

        streamed = client.post("/jobs", content=chunks(), headers={"content-type": "application/json"})
        assert streamed.status_code == 413
        assert client.post("/jobs", json=GOOD, headers={"Idempotency-Key": "k" * 300}).status_code == 422
        assert _count(client) == before
        assert client.get("/jobs", params={"limit": 0}).status_code == 422
        assert client.get("/jobs", params={"limit": 1000}).status_code == 422
        assert client.get("/jobs", params={"status": "exploded"}).status_code == 422
        assert client.get("/jobs", params={"after": "job_doesnotexist"}).status_code == 422
        assert client.get("/jobs/job_doesnotexist").status_code == 404
        assert client.get("/jobs/job_doesnotexist/events").status_code == 404
        assert client.post("/jobs/job_doesnotexist/cancel").status_code == 404
        accepted = client.post("/jobs", json=GOOD)
        assert accepted.status_code == 202
        job_id = accepted.json()["id"]
        assert client.get(f"/jobs/{job_id}/events", params={"after": -1}).status_code == 422
        assert client.get(f"/jobs/{job_id}/artifact").status_code == 409  # queued: no archive yet
        assert client.get(f"/jobs/{job_id}/preview.png").status_code == 409
        assert client.delete(f"/jobs/{job_id}").status_code == 409  # queued: cancel it first
        assert client.put(f"/jobs/{job_id}").status_code == 405


def test_non_finite_floats_are_refused(api: Stack) -> None:
    """Issue 13 item 4: 1e400 parses as infinity; it is a 422, never stored as Infinity."""
    with api.client() as client:
        before = _count(client)
        for raw in (b"1e400", b"-1e400"):
            body = b'{"dataset": "mnist", "method": "dm", "ipc": 1, "max_per_class": 10, "params": {"lr_img": ' + raw + b"}}"
            response = client.post("/jobs", content=body, headers={"content-type": "application/json"})
            assert response.status_code == 422, response.text
            assert ["body", "params", "lr_img"] in [e["loc"] for e in response.json()["errors"]]
        assert _count(client) == before


def test_catalogue(api: Stack) -> None:
    with httpx.Client(base_url=api.base_url) as client:
        datasets = client.get("/datasets").json()
        assert {"mnist", "cifar10"} <= {d["name"] for d in datasets}
        assert all("/" not in str(d) or "(" in d["description"] for d in datasets)  # names, never paths
        methods = {m["name"]: m for m in client.get("/methods").json()}
        assert {"random", "herding", "kcenter"} <= set(methods)
        herding = methods["herding"]["parameters"]
        assert herding["properties"]["batch_size"]["default"] == 500
        assert herding["additionalProperties"] is False
        assert methods["dm"]["parameters"]["properties"]["iterations"]["maximum"] == 50_000  # the operator's ceiling
        assert herding["properties"]["teacher_epochs"]["maximum"] == 10_000
        for method in methods.values():  # each device a parameter names ("x-device"), with whether this host has it
            named = {p["x-device"] for p in method["parameters"]["properties"].values() if "x-device" in p}
            assert set(method["devices"]) == named and all(isinstance(v, bool) for v in method["devices"].values())


def test_schemathesis_finds_no_server_errors_or_schema_violations(api: Stack, tmp_path: Path) -> None:
    schemathesis = Path(sys.executable).parent / "schemathesis"
    command = [
        str(schemathesis), "run", f"{api.base_url}/openapi.json", "-H", f"Authorization: Bearer {KEY_B}",
        "--checks", "all", "--exclude-checks", "positive_data_acceptance",
        "--max-examples", "8", "--workers", "1", "--seed", "1", "--no-color", "--request-timeout", "20",
        "--generation-database", "none",
        "--exclude-path", "/jobs/{job_id}/stream",  # a live stream lasts as long as its job: not for fuzzing
    ]
    result = subprocess.run(command, capture_output=True, text=True, timeout=240, cwd=tmp_path,  # caches go there
                            env={**os.environ, "NO_COLOR": "1"})
    assert result.returncode == 0, result.stdout[-6000:] + result.stderr[-2000:]


def test_refuses_to_bind_beyond_loopback_without_keys(api: Stack, tmp_path: Path) -> None:
    env = service_env(tmp_path, "sqlite", DISTILL_API_KEYS="")
    proc = Proc(["api", "--host", "0.0.0.0", "--port", "1"], env, tmp_path / "refused.log").start()
    assert proc.process is not None
    assert proc.process.wait(timeout=90) != 0
    assert "refusing to bind 0.0.0.0 without API keys" in " ".join(proc.tail().split())
    with httpx.Client(base_url=api.base_url, headers={"Authorization": f"Bearer {KEY_A}"}) as client:
        wait_until(lambda: client.get("/healthz").status_code == 200, timeout=5)


def test_the_cores_problems_are_the_apis_field_errors(api: Stack) -> None:
    """One validation path: what distill.runner.check_request finds is what POST /jobs answers, as 422 field
    errors under `body` (and what `distill run` prints as one line)."""
    from distill.errors import InvalidRequest
    from distill.runner import RunRequest, check_request

    params = {"bogus": 1, "batch_size": "x"}
    body = {"dataset": "mnist", "method": "herding", "ipc": 6, "max_per_class": 5, "params": params}
    with pytest.raises(InvalidRequest) as core:
        check_request(RunRequest("mnist", "herding", 6, params, max_per_class=5, paths=False), max_ipc=1000)
    assert len(core.value.problems) == 3
    with api.client() as client:
        response = client.post("/jobs", json=body)
    assert response.status_code == 422, response.text
    detail = [(e["loc"], e["msg"], e["type"]) for e in response.json()["errors"]]
    assert detail == [(["body", *p["loc"]], p["msg"], p["type"]) for p in core.value.problems]
    assert ["body", "params", "bogus"] in [d[0] for d in detail] and ["body", "ipc"] in [d[0] for d in detail]
