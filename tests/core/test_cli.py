"""The CLI end to end on real MNIST slices, and every user error path: one line, exit 2, no output file."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from pydantic import Field
from typer.testing import CliRunner

from distill.cli import app
from distill.methods.base import only_on
from distill.methods.baselines import RandomParams, RandomSelection

runner = CliRunner()


def invoke(*args: str):
    return runner.invoke(app, [str(a) for a in args])


@pytest.fixture(scope="module")
def random_archive(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("cli") / "mnist-random-5.tar"
    result = invoke("run", "random", "--dataset", "mnist", "--ipc", 5, "--out", out, "--max-per-class", 50, "--seed", 1)
    assert result.exit_code == 0, result.output
    return out


def test_run_then_eval_json(random_archive: Path):
    result = invoke("eval", random_archive, "--runs", 2, "--epochs", 15, "--test-limit", 500, "--json", "--device", "cpu")
    assert result.exit_code == 0, result.output
    payload = json.loads(result.output.strip().splitlines()[-1])
    for key in ("accuracy_mean", "accuracy_std", "runs", "epochs", "model", "dataset"):
        assert key in payload
    assert payload["runs"] == 2 and payload["epochs"] == 15 and payload["dataset"] == "mnist"
    assert len(payload["accuracies"]) == 2
    # 50 real digits, 15 epochs: far above chance (10 %) on a 500-image stratified test subset.
    assert payload["accuracy_mean"] > 50
    # the control: random real images of the same ipc, same protocol / budget / seed, and the gain over it
    control = payload["control"]
    assert control["runs"] == 2 and control["epochs"] == 15 and control["settings"]["ipc"] == 5
    assert payload["gain"] == pytest.approx(payload["accuracy_mean"] - control["accuracy_mean"], abs=1e-3)
    assert control["settings"]["cached"] is False
    again = invoke("eval", random_archive, "--runs", 2, "--epochs", 15, "--test-limit", 500, "--device", "cpu")
    assert again.exit_code == 0, again.output
    assert f"control, random real ipc 5: {control['accuracy_mean']:.2f}" in again.output  # from the cache
    bare = invoke("eval", random_archive, "--runs", 1, "--epochs", 1, "--test-limit", 100, "--json", "--no-control")
    assert bare.exit_code == 0 and "control" not in json.loads(bare.output.strip().splitlines()[-1])


def test_run_is_deterministic_by_seed(tmp_path: Path, random_archive: Path):
    from distill.archive import read_archive

    again = tmp_path / "again.tar"
    assert invoke("run", "random", "-d", "mnist", "--ipc", 5, "-o", again, "--max-per-class", 50, "--seed", 1).exit_code == 0
    first, second = read_archive(random_archive).distilled, read_archive(again).distilled
    assert (first.images == second.images).all() and (first.labels == second.labels).all()


def test_listing_commands():
    result = invoke("methods", "--json")
    assert result.exit_code == 0
    methods = json.loads(result.output)
    assert {"random", "herding", "kcenter"} <= set(methods)
    assert methods["herding"]["params"]["properties"]["features"]["default"] == "random"
    result = invoke("datasets")
    assert result.exit_code == 0 and "fashion-mnist" in result.output and "imagefolder:PATH" in result.output


class _GpuOnlyParams(RandomParams):
    tf32: bool = Field(False, description="allow TF32 matmuls", json_schema_extra=only_on("cuda"))
    note: int = Field(1, description="an ordinary parameter")


class GpuOnlyMethod(RandomSelection):
    name = "gpu-only-test"
    Params = _GpuOnlyParams  # type: ignore[assignment]


def test_methods_name_sets_device_specific_parameters_apart(monkeypatch: pytest.MonkeyPatch):
    """`distill methods NAME` lists a parameter marked only_on("cuda") after the others, under its device and
    whether this host has it; oq's diffusion decode parameters run on the CPU too: ordinary parameters there."""
    import torch

    from distill.methods.registry import METHODS

    monkeypatch.setitem(METHODS, "gpu-only-test", f"{__name__}:GpuOnlyMethod")
    result = invoke("methods", "gpu-only-test")
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    has = "this host has one" if torch.cuda.is_available() else "this host has none"
    heading = lines.index(f"only with a CUDA GPU ({has}):")
    assert lines.index("    note=1  an ordinary parameter") < heading
    assert lines[heading + 1:] == ["    tf32=False  allow TF32 matmuls"]
    schema = json.loads(invoke("methods", "gpu-only-test", "--json").output)["gpu-only-test"]["params"]
    assert schema["properties"]["tf32"]["x-device"] == "cuda" and "x-device" not in schema["properties"]["note"]
    oq = invoke("methods", "oq")
    assert oq.exit_code == 0 and "only with" not in oq.output and "    strength=0.7" in oq.output


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["run", "random", "-d", "nosuchset", "--ipc", "1"], "unknown dataset 'nosuchset'"),
        (["run", "nosuchmethod", "-d", "mnist", "--ipc", "1"], "unknown method 'nosuchmethod'"),
        (["run", "random", "-d", "mnist", "--ipc", "0"], "ipc must be >= 1"),
        (["run", "random", "-d", "mnist", "--ipc", "6000"], "larger than the smallest class"),
        (["run", "random", "-d", "mnist", "--ipc", "3", "--max-per-class", "2"], "larger than the smallest class"),
        (["run", "herding", "-d", "mnist", "--ipc", "1", "--set", "bogus=1"], "unknown parameter 'bogus'"),
        (["run", "herding", "-d", "mnist", "--ipc", "1", "--set", "batch_size=many"], "bad value for 'batch_size'"),
        (["run", "herding", "-d", "mnist", "--ipc", "1", "--set", "features=oracle"], "bad value for 'features'"),
        (["run", "herding", "-d", "mnist", "--ipc", "1", "--set", "novalue"], "--set expects KEY=VALUE"),
    ],
)
def test_run_errors(tmp_path: Path, args: list[str], message: str):
    out = tmp_path / "out.tar"
    result = invoke(*args, "--out", out)
    assert result.exit_code == 2
    assert message in result.output
    assert not out.exists() and not list(tmp_path.iterdir())


def test_eval_errors(tmp_path: Path, random_archive: Path):
    garbage = tmp_path / "garbage.tar"
    garbage.write_bytes(b"\x00" * 10)
    result = invoke("eval", garbage)
    assert result.exit_code == 2 and "error:" in result.output
    result = invoke("eval", random_archive, "--protocol", "magic", "--runs", 1)
    assert result.exit_code == 2 and "unknown protocol" in result.output
    result = invoke("eval", "--full")
    assert result.exit_code == 2 and "--full needs --dataset" in result.output
    result = invoke("eval", random_archive, "--augment", "crop_bogus", "--runs", 1)
    assert result.exit_code == 2 and "unknown augmentation 'crop_bogus'" in result.output
    assert len(result.output.strip().splitlines()) == 1


def test_missing_data_dir_is_one_clear_line(tmp_path: Path):
    env = {**os.environ, "DISTILL_DATA_DIR": str(tmp_path / "nowhere"), "DISTILL_HOME": str(tmp_path / "home")}
    proc = subprocess.run([sys.executable, "-m", "distill.cli", "run", "random", "-d", "mnist", "--ipc", "1",
                           "-o", str(tmp_path / "x.tar")], env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [f"error: missing data folder for mnist: {tmp_path / 'nowhere' / 'mnist'}"]
    assert not (tmp_path / "x.tar").exists()


@pytest.mark.parametrize("variable, value", [("DISTILL_KEEP_HEAP", "maybe"), ("DISTILL_NUM_THREADS", "abc")])
def test_a_malformed_setting_is_one_line_naming_it(tmp_path: Path, variable: str, value: str):
    env = {**os.environ, variable: value}
    proc = subprocess.run([sys.executable, "-m", "distill.cli", "run", "random", "-d", "mnist", "--ipc", "1",
                           "-o", str(tmp_path / "x.tar")], env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    (line,) = proc.stderr.strip().splitlines()
    assert line.startswith(f"error: setting {variable}='{value}': Input should be a valid ")
    assert not (tmp_path / "x.tar").exists()


def test_several_problems_are_one_error_line(tmp_path: Path):
    """The core lists every problem of a request (InvalidRequest); the CLI prints them as one `error:` line."""
    out = tmp_path / "x.tar"
    proc = subprocess.run([sys.executable, "-m", "distill.cli", "run", "herding", "-d", "mnist", "--ipc", "6000",
                           "--set", "bogus=1", "-o", str(out)], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    (line,) = proc.stderr.strip().splitlines()
    assert line.startswith("error: unknown parameter 'bogus' for herding")
    assert "; ipc 6000 is larger than the smallest class of mnist (5421 training images)" in line
    assert not out.exists()


def test_a_method_that_cannot_be_imported_is_an_error_naming_what_is_missing(monkeypatch: pytest.MonkeyPatch):
    from distill.methods.registry import METHODS

    monkeypatch.setitem(METHODS, "broken-test", "no_such_package_xyz.methods:Broken")
    result = invoke("methods")
    assert result.exit_code == 2
    assert "error: method 'broken-test' needs no_such_package_xyz: ModuleNotFoundError" in result.output
    result = invoke("run", "broken-test", "-d", "mnist", "--ipc", "1", "-o", "never.tar")
    assert result.exit_code == 2 and "needs no_such_package_xyz" in result.output


def test_a_command_module_that_fails_to_load_is_reported(tmp_path: Path):
    """Sub-commands come from `distill.commands` entry points; a broken one is one error line, not silence."""
    dist = tmp_path / "broken_commands-0.1.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: broken-commands\nVersion: 0.1\n")
    (dist / "entry_points.txt").write_text("[distill.commands]\nbroken = no_such_module_xyz.cli:register\n")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(tmp_path), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.run([sys.executable, "-m", "distill.cli", "--help"], env=env, capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0  # the other commands still work
    assert proc.stderr.strip().splitlines() == [
        "error: cannot load the 'broken' commands from no_such_module_xyz.cli:register "
        "(ModuleNotFoundError: No module named 'no_such_module_xyz')"]
    for command in ("run", "serve", "api", "worker", "prior", "experts"):
        assert command in proc.stdout


def test_existing_directories_are_one_error_line(tmp_path: Path):
    """`--out DIRECTORY` and `verify DIRECTORY` (issue 13 item 11): one `error:` line and exit 2, no traceback."""
    result = invoke("run", "random", "-d", "mnist", "--ipc", 1, "--max-per-class", 5, "-o", tmp_path)
    assert result.exit_code == 2
    example = tmp_path / "set.tar"
    assert result.output.strip() == f"error: --out {tmp_path} is a directory: give the archive's file name (e.g. {example})"
    assert list(tmp_path.iterdir()) == []
    for command in ("verify", "eval"):
        result = invoke(command, tmp_path)
        assert result.exit_code == 2
        assert result.output.strip() == f"error: {tmp_path} is a directory, not an archive (a .tar written by `distill run`)"


@pytest.mark.parametrize("command", [
    ["migrate-db"],
    ["eval", "ARCHIVE", "--runs", "1", "--epochs", "1", "--test-limit", "50"],  # with its random-subset control
    ["run", "herding", "-d", "mnist", "--ipc", "1", "--max-per-class", "5", "--set", "features=teacher",
     "--set", "teacher_epochs=1", "-o", "OUT"],  # the teacher cache
])
def test_an_unwritable_home_is_one_error_line(tmp_path: Path, random_archive: Path, command: list[str]):
    blocker = tmp_path / "not-a-folder"
    blocker.write_text("a file where DISTILL_HOME's parent should be")
    out = tmp_path / "x.tar"
    args = [str(random_archive) if a == "ARCHIVE" else str(out) if a == "OUT" else a for a in command]
    env = {**os.environ, "DISTILL_HOME": str(blocker / "home")}
    env.pop("DISTILL_DATABASE_URL", None)
    proc = subprocess.run([sys.executable, "-m", "distill.cli", *args], env=env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 2, proc.stderr
    (line,) = proc.stderr.strip().splitlines()
    assert line == f"error: DISTILL_HOME {blocker / 'home'} is not writable: Not a directory"
    assert not out.exists()
