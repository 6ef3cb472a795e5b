"""Datasets over HTTP (issue 13 items 12 and 13): POST /jobs refuses a registered dataset whose files the server
does not have (422 naming the available ones, no server path), /datasets says which are available, and an
operator registers ImageFolder datasets by name (DISTILL_DATASETS) that clients then use like the built-in ones."""

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
            assert error["msg"] == f"dataset '{name}' is not available on this server; available: mnist, tiny"
        assert client.get("/jobs").json()["data"] == []


def test_datasets_says_which_are_available(data_stack: Stack) -> None:
    with data_stack.client() as client:
        listed = {d["name"]: d for d in client.get("/datasets").json()}
    assert {n: d["available"] for n, d in listed.items()} == {
        "mnist": True, "fashion-mnist": False, "cifar10": False, "cifar100": False, "imagenet": False, "tiny": True}
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
