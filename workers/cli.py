"""``distill worker`` (claim queued jobs and run them here, or as Ray tasks) and ``distill migrate-db``.

Registered on the ``distill`` command through the ``distill.commands`` entry point; ``python -m workers``
runs the same commands (the supervisor of ``distill serve`` starts its worker processes that way).
"""

from __future__ import annotations

import logging
import os
import sys
import threading
from typing import Annotated

import typer

from distill.errors import DistillError
from workers.settings import get_worker_settings


def worker(
    ray_address: Annotated[str | None, typer.Option(
        "--ray-address", help="run jobs on this Ray cluster ('local' starts one here); default: in-process")] = None,
    worker_id: Annotated[str | None, typer.Option(help="name recorded on claimed jobs (default host:pid:random)")] = None,
    once: Annotated[bool, typer.Option(help="exit when the queue is empty")] = False,
    concurrency: Annotated[int | None, typer.Option(help="Ray mode: jobs in flight (default: cluster GPUs, or 1)")] = None,
    gpus_per_job: Annotated[float | None, typer.Option(help="Ray mode: GPUs per job (default 1 with GPUs)")] = None,
    ray_num_gpus: Annotated[float | None, typer.Option(
        "--ray-num-gpus", help="with --ray-address local: GPUs of the local Ray (logical ones on a CPU host)")] = None,
    ray_num_cpus: Annotated[int | None, typer.Option(
        "--ray-num-cpus", help="with --ray-address local: CPUs of the local Ray (default: all)")] = None,
    in_process: Annotated[bool, typer.Option(
        "--in-process", help="run jobs in this process, without the supervising parent that kills a job which "
                             "ignores a cancel or a stop signal past its grace")] = False,
) -> None:
    """Claim queued jobs from the job store and run them (in a supervised child process, or as Ray tasks with
    --ray-address)."""
    from workers.db import store_errors
    from workers.local import Supervisor, install_stop_signals, new_worker_id, run_worker
    from workers.logs import configure_logging

    configure_logging()
    settings = get_worker_settings()
    from distill.cli import user_errors  # not at import time: distill.cli imports this module

    with user_errors():
        settings.check_home()
        settings.load_plugins()
    if (ray_num_gpus is not None or ray_num_cpus is not None) and ray_address != "local":
        typer.echo("error: --ray-num-gpus/--ray-num-cpus need --ray-address local (a cluster has its own)", err=True)
        raise typer.Exit(2)
    if (ray_num_gpus is not None and ray_num_gpus < 0) or (ray_num_cpus is not None and ray_num_cpus < 1):
        typer.echo("error: --ray-num-gpus must be >= 0 and --ray-num-cpus >= 1", err=True)
        raise typer.Exit(2)
    stop = threading.Event()
    install_stop_signals(stop)
    if ray_address:
        from workers.ray_executor import run_ray_worker

        run_ray_worker(settings, address=ray_address, worker_id=worker_id or new_worker_id("ray"), stop=stop,
                       concurrency=concurrency, gpus_per_job=gpus_per_job, once=once, num_gpus=ray_num_gpus,
                       num_cpus=ray_num_cpus)
    elif in_process or once:
        run_worker(settings, worker_id=worker_id, stop=stop, once=once)
        _exit_now()
    else:
        with user_errors(), store_errors(settings.resolved_database_url):
            supervisor = Supervisor(settings, 1, worker_ids=[worker_id] if worker_id else None)
        supervisor.start()
        while not stop.wait(0.5):
            pass
        supervisor.stop()
        _exit_now()


def _exit_now() -> None:
    """Exit without the interpreter's teardown of torch and the rest (seconds of CPU on a busy host, which a
    stop signal would otherwise wait for): the job is handed back, the store disposed, the logs flushed here."""
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def migrate() -> None:
    """Create or upgrade the job store's tables (also done automatically at start-up)."""
    from workers.jobs import JobStore

    try:
        store = JobStore.from_settings(get_worker_settings())
    except DistillError as exc:  # e.g. DISTILL_HOME not writable: one line, like serve, api and worker
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(2) from None
    typer.echo(f"job store at revision head: {store.engine.url.render_as_string(hide_password=True)}")


def register(cli: typer.Typer) -> None:
    """Entry point of the ``distill.commands`` group."""
    cli.command("worker")(worker)
    cli.command("migrate-db")(migrate)


def main() -> None:
    cli = typer.Typer(add_completion=False, no_args_is_help=True, help="distillery job workers")
    register(cli)
    cli()
