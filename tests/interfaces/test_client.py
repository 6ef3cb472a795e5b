"""distill.client end to end against a real `distill serve` on loopback."""

from __future__ import annotations

import hashlib
import uuid
from pathlib import Path

import pytest
from service_support.helpers import wait_until

from distill.archive import load_dataset, read_archive
from distill.client import ChecksumMismatch, Client, InvalidRequest, JobFailed, NotFound, Unauthorized

from .conftest import KEY, OTHER_KEY, QUICK, SLOW_PARAMS, Server


@pytest.fixture()
def client(server: Server) -> Client:
    with Client(server.url, api_key=KEY) as c:
        yield c


def test_submit_follow_wait_download_verify(client: Client, tmp_path: Path) -> None:
    job = client.submit(**QUICK, seed=3)
    assert job.status in ("queued", "running") and job.request.seed == 3
    seen = []
    done = client.wait(job, timeout=120, on_progress=seen.append)
    assert done.status == "succeeded", done.error
    assert seen[-1].status == "succeeded" and seen[0].id == job.id
    events = list(client.events(done, follow=True))  # finished job: the stream replays everything, then ends
    assert [e.message for e in events][0] == "job queued"
    assert events == list(client.events(done))  # the same events as the paged JSON
    assert [e.id for e in client.events(done, after=events[1].id)] == [e.id for e in events[2:]]
    target = client.download(done, tmp_path / "out" / "a.tar")
    assert hashlib.sha256(target.read_bytes()).hexdigest() == done.artifact.sha256
    archive = read_archive(target)
    assert archive.manifest["method"] == "random" and len(archive.distilled) == 20
    assert not list(target.parent.glob(".*part"))
    dataset = load_dataset(target)
    image, label, weight, soft = dataset[0]
    assert image.shape == (1, 28, 28) and 0 <= label < 10 and weight == 1.0 and soft.shape == (10,)
    assert any(j.id == job.id for j in client.list())


def test_follow_a_running_job_live(client: Client) -> None:
    job = client.submit("dm", "mnist", 1, params={**SLOW_PARAMS, "iterations": 4}, max_per_class=10)
    events = list(client.events(job, follow=True))
    assert events[0].message == "job queued"
    assert client.get(job).status == "succeeded", client.get(job).error
    assert [e.id for e in events] == sorted({e.id for e in events})  # in order, no repeats
    assert any(e.stage == "distill" for e in events)


def test_download_resumes_and_refuses_a_corrupt_file(client: Client, tmp_path: Path) -> None:
    done = client.wait(client.submit(**QUICK, seed=5), timeout=120)
    whole = tmp_path / "whole.tar"
    client.download(done, whole)
    data = whole.read_bytes()
    # an interrupted earlier download left the first half: only the rest is fetched (Range), then verified
    target = tmp_path / "resumed.tar"
    part = tmp_path / ".resumed.tar.part"
    part.write_bytes(data[: len(data) // 2])
    progress: list[int] = []
    client.download(done, target, on_progress=lambda got, total: progress.append(got))
    assert target.read_bytes() == data and not part.exists()
    assert progress[0] > len(data) // 2 and progress[-1] == len(data)
    # a partial file with wrong bytes: the sha256 check fails, nothing is written, the bad part is removed
    bad = tmp_path / "bad.tar"
    (tmp_path / ".bad.tar.part").write_bytes(b"x" * (len(data) // 2))
    with pytest.raises(ChecksumMismatch):
        client.download(done, bad)
    assert not bad.exists() and not (tmp_path / ".bad.tar.part").exists()
    client.download(done, bad)  # and the next try starts over cleanly
    assert bad.read_bytes() == data


def test_cancel_a_running_job(client: Client) -> None:
    job = client.submit("dm", "mnist", 1, params=SLOW_PARAMS, max_per_class=10)
    try:
        wait_until(lambda: (j := client.get(job)).status == "running" and j.stage == "distill", timeout=120)
        assert client.cancel(job).cancel_requested
        with pytest.raises(JobFailed) as caught:
            client.wait(job, timeout=120)
        assert caught.value.status == "cancelled" and caught.value.job.artifact is None
        assert "cancelled" in caught.value.reason
    finally:
        if not client.get(job).terminal:
            client.cancel(job)


def test_bad_input_carries_field_errors(client: Client) -> None:
    with pytest.raises(InvalidRequest) as caught:
        client.submit("random", "mnist", 0, params={"bogus": 1})
    error = caught.value
    assert error.status == 422 and error.problem.type.endswith("invalid-request")
    assert ["body", "ipc"] in [e.loc for e in error.errors]
    assert any(line.startswith("ipc: ") for line in error.lines())
    with pytest.raises(InvalidRequest) as caught:
        client.submit("random", "mnist", 1, params={"bogus": 1})
    assert [e.loc for e in caught.value.errors] == [["body", "params", "bogus"]]
    assert caught.value.errors[0].pointer == "/params/bogus"
    with pytest.raises(NotFound):
        client.get("job_doesnotexist")


def test_wrong_key_and_other_keys_jobs(server: Server) -> None:
    with Client(server.url, api_key="not-a-key") as wrong, pytest.raises(Unauthorized) as caught:
        wrong.submit(**QUICK)
    assert caught.value.status == 401 and "API key" in caught.value.summary
    with Client(server.url, api_key=KEY) as mine, Client(server.url, api_key=OTHER_KEY) as other:
        job = mine.submit(**QUICK, idempotency_key=uuid.uuid4().hex)
        with pytest.raises(NotFound):
            other.get(job.id)
        mine.wait(job, timeout=120)


def test_idempotent_submit_and_pagination(client: Client) -> None:
    key = uuid.uuid4().hex
    first = client.submit(**QUICK, idempotency_key=key)
    again = client.submit(**QUICK, idempotency_key=key)
    assert again.id == first.id
    client.wait(first, timeout=120)
    everything = [j.id for j in client.list(page_size=1)]  # one job per page: pagination is followed
    assert everything == [j.id for j in client.list()] and first.id in everything
    assert len(list(client.list(limit=2, page_size=1))) == 2


def test_catalogue(client: Client) -> None:
    methods = {m.name: m for m in client.methods()}
    assert "random" in methods and "properties" in methods["herding"].parameters
    assert "mnist" in {d.name for d in client.datasets()}


def test_an_operator_registered_image_folder(client: Client, tmp_path: Path) -> None:
    """README: an operator registers an ImageFolder under a name (DISTILL_PLUGINS); users submit that name."""
    assert "tiny-folder" in {d.name for d in client.datasets()}
    job = client.wait(client.submit("random", "tiny-folder", 2), timeout=120)
    assert job.status == "succeeded", job.error
    archive = read_archive(client.download(job, tmp_path / "tiny.tar"))
    assert archive.classes == ["daisy", "rose", "tulip"] and len(archive.distilled) == 6
    with pytest.raises(InvalidRequest) as caught:
        client.submit("random", "tiny-folder", 7)  # above its smallest class (6 images)
    assert caught.value.errors[0].loc == ["body", "ipc"]
