"""Errors are RFC 9457 problem details everywhere in the API, and the OpenAPI schema says so; the page and the
offline /docs are served by the API itself."""

from __future__ import annotations

import httpx
import pytest

from distill.api_types import PROBLEM_CONTENT_TYPE, Problem

from .conftest import KEY, QUICK, Server


@pytest.fixture()
def http(server: Server) -> httpx.Client:
    with httpx.Client(base_url=server.url, headers={"Authorization": f"Bearer {KEY}"}, timeout=30) as client:
        yield client


def problem(response: httpx.Response, status: int) -> Problem:
    assert response.status_code == status, response.text
    assert response.headers["content-type"] == PROBLEM_CONTENT_TYPE
    body = Problem.model_validate(response.json())
    assert body.status == status and body.title and body.type
    return body


def test_every_error_is_a_problem(server: Server, http: httpx.Client) -> None:
    rejected = problem(http.post("/jobs", json={**QUICK, "ipc": 0, "surprise": 1}), 422)
    assert {tuple(e.loc) for e in rejected.errors} == {("body", "ipc"), ("body", "surprise")}
    assert {e.pointer for e in rejected.errors} == {"/ipc", "/surprise"}
    assert rejected.detail and rejected.detail.startswith("2 fields were rejected")
    params = problem(http.post("/jobs", json={**QUICK, "params": {"bogus": 1}}), 422)  # checked by the core
    assert [e.loc for e in params.errors] == [["body", "params", "bogus"]]
    assert problem(http.post("/jobs", content=b"{not json", headers={"content-type": "application/json"}), 422).errors
    assert problem(http.get("/jobs", params={"limit": 0}), 422).errors[0].loc == ["query", "limit"]
    assert problem(http.get("/jobs/job_doesnotexist"), 404).detail == "no job job_doesnotexist"
    assert problem(http.get("/nowhere"), 404).detail == "no route GET /nowhere"
    not_allowed = http.delete("/jobs")
    assert problem(not_allowed, 405) and not_allowed.headers["allow"] == "GET, POST"
    wrong = httpx.get(server.url + "/jobs", headers={"Authorization": "Bearer nope"})
    assert problem(wrong, 401).detail == "missing or invalid API key" and wrong.headers["www-authenticate"] == "Bearer"
    big = problem(http.post("/jobs", json={**QUICK, "params": {"x": "y" * 70_000}}), 413)
    assert "larger than" in (big.detail or "")
    queued = http.post("/jobs", json={**QUICK, "max_per_class": 5, "ipc": 1}).json()
    conflict = http.get(f"/jobs/{queued['id']}/artifact")
    assert conflict.status_code in (409, 200)  # 409 while it is not finished
    if conflict.status_code == 409:
        problem(conflict, 409)


def test_openapi_documents_problems(http: httpx.Client) -> None:
    schema = http.get("/openapi.json").json()
    assert "Problem" in schema["components"]["schemas"] and "HTTPValidationError" not in schema["components"]["schemas"]
    documented = 0
    for path, item in schema["paths"].items():
        for method, operation in item.items():
            for code, response in operation["responses"].items():
                if code.startswith(("4", "5")) and code != "503":  # /healthz's 503 is its Health body
                    content = response.get("content", {})
                    assert list(content) == [PROBLEM_CONTENT_TYPE], (method, path, code, content)
                    assert content[PROBLEM_CONTENT_TYPE]["schema"] == {"$ref": "#/components/schemas/Problem"}
                    documented += 1
    assert documented > 10
    stream = schema["paths"]["/jobs/{job_id}/stream"]["get"]["responses"]["200"]["content"]
    assert "text/event-stream" in stream


def test_page_and_offline_docs_are_served(http: httpx.Client) -> None:
    page = http.get("/")
    assert page.status_code == 200 and "<title>distillery</title>" in page.text
    for asset in ("/static/app.js", "/static/style.css", "/static/swagger/swagger-ui-bundle.js",
                  "/static/swagger/swagger-ui.css"):
        assert http.get(asset).status_code == 200, asset
    docs = http.get("/docs").text
    assert "/static/swagger/swagger-ui-bundle.js" in docs and "cdn" not in docs.lower()
    assert http.get("/redoc").status_code == 404  # it would need a CDN


def test_every_problem_of_a_submission_in_one_response_and_one_cli_line_each(server: Server,
                                                                            http: httpx.Client) -> None:
    """Core fields (FastAPI) and method parameters (the core) are reported together: API, then CLI."""
    body = {**QUICK, "method": "herding", "ipc": 0, "params": {"batch_size": "abc", "model": "../../etc/passwd"}}
    rejected = problem(http.post("/jobs", json=body), 422)
    assert sorted(e.pointer for e in rejected.errors) == ["/ipc", "/params/batch_size", "/params/model"]
    proc = server.cli("submit", "herding", "-d", "mnist", "--ipc", "0", "--set", "batch_size=abc",
                      "--set", "dsa=1")
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 3 and all(line.startswith("error: ") for line in lines), lines
    assert any("ipc" in line for line in lines) and any("batch_size" in line for line in lines)
    assert any("unknown parameter 'dsa'" in line for line in lines)


def test_security_headers_on_the_page(http: httpx.Client) -> None:
    page = http.get("/")
    assert page.headers["x-content-type-options"] == "nosniff"
    assert "script-src 'self';" in page.headers["content-security-policy"]
