"""The ``distill`` command line: run methods, evaluate archives, list datasets and methods.

Sub-commands of other packages (``distill prior``, ``distill experts``, ``distill serve``/``api``/``worker``)
are ``distill.commands`` entry points (pyproject.toml): functions ``register(app)`` found at start-up.
"""

from __future__ import annotations

import contextlib
import json
import os
import sys
from collections.abc import Iterator
from importlib.metadata import entry_points
from pathlib import Path
from typing import Annotated

import typer

from distill.errors import DistillError
from distill.progress import ProgressLines, score_text

app = typer.Typer(add_completion=False, no_args_is_help=True, help="Distill image-classification datasets.")


def _print_version(value: bool) -> None:
    if value:
        from distill import __version__

        typer.echo(f"distill {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: Annotated[bool, typer.Option("--version", callback=_print_version, is_eager=True,
                                          help="print the version and exit")] = False,
) -> None:
    """Distill image-classification datasets: locally (run, eval) or on a job server (submit, jobs, logs)."""


@contextlib.contextmanager
def user_errors() -> Iterator[None]:
    """Turn user-facing errors into one line on stderr and exit status 2."""
    try:
        yield
    except DistillError as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(2) from None
    except KeyboardInterrupt:
        typer.echo("interrupted", err=True)
        raise typer.Exit(130) from None


def _configure_process() -> None:
    """Settings of a one-shot CPU-heavy command: torch threads, and freed memory kept (distill/heap.py)."""
    from distill.config import get_settings
    from distill.heap import keep_freed_memory

    settings = get_settings()
    if settings.keep_heap:
        keep_freed_memory()
    if settings.num_threads:
        import torch

        torch.set_num_threads(settings.num_threads)


@app.command()
def run(
    method: Annotated[str, typer.Argument(help="method name (see `distill methods`)")],
    dataset: Annotated[str, typer.Option("--dataset", "-d", help="registered dataset or imagefolder:PATH")],
    ipc: Annotated[int, typer.Option("--ipc", help="images per class")],
    out: Annotated[Path, typer.Option("--out", "-o", help="archive to write (.tar)")],
    set_: Annotated[list[str] | None, typer.Option("--set", help="method parameter KEY=VALUE (repeatable)")] = None,
    seed: Annotated[int, typer.Option(help="random seed")] = 0,
    device: Annotated[str, typer.Option(help="auto, cpu, cuda, cuda:N")] = "auto",
    max_per_class: Annotated[int | None, typer.Option(help="see at most N training images per class")] = None,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="no progress bars")] = False,
    resume_dir: Annotated[Path | None, typer.Option(
        "--resume-dir", help="checkpoint folder: the run saves its progress there and, started again with the "
                             "same folder and arguments, continues from it")] = None,
) -> None:
    """Distill DATASET into IPC images per class with METHOD and write one archive."""
    from distill.methods.registry import parse_set_options
    from distill.runner import RunRequest, run_to_archive

    with user_errors():
        if out.is_dir():
            raise DistillError(f"--out {out} is a directory: give the archive's file name (e.g. {out / 'set.tar'})")
        _configure_process()
        request = RunRequest(dataset=dataset, method=method, ipc=ipc, params=parse_set_options(set_ or []),
                             seed=seed, max_per_class=max_per_class, device=device)
        bars = not quiet and (sys.stderr.isatty() or bool(os.environ.get("DISTILL_PROGRESS")))
        # every stage reports to the sink, bars or not (some, like oq's encode, have no bar): a line per stage
        # change and every 30 s in a log, every 60 s beside the bars on a terminal
        lines = None if quiet else ProgressLines("run", every=60.0 if bars else 30.0)
        result = run_to_archive(request, out, progress=lines, show_progress_bars=bars, checkpoint_dir=resume_dir,
                                log=lambda message: typer.echo(message, err=True))
        timings = ", ".join(f"{k} {v:.1f}s" for k, v in result.manifest["timings"].items())
        typer.echo(f"wrote {result.path} ({len(result.distilled)} images, sha256 {result.sha256[:16]}…; {timings})")


@app.command("eval")
def eval_(
    archive: Annotated[Path | None, typer.Argument(help="distilled-set archive")] = None,
    model: Annotated[str, typer.Option(help="student network; auto: convnet below 128 px, resnet18 from 128 px")] = "auto",
    runs: Annotated[int, typer.Option(help="fresh students to train")] = 5,
    epochs: Annotated[int | None, typer.Option(help="epochs (default 1000 dc, 300 softlabel, 30 --full)")] = None,
    protocol: Annotated[str, typer.Option(help="dc or softlabel")] = "dc",
    lr: Annotated[float | None, typer.Option(help="override the learning rate")] = None,
    batch_size: Annotated[int, typer.Option(help="training batch")] = 256,
    augment: Annotated[str, typer.Option(help="DSA strategy, 'auto', 'none', or 'dc' (DC's MNIST augmentation)")] = "auto",
    test_limit: Annotated[int | None, typer.Option(help="evaluate on a stratified subset of the test split")] = None,
    teacher_epochs: Annotated[int, typer.Option(help="softlabel: epochs of the cached teacher")] = 15,
    teacher_max_per_class: Annotated[int | None, typer.Option(help="softlabel: teacher sees N images/class")] = None,
    seed: Annotated[int, typer.Option()] = 0,
    device: Annotated[str, typer.Option(help="auto, cpu, cuda, cuda:N")] = "auto",
    precision: Annotated[str, typer.Option(help="fp32 (reference-exact), bf16, or auto (bf16 where the CPU or GPU "
                                                "runs it natively)")] = "auto",
    compile: Annotated[str, typer.Option(help="torch.compile the students: auto (runs long enough to repay it), on, "
                                              "off")] = "auto",
    no_compile: Annotated[bool, typer.Option("--no-compile", help="same as --compile off; with --precision fp32 "
                                                                 "the reference-exact path")] = False,
    channels_last: Annotated[str, typer.Option(help="channels_last memory layout: auto, on, off")] = "auto",
    full: Annotated[bool, typer.Option("--full", help="whole-dataset upper bound instead of an archive")] = False,
    dataset: Annotated[str | None, typer.Option(help="dataset for --full")] = None,
    max_per_class: Annotated[int | None, typer.Option(help="--full: train on at most N images per class")] = None,
    no_control: Annotated[bool, typer.Option("--no-control", help="skip the random-subset control")] = False,
    as_json: Annotated[bool, typer.Option("--json", help="print one JSON object (progress as JSON lines on stderr)")] = False,
    test_batch: Annotated[int | None, typer.Option(help="test batch (default: sized by --memory-gb, at most 500)")] = None,
    memory_gb: Annotated[float | None, typer.Option(help="activation budget per forward/backward pass (GiB; default "
                                                        "2 on the CPU, half the free memory on CUDA)")] = None,
    teacher_checkpoint: Annotated[Path | None, typer.Option(help="softlabel: a local torchvision-format ResNet-18 "
                                                                  "checkpoint as the teacher")] = None,
) -> None:
    """Train fresh students on ARCHIVE and report test accuracy (mean ± std) on the real test split, next to
    a random real subset of the same IPC under the same protocol, budget and seed (cached) and the gain."""
    from distill.archive import read_archive
    from distill.data.registry import get_dataset
    from distill.evaluate import EvalConfig, evaluate_distilled, evaluate_full, finish_data_parallel
    from distill.precision import PRECISIONS
    from distill.runner import resolve_device, seed_everything

    with user_errors():
        _configure_process()
        config = EvalConfig(protocol=protocol, model=model, runs=runs, epochs=epochs, lr=lr, batch_size=batch_size,
                            augment=augment, seed=seed, test_limit=test_limit, teacher_epochs=teacher_epochs,
                            teacher_max_per_class=teacher_max_per_class, device=str(resolve_device(device)),
                            precision=precision, compile="off" if no_compile else compile,
                            channels_last=channels_last, test_batch=test_batch, memory_gb=memory_gb,
                            teacher_checkpoint=str(teacher_checkpoint) if teacher_checkpoint else None)
        if precision not in PRECISIONS:
            raise DistillError(f"unknown --precision '{precision}' (use {', '.join(PRECISIONS)})")
        seed_everything(seed)
        bar = _progress_bar(True)  # stderr only (a bar, or lines in a log): with --json stdout stays one object
        if full:
            if not dataset:
                raise DistillError("--full needs --dataset NAME")
            result = evaluate_full(get_dataset(dataset), config, max_per_class=max_per_class, progress=bar)
            extra: dict = {}
        else:
            if archive is None:
                raise DistillError("give an ARCHIVE (or --full --dataset NAME)")
            loaded = read_archive(_archive_file(archive))
            ds = get_dataset(loaded.dataset)
            if list(ds.classes) != list(loaded.classes):
                raise DistillError(f"{archive}: class order differs from dataset {ds.name}")
            control_ipc = None if no_control else int(loaded.manifest.get("ipc") or len(loaded.distilled) // ds.num_classes)
            result = evaluate_distilled(loaded.distilled, ds, config, progress=bar, control_ipc=control_ipc)
            extra = {"archive": str(archive), "method": loaded.manifest.get("method"), "ipc": loaded.manifest.get("ipc")}
        if bar is not None:
            bar.close()
        if not finish_data_parallel():  # under accelerate launch / torchrun only rank 0 reports
            return
        payload = {**result.to_json(), **extra}
        if as_json:
            typer.echo(json.dumps(payload))
        else:
            what = f"{extra.get('method')} ipc {extra.get('ipc')}" if extra else "whole dataset"
            typer.echo(
                f"{result.dataset} {what}: {score_text(result.accuracy_mean, result.accuracy_std, result.runs)} "
                f"({result.runs} x {result.model}, {result.epochs} epochs, protocol {result.protocol}, "
                f"{result.test_images} test images, {result.wall_seconds:.0f}s)"
            )
            typer.echo("runs: " + ", ".join(f"{a:.2f}" for a in result.accuracies))
            if result.control is not None and result.gain is not None:
                control = result.control
                typer.echo(f"control, random real ipc {control_ipc}: "
                           f"{score_text(control.accuracy_mean, control.accuracy_std, control.runs)}; "
                           f"gain {result.gain:+.2f} points")


def _archive_file(path: Path) -> Path:
    if path.is_dir():
        raise DistillError(f"{path} is a directory, not an archive (a .tar written by `distill run`)")
    return path


class _Bar:
    def __init__(self):
        from tqdm import tqdm

        bar_format = "{desc} {percentage:3.0f}%|{bar}| {elapsed}<{remaining}"
        self.bar = tqdm(total=1000, desc="eval", leave=False, dynamic_ncols=True, bar_format=bar_format)

    def __call__(self, stage: str, fraction: float) -> None:
        target = int(fraction * 1000)
        if target > self.bar.n:
            self.bar.update(target - self.bar.n)

    def close(self) -> None:
        self.bar.close()


def _progress_bar(enabled: bool) -> _Bar | ProgressLines | None:
    """A bar on a terminal; in a log or a pipe a line per stage and every 30 s (stage, percent, ETA)."""
    if not enabled:
        return None
    return _Bar() if sys.stderr.isatty() or os.environ.get("DISTILL_PROGRESS") else ProgressLines("eval")


@app.command()
def datasets(as_json: Annotated[bool, typer.Option("--json")] = False) -> None:
    """List the registered datasets (plus imagefolder:PATH) and whether their files are here."""
    from distill.data.registry import DATASETS, dataset_available, operator_datasets

    rows = [{"name": s.name, "description": s.description, "channels": s.channels, "image_size": s.image_size,
             "num_classes": s.num_classes, "available": dataset_available(s.name)} for s in DATASETS.values()]
    rows += [{"name": name, "description": f"ImageFolder {source} (registered)", "channels": None, "image_size": None,
              "num_classes": None, "available": dataset_available(name)}
             for name, source in operator_datasets().items() if name not in DATASETS]
    if as_json:
        typer.echo(json.dumps(rows))
        return
    for r in rows:
        shape = f"{r['num_classes']:>5} classes  {r['channels']}x{r['image_size']}px" if r["num_classes"] else " " * 24
        here = "" if r["available"] else "  (not on this machine)"
        typer.echo(f"{r['name']:<14} {shape}  {r['description']}{here}")
    typer.echo(f"{'imagefolder:PATH':<14} any ImageFolder tree or tarball (train/ + val/ or test/)")


@app.command("config")
def config_(as_json: Annotated[bool, typer.Option("--json")] = False) -> None:
    """Print the settings as this process resolved them (relative paths made absolute) and where they came from."""
    from distill.config import config_file, get_settings

    with user_errors():
        settings = get_settings()
    values = {name: (str(value.expanduser()) if isinstance(value, Path) else value)
              for name, value in settings.model_dump().items()}
    values["config"] = str(config_file()) if config_file() else None
    if as_json:
        typer.echo(json.dumps(values, default=str))
        return
    for name, value in values.items():
        typer.echo(f"DISTILL_{name.upper():<22} {value if value not in (None, {}) else '-'}")


@app.command()
def methods(
    name: Annotated[str | None, typer.Argument(help="one method: its parameters, defaults and requirements")] = None,
    as_json: Annotated[bool, typer.Option("--json")] = False,
) -> None:
    """List the methods (one line each, and whether this host can run them); NAME shows one method's parameters."""
    from distill.errors import InvalidRequest
    from distill.methods.base import DEVICE_NAMES, device_parameters, host_has
    from distill.methods.registry import METHODS, available_methods, get_method, unknown_method
    from distill.requirements import method_requirements

    with user_errors():
        if name is not None and name not in METHODS:
            raise InvalidRequest([unknown_method(name)])
        found = {name: get_method(name)} if name is not None else available_methods()
    if as_json:
        typer.echo(json.dumps({key: {"summary": m.summary, "family": m.family,
                                     "params": m.Params.model_json_schema()} for key, m in found.items()}))
        return
    for key, method in found.items():
        needs, missing = method_requirements(key, method.Params().model_dump())
        here = f"  (not available here: {missing})" if missing else ""
        typer.echo(f"{key:<8} [{method.family}] {method.summary}{here}")
        if name is None:
            continue
        if needs:
            typer.echo(f"needs: {', '.join(needs)}")
        typer.echo("parameters (distill run/submit --set KEY=VALUE):")
        only = device_parameters(method.Params.model_json_schema())  # these come last, under their device
        fields = method.Params.model_fields
        for device in [None, *sorted(set(only.values()))]:
            if device is not None:
                has = "this host has one" if host_has(device) else "this host has none"
                typer.echo(f"only with {DEVICE_NAMES.get(device, device)} ({has}):")
            for param, field in fields.items():
                if only.get(param) == device:
                    default = field.default if field.default is not None else "none"
                    typer.echo(f"    {param}={default}  {field.description or ''}".rstrip())
    if name is None:
        typer.echo("distill methods NAME: one method's parameters and defaults")


@app.command()
def verify(archive: Annotated[Path, typer.Argument(help="archive to check")]) -> None:
    """Check an archive's integrity (every member's sha256 and the manifest's own) and print its summary; a
    modified archive prints one `changed:` line per difference (members, manifest fields) and exits 1."""
    from distill.archive import MANIFEST_DIGEST, verify_archive

    with user_errors():
        m, changes = verify_archive(_archive_file(archive))
    old = [c for c in changes if c.startswith(f"no {MANIFEST_DIGEST}")]
    changed = [c for c in changes if c not in old]
    for line in changed:
        typer.echo(f"changed: {line}", err=True)
    if changed or m is None:
        typer.echo(f"error: {archive} was modified or is corrupt ({len(changed)} difference"
                   f"{'s' if len(changed) != 1 else ''})", err=True)
        raise typer.Exit(1)
    for line in old:
        typer.echo(f"warning: {line}", err=True)
    typer.echo(f"ok: {m.get('method')} on {m.get('dataset', {}).get('name')}, ipc {m.get('ipc')}, "
               f"{m.get('num_images')} images, seed {m.get('seed')}, code {m.get('code_version')}")


COMMANDS_GROUP = "distill.commands"


def register_commands(cli: typer.Typer) -> list[str]:
    """Add the sub-commands other packages declare as ``distill.commands`` entry points (pyproject.toml), so
    this core module never names them. One that fails to load is reported on stderr (one line naming the
    module and the exception) and the others still work. Returns the failures' messages."""
    failures = []
    for entry in sorted(entry_points(group=COMMANDS_GROUP), key=lambda e: e.name):
        try:
            entry.load()(cli)
        except Exception as exc:
            detail = " ".join(str(exc).split())
            message = f"error: cannot load the '{entry.name}' commands from {entry.value} ({type(exc).__name__}: {detail})"
            typer.echo(message, err=True)
            failures.append(message)
    return failures


def main() -> None:
    app()


if __name__ == "__main__":  # `python -m distill.cli`: run the importable module, so commands register once
    from distill.cli import main as _main

    _main()
else:
    register_commands(app)
