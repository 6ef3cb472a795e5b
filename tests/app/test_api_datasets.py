"""Datasets over HTTP (issue 13 items 12 and 13): POST /jobs refuses a registered dataset whose files the server
does not have (422 naming the available ones, no server path), /datasets says which are available, and an
operator registers ImageFolder datasets by name (DISTILL_DATASETS) that clients then use like the built-in ones;
a registered dataset read from image files is offered at the sizes it lists as NAME@SIZE, and no other (issue 32)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from service_support.helpers import Stack, service_env, started_stack, wait_for_job

from distill.data.registry import IMAGENETTE_SIZE, IMAGENETTE_WNIDS, RESOLUTIONS


def write_imagefolder(root: Path, per_class: dict[str, int]) -> None:
    rng = np.random.default_rng(0)
    for split, scale in (("train", 1), ("val", 0)):
        for name, count in per_class.items():
            folder = root / split / name
            folder.mkdir(parents=True)
            for i in range(max(1, count * scale)):
                Image.fromarray(rng.integers(0, 255, (12, 12, 3), dtype=np.uint8)).save(folder / f"{i}.png")


@pytest.fixture(scope="module")
def data_stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    home = tmp_path_factory.mktemp("svc-datasets")
    data = home / "data"
    data.mkdir()
    (data / "mnist").symlink_to(Path(os.environ["DISTILL_DATA_DIR"]) / "mnist")  # mnist here; cifar10, imagenet not
    write_imagefolder(data / "tiny-folder", {"cats": 4, "dogs": 6})
    write_imagefolder(data / "imagenette" / "imagenette2-160", dict.fromkeys(IMAGENETTE_WNIDS, 2))
    env = service_env(home, "sqlite", DISTILL_DATA_DIR=str(data), DISTILL_DATASETS=json.dumps({"tiny": "tiny-folder"}),
                      DISTILL_FASHION_MNIST_DIR=str(home / "no-fashion"))
    with started_stack(home, "sqlite", env) as stack:
        yield stack


def test_jobs_for_data_the_server_lacks_are_refused(data_stack: Stack) -> None:
    with data_stack.client() as client:
        for name in ("imagenet", "cifar10"):
            response = client.post("/jobs", json={"dataset": name, "method": "random", "ipc": 1})
            assert response.status_code == 422, response.text
            (error,) = response.json()["errors"]
            assert error["loc"] == ["body", "dataset"]
            assert error["msg"] == f"dataset '{name}' is not available on this server; available: mnist, imagenette, tiny"
        assert client.get("/jobs").json()["data"] == []


def test_datasets_says_which_are_available(data_stack: Stack) -> None:
    with data_stack.client() as client:
        listed = {d["name"]: d for d in client.get("/datasets").json()}
    sized = {f"{name}@{size}": name == "imagenette" for name in ("imagenet", "imagenette") for size in RESOLUTIONS}
    assert {n: d["available"] for n, d in listed.items()} == {
        "mnist": True, "fashion-mnist": False, "cifar10": False, "cifar100": False, "imagenet": False,
        "imagenette": True, "tiny": True, **sized}
    assert (listed["imagenette"]["image_size"], listed["imagenette@64"]["image_size"]) == (IMAGENETTE_SIZE, 64)
    assert listed["tiny"]["num_classes"] == 2
    assert str(data_stack.home) not in json.dumps(listed)


def test_an_operator_dataset_is_used_by_name(data_stack: Stack, tmp_path: Path) -> None:
    with data_stack.client() as client:
        too_many = client.post("/jobs", json={"dataset": "tiny", "method": "random", "ipc": 5})
        assert too_many.status_code == 422
        assert too_many.json()["errors"][0]["msg"] == "ipc 5 is larger than the smallest class of tiny (4 training images)"
        created = client.post("/jobs", json={"dataset": "tiny", "method": "random", "ipc": 2})
        assert created.status_code == 202, created.text
        job = wait_for_job(client, created.json()["id"], stack=data_stack)
        assert job["status"] == "succeeded", job
    out = tmp_path / "tiny.tar"  # the CLI takes the same name
    done = subprocess.run([sys.executable, "-m", "distill.cli", "run", "random", "-d", "tiny", "--ipc", "2", "-o", str(out)],
                          env=data_stack.env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    from distill.archive import read_archive

    assert read_archive(out).manifest["dataset"]["classes"] == ["cats", "dogs"]


def test_a_registered_dataset_at_a_size(data_stack: Stack) -> None:
    """NAME@SIZE is one of the schema's enum values, runs at that size, and a size not offered is a 422."""
    with data_stack.client() as client:
        enum = client.get("/openapi.json").json()["components"]["schemas"]["JobCreate"]["properties"]["dataset"]["enum"]
        assert {"imagenette", "imagenette@64", "imagenette@128"} <= set(enum) and "imagenette@100" not in enum
        for name, message in (("imagenette@100", "no resolution '@100' for imagenette: choose imagenette@32, "
                                                 "imagenette@64, imagenette@128, imagenette@224"),
                              ("mnist@64", "mnist has a fixed resolution (28 px); @SIZE is for imagenet, imagenette")):
            response = client.post("/jobs", json={"dataset": name, "method": "random", "ipc": 1})
            assert response.status_code == 422, response.text
            (error,) = response.json()["errors"]
            assert error["loc"] == ["body", "dataset"] and error["msg"].startswith(message), error
        created = client.post("/jobs", json={"dataset": "imagenette@32", "method": "random", "ipc": 2})
        assert created.status_code == 202, created.text
        job = wait_for_job(client, created.json()["id"], stack=data_stack)
        assert job["status"] == "succeeded", job
        artifact = client.get(f"/jobs/{job['id']}/artifact")
    assert artifact.status_code == 200
    out = data_stack.home / "nette.tar"
    out.write_bytes(artifact.content)
    from distill.archive import read_archive

    archive = read_archive(out)
    assert archive.manifest["dataset"]["name"] == "imagenette@32"
    assert tuple(archive.distilled.images.shape) == (20, 3, 32, 32)
