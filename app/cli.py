"""``distill serve`` (API + local workers, nothing else to start) and ``distill api`` (the API alone).

They compose the HTTP API with the job layer, so they live on the app side; ``distill`` finds them through
the ``distill.commands`` entry point (pyproject.toml). ``python -m app serve|api`` runs the same commands.
"""

from __future__ import annotations

import logging
import signal
from typing import TYPE_CHECKING, Annotated

import typer

from app.settings import LOOPBACK_HOSTS, ApiSettings, get_api_settings
from workers.settings import WorkerSettings, get_worker_settings

if TYPE_CHECKING:
    from fastapi import FastAPI

log = logging.getLogger("distill.serve")

HostOption = Annotated[str | None, typer.Option(help="bind address (default DISTILL_HOST, 127.0.0.1)")]
PortOption = Annotated[int | None, typer.Option(help="port (default DISTILL_PORT, 8000)")]
AccessLogOption = Annotated[bool, typer.Option(help="log every HTTP request")]


def serve(
    host: HostOption = None,
    port: PortOption = None,
    workers: Annotated[int, typer.Option(
        help="local worker processes; -1: one per GPU, or one on the CPU; 0: API only")] = -1,
    access_log: AccessLogOption = True,
) -> None:
    """Run the HTTP API and a local worker per GPU (one on the CPU) on this machine."""
    settings = get_api_settings()
    host, port = _bind(settings, host, port)

    import uvicorn

    from app.main import problem_protocol
    from workers.local import Supervisor, local_gpu_count
    from workers.logs import UVICORN_LOG_CONFIG

    app, worker_settings = _build_app(settings)  # migrates the store before any worker starts
    gpus = local_gpu_count()
    count = workers if workers >= 0 else max(1, gpus)
    supervisor = Supervisor(worker_settings, count, gpus=list(range(gpus)) if gpus and count <= gpus else None)
    supervisor.start()
    log.info("serving", extra={"host": host, "port": port, "workers": count, "gpus": gpus})
    where = f"{count} local worker{'s' if count != 1 else ''} ({f'{gpus} GPU' if gpus else 'CPU'})" if count else "no workers"
    announce(host, port, settings, where)
    report_methods()
    # uvicorn re-raises the signal that stopped it once it is done; with the default handlers that would end this
    # process before the supervisor stops its workers, so catch it here and stop them below.
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, lambda received, _frame: log.info("stopping", extra={"signal": received}))
    try:
        uvicorn.run(app, host=host, port=port, log_config=UVICORN_LOG_CONFIG, access_log=access_log,
                    timeout_graceful_shutdown=GRACEFUL_SECONDS, http=problem_protocol())
    finally:
        supervisor.stop()


GRACEFUL_SECONDS = 5  # open event streams (the page, `distill logs -f`) must not hold a shutdown; clients reconnect


def announce(host: str, port: int, settings: ApiSettings, workers: str) -> None:
    """One readable line on stderr (the logs on stdout are JSON): where the page and the API are."""
    shown = "<this-host>" if host in ("0.0.0.0", "::") else (f"[{host}]" if ":" in host else host)
    base = f"http://{shown}:{port}"
    keys = "API keys required" if settings.api_keys else "no API keys (loopback only)"
    typer.echo(f"distillery: web page {base}/  ·  API {base} (docs {base}/docs)  ·  {workers}  ·  {keys}", err=True)


def report_methods() -> None:
    """Each method's hard requirements, checked once at start: the operator sees what users will be refused,
    and why, before anyone submits (GET /methods says the same to clients)."""
    from distill.methods.registry import available_methods
    from distill.requirements import method_requirements

    found = available_methods()
    missing = {name: reason for name, cls in found.items()
               if (reason := method_requirements(name, cls.Params().model_dump())[1]) is not None}
    if not missing:
        typer.echo(f"methods: all {len(found)} can run here", err=True)
        return
    typer.echo(f"methods: {len(found) - len(missing)} of {len(found)} can run here with their defaults; "
               + "; ".join(f"{name}: {reason}" for name, reason in missing.items()), err=True)


def api(host: HostOption = None, port: PortOption = None, access_log: AccessLogOption = True) -> None:
    """Run only the HTTP API (workers run elsewhere: `distill worker`)."""
    settings = get_api_settings()
    host, port = _bind(settings, host, port)  # before the heavy imports: a refusal is immediate

    import uvicorn

    from app.main import problem_protocol
    from workers.logs import UVICORN_LOG_CONFIG

    app, _ = _build_app(settings)
    announce(host, port, settings, "workers run elsewhere (distill worker)")
    report_methods()
    uvicorn.run(app, host=host, port=port, log_config=UVICORN_LOG_CONFIG, access_log=access_log,
                timeout_graceful_shutdown=GRACEFUL_SECONDS, http=problem_protocol())


def _bind(settings: ApiSettings, host: str | None, port: int | None) -> tuple[str, int]:
    """The address to bind; without API keys anyone who can reach the port could run jobs: loopback only."""
    host = host or settings.host
    if not settings.api_keys and host not in LOOPBACK_HOSTS:
        typer.echo(f"error: refusing to bind {host} without API keys: set DISTILL_API_KEYS or bind 127.0.0.1",
                   err=True)
        raise typer.Exit(2)
    return host, port or settings.port


def register(cli: typer.Typer) -> None:
    """Entry point of the ``distill.commands`` group: add ``serve`` and ``api`` to the ``distill`` command."""
    cli.command("serve")(serve)
    cli.command("api")(api)


def main() -> None:
    cli = typer.Typer(add_completion=False, no_args_is_help=True, help="distillery HTTP API")
    register(cli)
    cli()


def _build_app(settings: ApiSettings) -> tuple[FastAPI, WorkerSettings]:
    """Logging, a writable home, plugins and the migrated store, then the app: what serve and api share.
    Problems are one ``error:`` line and exit 2."""
    from app.main import create_app
    from distill.cli import user_errors  # not at import time: distill.cli imports this module
    from workers.db import store_errors
    from workers.logs import configure_logging

    configure_logging()
    worker_settings = get_worker_settings()
    with user_errors():
        worker_settings.check_home()
        worker_settings.load_plugins()
        with store_errors(worker_settings.resolved_database_url):
            app = create_app(settings, worker_settings)
    return app, worker_settings
