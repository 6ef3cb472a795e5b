"""Operations endpoints (issue 13 items 5 and 10): a job store that cannot write answers 503 with a reason, not a
bare 500; /healthz checks the storage under DISTILL_HOME; with API keys configured, /healthz without a key says
only whether the service is alive and /metrics needs a key."""

from __future__ import annotations

import resource
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from service_support.helpers import KEY_A, Stack, service_env, started_stack

GOOD = {"dataset": "mnist", "method": "random", "ipc": 1, "max_per_class": 10}


@pytest.fixture
def api(tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[Stack]:
    extra = getattr(request, "param", {})
    with started_stack(tmp_path, "sqlite", service_env(tmp_path, "sqlite", **extra), workers=0) as stack:
        yield stack


def test_a_store_that_cannot_write_is_503_with_a_reason(api: Stack) -> None:
    assert api.api is not None
    with api.client() as client:
        assert client.post("/jobs", json=GOOD).status_code == 202
        files = [p for p in api.home.glob("jobs.sqlite3*") if p.is_file()]
        limit = max(p.stat().st_size for p in files)
        resource.prlimit(api.api.pid, resource.RLIMIT_FSIZE, (limit, resource.RLIM_INFINITY))  # a full disk
        try:
            statuses = [client.post("/jobs", json={**GOOD, "seed": i}) for i in range(1, 30)]
        finally:
            resource.prlimit(api.api.pid, resource.RLIMIT_FSIZE, (resource.RLIM_INFINITY, resource.RLIM_INFINITY))
        refused = [r for r in statuses if r.status_code != 202]
        assert refused, "the size limit never hit"
        assert {r.status_code for r in refused} == {503}, [(r.status_code, r.text) for r in refused]
        assert refused[0].json()["detail"].endswith("retry later") and "/" not in refused[0].json()["detail"]
        assert refused[0].headers["retry-after"] == "30"
        assert client.post("/jobs", json={**GOOD, "seed": 99}).status_code == 202  # space again: it recovers


def test_healthz_and_metrics_need_a_key_for_details(api: Stack) -> None:
    with httpx.Client(base_url=api.base_url) as anonymous:
        assert anonymous.get("/healthz").json() == {"status": "ok"}
        assert anonymous.get("/metrics").status_code == 401
    with api.client() as client:
        health = client.get("/healthz").json()
        assert health["status"] == "ok" and health["database"] == "ok" and health["storage"] == "ok"
        assert {"version", "queued", "running"} <= set(health)
        assert client.get("/metrics").status_code == 200


@pytest.mark.parametrize("api", [{"DISTILL_MIN_FREE_BYTES": str(10**18)}], indirect=True)
def test_healthz_reports_low_space(api: Stack) -> None:
    with httpx.Client(base_url=api.base_url, headers={"Authorization": f"Bearer {KEY_A}"}) as client:
        response = client.get("/healthz")
    assert response.status_code == 503
    assert response.json()["status"] == "degraded" and response.json()["storage"] == "low_space"


@pytest.mark.parametrize("api", [{"DISTILL_API_KEYS": ""}, {}], indirect=True, ids=["no-keys", "keys"])
def test_openapi_declares_bearer_auth_only_with_keys(api: Stack) -> None:
    keys = bool(api.env["DISTILL_API_KEYS"])
    with httpx.Client(base_url=api.base_url) as client:
        schema = client.get("/openapi.json").json()
    assert bool(schema["paths"]["/jobs"]["post"].get("security")) == keys
    assert ("securitySchemes" in schema.get("components", {})) == keys
    body = schema["components"]["schemas"]["JobCreate"]["properties"]
    assert {"mnist", "cifar10"} <= set(body["dataset"]["enum"]) and {"oq", "dm", "slow-test"} <= set(body["method"]["enum"])
