"""CLI commands that talk to a job server: ``distill submit / jobs / status / logs / cancel / download /
evaluate / rerun / delete``.

The server comes from ``--server`` or ``DISTILL_SERVER`` (default http://127.0.0.1:8000), the key from
``--api-key`` or ``DISTILL_API_KEY``. Rejected input prints one ``error: field: message`` line per problem and
exits 2; an unreachable server or a failed job exits 1. ``--json`` prints the API's JSON instead of text.
"""

from __future__ import annotations

import contextlib
import json
import sys
import time
from collections.abc import Iterator
from datetime import UTC
from pathlib import Path
from typing import Annotated, Any

import typer

from distill.api_types import Job, JobEvent, Problem
from distill.client import ApiError, Client, ClientError, NotFound, ServerUnreachable, Unauthorized
from distill.progress import duration, eta, score_text

Server = Annotated[str | None, typer.Option("--server", envvar="DISTILL_SERVER",
                                             help="job server URL (default http://127.0.0.1:8000)")]
ApiKey = Annotated[str | None, typer.Option("--api-key", envvar="DISTILL_API_KEY", show_default=False,
                                             help="API key (default: DISTILL_API_KEY)")]
AsJson = Annotated[bool, typer.Option("--json", help="print the API's JSON")]
JobArg = Annotated[str, typer.Argument(help="job id (job_...)")]
OptionalJobArg = Annotated[str | None, typer.Argument(help="job id (job_...; default: your latest job)")]
Name = Annotated[str | None, typer.Option("--name", help="a label for the job, shown in lists (up to 100 characters)")]


@contextlib.contextmanager
def remote_errors() -> Iterator[None]:
    """Server problems as ``error:`` lines: exit 2 for a rejected request, 1 when the server is unreachable."""
    try:
        yield
    except Unauthorized as exc:
        typer.echo(f"error: {exc.summary} (set DISTILL_API_KEY or --api-key)", err=True)
        raise typer.Exit(2) from None
    except ApiError as exc:
        for line in exc.lines():
            typer.echo(f"error: {line}", err=True)
        raise typer.Exit(2 if exc.status < 500 else 1) from None
    except ServerUnreachable as exc:
        typer.echo(f"error: {exc} (is `distill serve` running? set --server or DISTILL_SERVER)", err=True)
        raise typer.Exit(1) from None
    except ClientError as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(1) from None
    except KeyboardInterrupt:
        typer.echo("interrupted", err=True)
        raise typer.Exit(130) from None


def parse_values(pairs: list[str]) -> dict[str, Any]:
    """``--set`` pairs with JSON-ish values: numbers, true/false/null and lists as JSON, anything else a string."""
    from distill.errors import DistillError
    from distill.methods.registry import parse_set_options

    try:
        raw = parse_set_options(pairs)
    except DistillError as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(2) from None
    values: dict[str, Any] = {}
    for key, value in raw.items():
        try:
            values[key] = json.loads(value)
        except json.JSONDecodeError:
            values[key] = value
    return values


def _echo_json(value: Any) -> None:
    typer.echo(json.dumps(value, indent=None))


def _age(job: Job) -> str:
    created = job.created_at if job.created_at.tzinfo else job.created_at.replace(tzinfo=UTC)
    return duration(max(0.0, time.time() - created.timestamp()))


def evaluation_text(job: Job) -> str | None:
    """``accuracy 96.58 %, control 92.62 %, gain +3.96 points`` (or where the evaluation stands)."""
    e = job.evaluation
    if e is None:
        return None
    if e.accuracy is None:
        return f"evaluation {e.job_id} {e.status}"
    text = f"accuracy {score_text(e.accuracy.mean, e.accuracy.std, e.accuracy.runs)}"
    if e.control is not None and e.gain is not None:
        text += f", control {score_text(e.control.mean, e.control.std, e.control.runs)}, gain {e.gain:+.2f} points"
    return text


def timing_text(job: Job) -> str:
    """``45% overall, 1m20s elapsed, about 2m left`` for a running job; the duration once it ended."""
    if job.status == "queued":
        return f"estimate {duration(job.estimate.seconds)}" if job.estimate is not None else ""
    parts = []
    if job.status == "running":
        parts.append(f"{100 * job.overall_progress:.0f}% overall")
    if job.elapsed_seconds is not None:
        parts.append(f"{duration(job.elapsed_seconds)} {'elapsed' if job.status == 'running' else 'taken'}")
    if job.status == "running" and job.eta_seconds is not None:
        parts.append(f"about {duration(job.eta_seconds)} left")
    return ", ".join(parts)


def stage_line(job: Job) -> str:
    """``select done 1s > [encode 54%] > quantize ~2m > decode ~20s``: the stages, the current one marked."""
    items = []
    for stage in job.stages:
        if stage.state == "running":
            items.append(f"[{stage.name} {100 * job.progress:.0f}%]")
        elif stage.state == "done":
            items.append(f"{stage.name} {duration(stage.seconds or 0)}")
        else:
            items.append(f"{stage.name} ~{duration(stage.seconds or 0)}")
    return " > ".join(items)


def describe(job: Job) -> str:
    """One line: id, name, status, method on dataset, stage and progress, time, result or error."""
    r = job.request
    label = f" \"{job.name}\"" if job.name else ""
    what = f"evaluation of {job.parent_id} ({r.method} on {r.dataset}, ipc {r.ipc})" if job.kind == "evaluate" \
        else f"{r.method} on {r.dataset}, ipc {r.ipc}"
    text = f"{job.id}{label}  {job.status:<9} {what}"
    if job.status == "running":
        text += f"  stage {job.stage or '-'} {100 * job.progress:.0f}%"
    timing = timing_text(job)
    if timing:
        text += f"  ({timing})"
    result = evaluation_text(job)
    if result and job.status == "succeeded":
        text += f"  {result}"
    if job.cancel_requested and not job.terminal:
        text += "  (cancel requested)"
    if job.error is not None:
        text += f"  {job.error.code}: {job.error.message}"
    return text


class Progress:
    """Follows a job while waiting: a bar on a terminal, else a plain line per stage change and every ``every`` s."""

    def __init__(self, tty: bool | None = None, every: float = 10.0):
        self.tty = sys.stderr.isatty() if tty is None else tty
        self.every = every
        self.bar: Any = None
        self.stage_key: tuple[str, str | None] | None = None
        self.stage_started = time.monotonic()
        self.stage_start_fraction = 0.0  # a watcher can join a stage part-way: the rate counts from here
        self.last_line = 0.0

    def eta(self, job: Job) -> str:
        return eta(time.monotonic() - self.stage_started, self.stage_start_fraction, job.progress)

    def __call__(self, job: Job) -> None:
        key = (job.status, job.stage)
        changed = key != self.stage_key
        if changed:
            self.stage_key = key
            self.stage_started = time.monotonic()
            self.stage_start_fraction = job.progress
        if self.tty:
            self._bar(job, changed)
            return
        now = time.monotonic()
        if changed or job.terminal or now - self.last_line >= self.every:
            self.last_line = now
            left = duration(job.eta_seconds) if job.eta_seconds is not None else self.eta(job)
            typer.echo(f"{job.id} {job.status} {100 * job.overall_progress:.0f}% overall, stage={job.stage or '-'} "
                       f"{100 * job.progress:.0f}%, eta {left}", err=True)

    def _bar(self, job: Job, changed: bool) -> None:
        from tqdm import tqdm

        if job.terminal:
            self.close()
            return
        if self.bar is None:  # one bar for the whole job: it never restarts at a stage change
            self.bar = tqdm(total=1000, leave=False, dynamic_ncols=True, file=sys.stderr,
                            bar_format="{percentage:3.0f}% |{bar}| {desc}")
        position = [s.name for s in job.stages]
        where = f" {position.index(job.stage) + 1}/{len(position)}" if job.stage in position else ""
        left = f", about {duration(job.eta_seconds)} left" if job.eta_seconds is not None else ""
        stage = f"{job.stage or 'starting'}{where} at {100 * job.progress:.0f}%, " if job.status == "running" else ""
        self.bar.set_description_str(f"{job.status}: {stage}{duration(job.elapsed_seconds or 0)} elapsed{left}",
                                     refresh=False)
        target = int(job.overall_progress * 1000)
        if target > self.bar.n:
            self.bar.update(target - self.bar.n)
        else:
            self.bar.refresh()

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None


def _download(client: Client, job: Job, out: Path | None, quiet: bool) -> Path:
    r = job.request
    target = out or Path(f"{r.dataset}-{r.method}-ipc{r.ipc}-{job.id}.tar")
    bar = None
    if not quiet and sys.stderr.isatty():
        from tqdm import tqdm

        bar = tqdm(total=job.artifact.bytes if job.artifact else None, unit="B", unit_scale=True, leave=False,
                   desc="download", file=sys.stderr)

    def advance(done: int, _total: int) -> None:
        if bar is not None:
            bar.update(done - bar.n)

    try:
        path = client.download(job, target, on_progress=advance)
    finally:
        if bar is not None:
            bar.close()
    return path


def submit(
    method: Annotated[str, typer.Argument(help="method name (GET /methods, `distill methods`)")],
    dataset: Annotated[str, typer.Option("--dataset", "-d", help="dataset registered on the server")],
    ipc: Annotated[int, typer.Option("--ipc", help="images per class")],
    set_: Annotated[list[str] | None, typer.Option("--set", help="method parameter KEY=VALUE (repeatable)")] = None,
    seed: Annotated[int, typer.Option(help="random seed")] = 0,
    max_per_class: Annotated[int | None, typer.Option(help="job sees at most N training images per class")] = None,
    idempotency_key: Annotated[str | None, typer.Option(help="retry-safe: the same key returns the same job")] = None,
    wait: Annotated[bool, typer.Option("--wait", help="follow the job until it finishes")] = False,
    download: Annotated[Path | None, typer.Option("--download", help="download the archive here (implies --wait)")] = None,
    timeout: Annotated[float | None, typer.Option(help="--wait: give up after this many seconds")] = None,
    name: Name = None,
    evaluate: Annotated[bool, typer.Option("--evaluate", help="then evaluate the archive on the server (accuracy, "
                                                              "random-subset control, gain; implies --wait)")] = False,
    eval_runs: Annotated[int | None, typer.Option(help="--evaluate: students trained (default 5)")] = None,
    eval_epochs: Annotated[int | None, typer.Option(help="--evaluate: epochs per student (default: the protocol's)")] = None,
    server: Server = None,
    api_key: ApiKey = None,
    as_json: AsJson = False,
) -> None:
    """Submit a distillation job to a server (optionally wait for it, evaluate it and download the archive)."""
    params = parse_values(set_ or [])
    with remote_errors(), Client(server, api_key) as client:
        job = client.submit(method, dataset, ipc, params=params, seed=seed, max_per_class=max_per_class,
                            idempotency_key=idempotency_key, name=name)
        if not (wait or download or evaluate):
            if as_json:
                _echo_json(job.model_dump(mode="json"))
            else:
                typer.echo(job.id)
            return
        if not as_json:
            estimate = f"; estimate {duration(job.estimate.seconds)} on this server" + \
                (" (a rough prior until this method has run here)" if job.estimate.basis == "prior" else "") \
                if job.estimate is not None else ""
            typer.echo(f"submitted {job.id} ({method} on {dataset}, ipc {ipc}){estimate}", err=True)
        job = _wait(client, job, timeout, quiet=as_json)
        path = None
        failed_evaluation = False
        if job.status == "succeeded" and download is not None:
            path = _download(client, job, download, quiet=as_json)
        if job.status == "succeeded" and evaluate:
            evaluation = client.evaluate(job, runs=eval_runs, epochs=eval_epochs)
            if not as_json:
                typer.echo(f"evaluating {job.id} as {evaluation.id}", err=True)
            evaluation = _wait(client, evaluation, timeout, quiet=as_json)
            job = client.get(job)
            if evaluation.status != "succeeded":
                if not as_json:
                    typer.echo(describe(evaluation), err=True)
                failed_evaluation = True
        if as_json:
            _echo_json({**job.model_dump(mode="json"), **({"downloaded": str(path)} if path else {})})
        else:
            typer.echo(describe(job))
            if path is not None:
                typer.echo(f"wrote {path} ({job.artifact.bytes if job.artifact else 0} bytes, sha256 verified)")
        if job.status != "succeeded" or failed_evaluation:
            raise typer.Exit(1)


def _wait(client: Client, job: Job, timeout: float | None, quiet: bool) -> Job:
    progress = None if quiet else Progress()
    try:
        return client.wait(job, timeout=timeout, on_progress=progress, raise_on_failure=False)
    finally:
        if progress is not None:
            progress.close()


def jobs(
    status: Annotated[str | None, typer.Option(help="only jobs in this status")] = None,
    limit: Annotated[int, typer.Option(help="at most this many (newest first)")] = 20,
    server: Server = None,
    api_key: ApiKey = None,
    as_json: AsJson = False,
) -> None:
    """List your jobs on the server, newest first."""
    with remote_errors(), Client(server, api_key) as client:
        found = list(client.list(status=status, limit=limit))
    if as_json:
        _echo_json([j.model_dump(mode="json") for j in found])
        return
    if not found:
        typer.echo("no jobs")
        return
    typer.echo(f"{'ID':<28} {'NAME':<16} {'STATUS':<10} {'METHOD':<8} {'DATASET':<12} {'IPC':>4} "
               f"{'PROGRESS':>8} {'TIME':>7}  {'AGE':>6}  PARAMETERS / RESULT")
    for j in found:
        progress = f"{100 * j.overall_progress:.0f}%" if j.status == "running" else (
            "100%" if j.status == "succeeded" else "-")
        method = "eval" if j.kind == "evaluate" else j.request.method
        taken = duration(j.elapsed_seconds) if j.elapsed_seconds is not None else (
            f"~{duration(j.estimate.seconds)}" if j.estimate is not None and j.status == "queued" else "-")
        detail = key_parameters(j)
        if j.error is not None:
            detail = f"{j.error.code}: {j.error.message}"
        elif j.status == "succeeded" and j.evaluation is not None:
            detail = (evaluation_text(j) or "") + (f"; {detail}" if detail else "")
        typer.echo(f"{j.id:<28} {(j.name or '-')[:16]:<16} {j.status:<10} {method:<8} {j.request.dataset[:12]:<12} "
                   f"{j.request.ipc:>4} {progress:>8} {taken:>7}  {_age(j):>6}  {detail}")


def _job_or_latest(client: Client, job_id: str | None) -> Job:
    if job_id is not None:
        return client.get(job_id)
    latest = client.latest()
    if latest is None:
        raise NotFound(Problem(title="Not Found", status=404, detail="you have no jobs on this server yet"))
    return latest


def status(job_id: OptionalJobArg = None, server: Server = None, api_key: ApiKey = None,
           as_json: AsJson = False) -> None:
    """Show one job (default: your latest): status, stages, overall progress, ETA, result or error, archive."""
    with remote_errors(), Client(server, api_key) as client:
        job = _job_or_latest(client, job_id)
    if as_json:
        _echo_json(job.model_dump(mode="json"))
        return
    typer.echo(describe(job))
    if job.stages:
        typer.echo(f"stages: {stage_line(job)}")
    if job.artifact is not None:
        typer.echo(f"archive: {job.artifact.bytes} bytes, sha256 {job.artifact.sha256}  (distill download {job.id})")


def key_parameters(job: Job) -> str:
    """The parameters the request set (defaults left out) and max_per_class: what tells two jobs apart."""
    parts = [f"{k}={json.dumps(v) if not isinstance(v, str) else v}" for k, v in job.request.params.items()]
    if job.request.max_per_class is not None:
        parts.insert(0, f"max_per_class={job.request.max_per_class}")
    if job.request.seed:
        parts.append(f"seed={job.request.seed}")
    return " ".join(parts)


def _event_line(event: JobEvent) -> str:
    when = event.created_at.strftime("%H:%M:%S")
    progress = f" {100 * event.progress:.0f}%" if event.progress is not None else ""
    stage = f" [{event.stage}]" if event.stage else ""
    return f"{when} {event.level:<5}{stage}{progress} {event.message}"


def logs(
    job_id: JobArg,
    follow: Annotated[bool, typer.Option("--follow", "-f", help="keep printing until the job finishes")] = False,
    server: Server = None,
    api_key: ApiKey = None,
    as_json: AsJson = False,
) -> None:
    """Print a job's event log (live with --follow)."""
    with remote_errors(), Client(server, api_key) as client:
        for event in client.events(job_id, follow=follow):
            typer.echo(event.model_dump_json() if as_json else _event_line(event))
        if follow and not as_json:
            typer.echo(describe(client.get(job_id)))


def cancel(job_id: JobArg, server: Server = None, api_key: ApiKey = None, as_json: AsJson = False) -> None:
    """Cancel a queued or running job."""
    with remote_errors(), Client(server, api_key) as client:
        job = client.cancel(job_id)
    if as_json:
        _echo_json(job.model_dump(mode="json"))
    else:
        typer.echo(describe(job))


def download(
    job_id: JobArg,
    out: Annotated[Path | None, typer.Argument(help="file to write (default DATASET-METHOD-ipcN-ID.tar)")] = None,
    server: Server = None,
    api_key: ApiKey = None,
    as_json: AsJson = False,
) -> None:
    """Download a finished job's archive (resumes a broken download, checks the sha256)."""
    with remote_errors(), Client(server, api_key) as client:
        job = client.get(job_id)
        path = _download(client, job, out, quiet=as_json)
    assert job.artifact is not None
    if as_json:
        _echo_json({"path": str(path), "bytes": job.artifact.bytes, "sha256": job.artifact.sha256})
    else:
        typer.echo(f"wrote {path} ({job.artifact.bytes} bytes, sha256 verified)")


def evaluate(
    job_id: OptionalJobArg = None,
    runs: Annotated[int | None, typer.Option(help="students trained (default 5, as distill eval)")] = None,
    epochs: Annotated[int | None, typer.Option(help="epochs per student (default: the protocol's)")] = None,
    wait: Annotated[bool, typer.Option("--wait", help="follow the evaluation until it finishes")] = False,
    server: Server = None,
    api_key: ApiKey = None,
    as_json: AsJson = False,
) -> None:
    """Evaluate a finished job's archive on the server: accuracy, random-subset control and gain."""
    with remote_errors(), Client(server, api_key) as client:
        job = _job_or_latest(client, job_id)
        evaluation = client.evaluate(job, runs=runs, epochs=epochs)
        if wait:
            evaluation = _wait(client, evaluation, None, quiet=as_json)
    if as_json:
        _echo_json(evaluation.model_dump(mode="json"))
        return
    typer.echo(describe(evaluation))
    if evaluation.status == "failed":
        raise typer.Exit(1)


def rerun(job_id: JobArg, name: Name = None, server: Server = None, api_key: ApiKey = None,
          as_json: AsJson = False) -> None:
    """Queue a job again with the same request (and name, unless --name gives another)."""
    with remote_errors(), Client(server, api_key) as client:
        job = client.rerun(job_id, name=name)
    if as_json:
        _echo_json(job.model_dump(mode="json"))
    else:
        typer.echo(job.id)


def delete(job_id: JobArg, server: Server = None, api_key: ApiKey = None) -> None:
    """Delete a finished job: its record, events, evaluations and archive."""
    with remote_errors(), Client(server, api_key) as client:
        client.delete(job_id)
    typer.echo(f"deleted {job_id}")


def register(app: typer.Typer) -> None:
    for command in (submit, jobs, status, logs, cancel, download, evaluate, rerun, delete):
        app.command(command.__name__, rich_help_panel="Job server")(command)
