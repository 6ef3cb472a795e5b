"""A new user's first hour against a real `distill serve`: failures raise with their reason, events say where
the job was, an estimate and overall progress from submit on, names, rerun, delete, evaluation as a job, and
the method catalogue saying what this host can run."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from distill.client import Client, InvalidRequest, JobFailed, NotFound

from .conftest import KEY, QUICK, Server


@pytest.fixture()
def client(server: Server) -> Client:
    with Client(server.url, api_key=KEY) as c:
        yield c


def test_estimate_overall_progress_name_rerun_evaluate_delete(client: Client, server: Server) -> None:
    job = client.submit(**QUICK, name="first try")
    assert job.name == "first try" and job.estimate is not None, job
    assert job.estimate.seconds > 0, job.estimate
    assert [s.state for s in job.stages] and all(s.state == "pending" for s in job.stages)
    done = client.wait(job, timeout=120)
    assert done.overall_progress == 1.0 and done.elapsed_seconds is not None and done.eta_seconds is None
    assert [s.name for s in done.stages] == ["prepare", "select", "archive"]
    assert all(s.state == "done" for s in done.stages)
    events = list(client.events(done))
    assert all(e.stage is not None and e.progress is not None for e in events), events

    again = client.rerun(done)  # same request and name; this method has now run here: the estimate learns
    assert again.id != done.id and again.name == "first try" and again.request == done.request
    assert again.estimate is not None and again.estimate.basis == "history" and again.estimate.jobs >= 1
    assert [s.name for s in again.estimate.stages] == ["prepare", "select", "archive"]
    client.wait(again, timeout=120)

    folder_job = client.wait(client.submit("random", "tiny-folder", 2, name="tiny"), timeout=120)
    evaluation = client.evaluate(folder_job, runs=1, epochs=2)
    assert evaluation.kind == "evaluate" and evaluation.parent_id == folder_job.id
    finished = client.wait(evaluation, timeout=300)
    result = finished.evaluation
    assert result is not None and result.accuracy is not None and result.control is not None
    assert result.gain == pytest.approx(result.accuracy.mean - result.control.mean, abs=0.01)
    assert client.get(folder_job).evaluation == result  # shown on the evaluated job too
    listed = {j.id: j for j in client.list(limit=10)}
    assert listed[folder_job.id].evaluation == result

    client.delete(folder_job)  # the job, its archive and its evaluation
    for gone in (folder_job, evaluation):
        with pytest.raises(NotFound):
            client.get(gone)


def test_wait_raises_job_failed_with_the_reason(client: Client, server: Server) -> None:
    job = client.wait(client.submit(**QUICK, seed=11), timeout=120)
    for archive in (server.home / "artifacts").glob(f"{job.id}*"):
        archive.unlink()  # storage lost the archive: an evaluation of it fails, and says why
    evaluation = client.evaluate(job, runs=1, epochs=1)
    with pytest.raises(JobFailed) as caught:
        client.wait(evaluation, timeout=120)
    assert caught.value.status == "failed" and "no longer in storage" in caught.value.reason
    assert caught.value.job.error is not None


def test_methods_say_what_this_host_can_run_and_names_are_bounded(client: Client) -> None:
    methods = {m.name: m for m in client.methods()}
    assert methods["random"].available and methods["random"].unavailable_reason is None
    assert "weights taef2" in methods["oq"].requirements
    # a parameter that only has an effect on a CUDA GPU says so, and whether this host has one (the site plugin's
    # tf32); oq's diffusion decode parameters run on the CPU too: none of oq's is marked
    import torch

    site = methods["site-random"]
    assert site.parameters["properties"]["tf32"]["x-device"] == "cuda"
    assert site.devices == {"cuda": torch.cuda.is_available()}
    assert methods["oq"].devices == {} and methods["random"].devices == {}
    with pytest.raises(InvalidRequest) as caught:
        client.submit(**QUICK, name="x" * 101)
    assert caught.value.errors[0].loc == ["body", "name"]
    datasets = {d.name: d for d in client.datasets()}
    assert all((d.unavailable_reason is None) == d.available for d in datasets.values())


def test_missing_weights_are_refused_before_any_work(tmp_path: Path) -> None:
    """Without the encoder's weights, `oq` is refused at once (exit 2, one line naming the parameter), and
    `distill methods oq` says so, instead of failing after minutes of encoding."""
    empty = tmp_path / "weights"
    empty.mkdir()
    env = {**os.environ, "DISTILL_WEIGHTS_DIR": str(empty), "DISTILL_HOME": str(tmp_path / "home")}
    distill = Path(sys.executable).with_name("distill")
    run = subprocess.run([str(distill), "run", "oq", "--dataset", "mnist", "--ipc", "1", "--max-per-class", "5",
                          "--out", str(tmp_path / "x.tar")], env=env, capture_output=True, text=True, timeout=120)
    assert run.returncode == 2 and "encoder=taef2 needs" in run.stderr and not (tmp_path / "x.tar").exists()
    shown = subprocess.run([str(distill), "methods", "oq"], env=env, capture_output=True, text=True, timeout=120)
    assert shown.returncode == 0 and "not available here: encoder=taef2 needs" in shown.stdout
    assert "parameters (distill run/submit --set KEY=VALUE):" in shown.stdout and "kmeans_backend=" in shown.stdout
