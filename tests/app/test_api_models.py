"""Model parameters over HTTP (issue 13 item 1): `encoder`, `prior` and `sd` accept only the built-in encoders and
the names the operator registered (DISTILL_MODELS); never a server path or a hub id, checked at POST /jobs.
A registered model is loaded only from safetensors, and no error text shows a path of the server."""

from __future__ import annotations

import json
import shutil
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from service_support.helpers import Stack, service_env, started_stack, wait_for_job

OQ = {"dataset": "mnist", "method": "oq", "ipc": 1, "max_per_class": 5}


@pytest.fixture(scope="module")
def models_stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    home = tmp_path_factory.mktemp("svc-models")
    weights = home / "weights"
    shutil.copytree(Path(service_env(home, "sqlite")["DISTILL_WEIGHTS_DIR"]) / "taef2", weights / "taef2")
    (weights / "priors" / "tiny-dit" / "transformer").mkdir(parents=True)
    (weights / "priors" / "tiny-dit" / "transformer" / "diffusion_pytorch_model.safetensors").write_bytes(b"not a model")
    (weights / "pickled" / "transformer").mkdir(parents=True)
    (weights / "pickled" / "transformer" / "diffusion_pytorch_model.bin").write_bytes(b"pickle")
    from diffusers import AutoencoderKL  # a small random AutoencoderKL an operator registered as an encoder

    AutoencoderKL(block_out_channels=(8,), norm_num_groups=8, latent_channels=4).save_pretrained(weights / "site-vae")
    env = service_env(home, "sqlite", DISTILL_WEIGHTS_DIR=str(weights),
                      DISTILL_MODELS=json.dumps({"tiny-dit": "priors/tiny-dit", "pickled": "pickled",
                                                  "site-vae": "site-vae"}))
    with started_stack(home, "sqlite", env) as stack:
        yield stack


def field_error(response: httpx.Response, key: str) -> str:
    assert response.status_code == 422, response.text
    (error,) = [e for e in response.json()["errors"] if e["loc"] == ["body", "params", key]]
    return error["msg"]


@pytest.mark.parametrize(("params", "key"), [
    ({"encoder": "/srv/models/x"}, "encoder"),
    ({"encoder": "org/name"}, "encoder"),  # a hub id
    ({"encoder": "~"}, "encoder"),
    ({"decode": "diffusion", "prior": "/etc"}, "prior"),
    ({"decode": "diffusion", "prior": "../weights/taef2"}, "prior"),
])
def test_paths_and_hub_ids_are_refused_with_the_allowed_names(models_stack: Stack, params: dict, key: str) -> None:
    with models_stack.client() as client:
        before = client.get("/jobs").json()["data"]
        msg = field_error(client.post("/jobs", json={**OQ, "params": params}), key)
        assert msg.endswith("is not a model registered on this server; allowed: taef2, sd-vae, tiny-dit, pickled, site-vae")
        assert str(models_stack.home) not in msg and str(Path.home()) not in msg
        assert client.get("/jobs").json()["data"] == before  # nothing queued


def test_models_lists_names_never_paths(models_stack: Stack) -> None:
    with models_stack.client() as client:
        listed = client.get("/models").json()
    assert listed == [{"name": "taef2", "builtin": True}, {"name": "sd-vae", "builtin": True},
                      {"name": "tiny-dit", "builtin": False}, {"name": "pickled", "builtin": False},
                      {"name": "site-vae", "builtin": False}]


def test_errors_are_no_oracle_for_server_paths(models_stack: Stack) -> None:
    with models_stack.client() as client:
        messages = [field_error(client.post("/jobs", json={**OQ, "params": {"decode": "diffusion", "prior": p}}), "prior")
                    .replace(p, "P") for p in ("/etc", "/nonexistent", str(models_stack.home))]
        d4m = client.post("/jobs", json={**OQ, "method": "d4m", "params": {"decode": "sd-img2img", "sd": "/x",
                                                                         "encoder": "sd-vae"}})
        assert "allowed: taef2" in field_error(d4m, "sd")
    assert len(set(messages)) == 1


def test_registered_models_load_from_safetensors_only_and_errors_show_no_paths(models_stack: Stack) -> None:
    with models_stack.client() as client:
        pickled = client.post("/jobs", json={**OQ, "params": {"decode": "diffusion", "prior": "pickled"}})
        assert pickled.status_code == 202, pickled.text
        broken = client.post("/jobs", json={**OQ, "params": {"decode": "diffusion", "prior": "tiny-dit"}})
        assert broken.status_code == 202, broken.text
        job = wait_for_job(client, pickled.json()["id"], stack=models_stack)
        assert job["status"] == "failed"
        assert job["error"]["message"] == "model 'pickled' holds pickle weights (.bin); only safetensors are loaded"
        job = wait_for_job(client, broken.json()["id"], timeout=180, stack=models_stack)
        assert job["status"] == "failed", job  # not a real DiT: loading it fails after encode and k-means
        events = client.get(f"/jobs/{job['id']}/events", params={"limit": 1000}).json()["data"]
        texts = [job["error"]["message"], *(e["message"] for e in events)]
        assert not [t for t in texts if str(models_stack.home) in t or "/priors/" in t], texts
        assert "quantize" in [e["stage"] for e in events], texts
        assert job["error"]["message"].endswith(": <model tiny-dit>")  # it failed loading the prior, after encode and k-means


def test_a_registered_encoder_is_named_in_the_manifest_never_its_folder(models_stack: Stack) -> None:
    with models_stack.client() as client:
        submitted = client.post("/jobs", json={**OQ, "params": {"encoder": "site-vae", "refine_iterations": 0}})
        assert submitted.status_code == 202, submitted.text
        job = wait_for_job(client, submitted.json()["id"], stack=models_stack)
        assert job["status"] == "succeeded", job
        manifest = client.get(f"/jobs/{job['id']}/manifest").json()
    assert manifest["params"]["encoder"] == manifest["metrics"]["encoder"] == "site-vae"
    assert str(models_stack.home) not in json.dumps(manifest)
