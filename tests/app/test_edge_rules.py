"""One rule at the edge: no client string reaches the file system, every parameter is checked at submission.

Runs the API in-process (FastAPI's TestClient, a SQLite store under a temporary home, no worker): whatever
these requests get accepted would stay queued, so a 4xx proves the value never became a job.
"""

from __future__ import annotations

import json
import random
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient

from distill.api_types import PROBLEM_CONTENT_TYPE
from distill.methods.registry import available_methods, param_problems

GOOD = {"dataset": "mnist", "method": "random", "ipc": 1, "params": {}, "max_per_class": 10}


@pytest.fixture(scope="module")
def client(tmp_path_factory: pytest.TempPathFactory) -> Iterator[TestClient]:
    from app.main import create_app
    from app.settings import ApiSettings
    from workers.settings import WorkerSettings

    home = tmp_path_factory.mktemp("edge-api")
    app = create_app(ApiSettings(api_keys=[], max_iterations=50_000),
                     WorkerSettings(database_url=f"sqlite:///{home / 'jobs.sqlite3'}"))
    with TestClient(app) as test_client:
        yield test_client


def string_parameters() -> list[tuple[str, str]]:
    """(method, parameter) for every parameter of every registered method that can take a string."""
    out = []
    for name, cls in available_methods().items():
        for key, prop in cls.Params.model_json_schema()["properties"].items():
            options = prop.get("anyOf", [prop])
            if any(o.get("type") == "string" or "enum" in o or "const" in o for o in options):
                out.append((name, key))
    return out


HOSTILE = ["/etc/passwd", "/etc/hostname", "../../../../etc/hostname", "..", "../", "~/.ssh/id_rsa", "~root",
           "/proc/self/environ", "file:///etc/passwd", "C:\\Windows\\win.ini", "\\\\server\\share", "/dev/zero",
           "stabilityai/sd-vae-ft-mse", "facebook/DiT-XL-2-256", "openai/clip-vit-base-patch32", "org/model",
           "hf://org/model", "https://example.invalid/w.safetensors", "s3://bucket/key", "./taef2", "taef2/../../x",
           "weights.safetensors", "model.pth", "convnet/../x", "auto/..", "none\x00", "\x00", "convnet\x00.pt",
           "a" * 300, "b" * 60_000, "convnet" + "-d1" * 40, "TAEF2", " taef2", "taef2 ", "convnet\n", "%2e%2e%2f",
           "..%2f..%2fetc", "${HOME}", "$(id)", "`id`", "|id", ";id"]


def probes(count: int, seed: int = 0) -> list[str]:
    """``count`` hostile strings: the fixed ones, then random mixtures of their parts (paths, hub ids,
    traversal, NUL and other control characters, long runs)."""
    rng = random.Random(seed)
    parts = ["/", "..", "../", "~", "\\", "\x00", "\x1f", "\x7f", "org/", "model", "etc", "passwd", ".safetensors",
             ".pth", "taef2", "convnet", "auto", "color", "_", "-", ":", "%00", "\u202e", "é", " "]
    out = list(HOSTILE)
    while len(out) < count:
        text = "".join(rng.choice(parts) for _ in range(rng.randint(1, 8)))
        if rng.random() < 0.05:
            text *= rng.randint(50, 2000)
        if any(c in text for c in "/\\\x00~") or len(text) > 256 or ".." in text:
            out.append(text)
    return out


def test_every_string_parameter_refuses_paths_hub_ids_traversal_nul_and_long_text(client: TestClient) -> None:
    targets = string_parameters()
    assert {("dq", "teacher_weights"), ("oq", "encoder"), ("dm", "dsa_strategy"), ("dd", "model")} <= set(targets)
    values = probes(1000)
    methods = available_methods()
    accepted_model, accepted_http = [], []
    for i, value in enumerate(values):
        for method, key in targets:
            params, problems = param_problems(methods[method], {key: value})
            if params is not None:
                accepted_model.append((method, key, value[:60]))
        method, key = targets[i % len(targets)]  # each probe once over HTTP, the parameters in turn
        response = client.post("/jobs", json={**GOOD, "method": method, "params": {key: value}})
        if not 400 <= response.status_code < 500:
            accepted_http.append((method, key, value[:60], response.status_code))
        else:
            assert response.headers["content-type"] == PROBLEM_CONTENT_TYPE
    assert len(values) >= 1000
    assert not accepted_model, accepted_model[:10]
    assert not accepted_http, accepted_http[:10]
    assert client.get("/jobs").json()["data"] == []  # nothing was queued


@pytest.mark.parametrize("value", ["100", True, 1.5, "1e3", None, [1], {"a": 1}])
def test_integer_parameters_are_strict(client: TestClient, value: Any) -> None:
    response = client.post("/jobs", json={**GOOD, "method": "dm", "params": {"iterations": value}})
    assert response.status_code == 422, response.text
    assert [e["loc"] for e in response.json()["errors"]] == [["body", "params", "iterations"]]


def test_strings_from_the_cli_are_converted_but_http_json_is_taken_as_typed() -> None:
    dm = available_methods()["dm"]
    params, problems = param_problems(dm, {"iterations": "100", "lr_img": "0.5", "init": "noise"}, paths=True)
    assert params is not None and params.iterations == 100 and not problems  # type: ignore[attr-defined]
    assert param_problems(dm, {"iterations": "100"})[0] is None
    assert param_problems(dm, {"lr_img": 1})[0] is not None  # an integer is a fine number


@pytest.mark.parametrize(("params", "kind"), [
    ({"dsa_strategy": "colour_jitter"}, "unknown_dsa_strategy"),
    ({"model": "resnet50"}, "unknown_network"),
    ({"dsa_strategy": "color_crop\x00"}, "control_character"),
])
def test_a_bad_strategy_or_network_is_a_4xx_at_submit_not_a_failed_job(client: TestClient, params: dict,
                                                                       kind: str) -> None:
    response = client.post("/jobs", json={**GOOD, "method": "dm", "params": params})
    assert response.status_code == 422, response.text
    error, = response.json()["errors"]
    assert error["type"] == kind and error["loc"][:2] == ["body", "params"]
    assert len(error["msg"]) < 300


def test_all_problems_of_a_request_in_one_response(client: TestClient) -> None:
    """Core fields (rejected by FastAPI) and method parameters (rejected by the core) together."""
    body = {**GOOD, "method": "herding", "ipc": 0, "params": {"batch_size": "abc", "model": "/etc/passwd"}}
    response = client.post("/jobs", json=body)
    assert response.status_code == 422
    locs = sorted(tuple(e["loc"]) for e in response.json()["errors"])
    assert locs == [("body", "ipc"), ("body", "params", "batch_size"), ("body", "params", "model")]
    assert response.json()["detail"].startswith("3 fields were rejected")
    both = client.post("/jobs", json={**GOOD, "dataset": "nope", "seed": -1, "params": {"bogus": 1}}).json()
    assert sorted(tuple(e["loc"]) for e in both["errors"]) == [("body", "dataset"), ("body", "params", "bogus"),
                                                                ("body", "seed")]


def test_methods_document_every_string_parameter(client: TestClient) -> None:
    """GET /methods shows each string parameter's rule: an enum, a pattern, or the registered names."""
    for method in client.get("/methods").json():
        for key, prop in method["parameters"]["properties"].items():
            for option in prop.get("anyOf", [prop]):
                if option.get("type") == "string":
                    fixed = "enum" in option or "const" in option
                    assert fixed or "pattern" in option or option.get("x-registered-name"), (method["name"], key)
                    assert fixed or option.get("maxLength", 10**9) <= 256, (method["name"], key)


def test_probe_list_is_deterministic_and_hostile() -> None:
    values = probes(1000)
    assert values == probes(1000) and len(set(values)) > 900
    assert json.dumps(values)  # JSON-able: what a client can send
    assert Path("/etc/passwd").as_posix() in values
