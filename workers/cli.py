"""``distill serve`` (API + local workers, nothing else to start) and ``distill worker`` (local or Ray).

Registered on the main CLI through :func:`register`; ``python -m workers`` runs the same commands.
"""

from __future__ import annotations

import logging
import signal
import threading

import typer

from app.settings import LOOPBACK_HOSTS, get_service_settings

log = logging.getLogger("distill.serve")


def serve(
    host: str | None = typer.Option(None, help="bind address (default DISTILL_HOST, 127.0.0.1)"),
    port: int | None = typer.Option(None, help="port (default DISTILL_PORT, 8000)"),
    workers: int = typer.Option(-1, help="local worker processes; -1: one per GPU, or one on the CPU; 0: API only"),
    access_log: bool = typer.Option(True, help="log every HTTP request"),
) -> None:
    """Run the HTTP API and a local worker per GPU (one on the CPU) on this machine."""
    settings = get_service_settings()
    host = host or settings.host
    port = port or settings.port
    check_bind(host, settings.api_keys)

    import uvicorn

    from app.main import create_app
    from workers.local import Supervisor, local_gpu_count
    from workers.logs import UVICORN_LOG_CONFIG, configure_logging

    configure_logging()
    settings.load_plugins()
    app = create_app(settings)  # migrates the store before any worker starts
    gpus = local_gpu_count()
    count = workers if workers >= 0 else max(1, gpus)
    supervisor = Supervisor(settings, count, gpus=list(range(gpus)) if gpus and count <= gpus else None)
    supervisor.start()
    log.info("serving", extra={"host": host, "port": port, "workers": count, "gpus": gpus})
    # uvicorn re-raises the signal that stopped it once it is done; with the default handlers that would end this
    # process before the supervisor stops its workers, so catch it here and stop them below.
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, lambda received, _frame: log.info("stopping", extra={"signal": received}))
    try:
        uvicorn.run(app, host=host, port=port, log_config=UVICORN_LOG_CONFIG, access_log=access_log)
    finally:
        supervisor.stop()


def check_bind(host: str, api_keys: list[str]) -> None:
    """Without API keys anyone who can reach the port could run jobs: allow loopback only."""
    if not api_keys and host not in LOOPBACK_HOSTS:
        typer.echo(f"error: refusing to bind {host} without API keys: set DISTILL_API_KEYS or bind 127.0.0.1",
                   err=True)
        raise typer.Exit(2)


def worker(
    ray_address: str | None = typer.Option(
        None, "--ray-address", help="run jobs on this Ray cluster ('local' starts one here); default: in-process"
    ),
    worker_id: str | None = typer.Option(None, help="name recorded on claimed jobs (default host:pid:random)"),
    once: bool = typer.Option(False, help="exit when the queue is empty"),
    concurrency: int | None = typer.Option(None, help="Ray mode: jobs in flight (default: cluster GPUs, or 1)"),
    gpus_per_job: float | None = typer.Option(None, help="Ray mode: GPUs per job (default 1 with GPUs)"),
) -> None:
    """Claim queued jobs from the job store and run them (here, or as Ray tasks with --ray-address)."""
    from workers.local import install_stop_signals, new_worker_id, run_worker
    from workers.logs import configure_logging

    configure_logging()
    settings = get_service_settings()
    settings.load_plugins()
    stop = threading.Event()
    install_stop_signals(stop)
    if ray_address:
        from workers.ray_executor import run_ray_worker

        run_ray_worker(settings, address=ray_address, worker_id=worker_id or new_worker_id("ray"), stop=stop,
                       concurrency=concurrency, gpus_per_job=gpus_per_job, once=once)
    else:
        run_worker(settings, worker_id=worker_id, stop=stop, once=once)


def api(
    host: str | None = typer.Option(None, help="bind address (default DISTILL_HOST, 127.0.0.1)"),
    port: int | None = typer.Option(None, help="port (default DISTILL_PORT, 8000)"),
    access_log: bool = typer.Option(True, help="log every HTTP request"),
) -> None:
    """Run only the HTTP API (workers run elsewhere: `distill worker`)."""
    settings = get_service_settings()
    host = host or settings.host
    port = port or settings.port
    check_bind(host, settings.api_keys)  # before the heavy imports: a refusal is immediate

    import uvicorn

    from app.main import create_app
    from workers.logs import UVICORN_LOG_CONFIG, configure_logging

    configure_logging()
    settings.load_plugins()
    uvicorn.run(create_app(settings), host=host, port=port, log_config=UVICORN_LOG_CONFIG, access_log=access_log)


def migrate() -> None:
    """Create or upgrade the job store's tables (also done automatically at start-up)."""
    from workers.jobs import store_from_env

    store = store_from_env()
    typer.echo(f"job store at revision head: {store.engine.url.render_as_string(hide_password=True)}")


def register(app: typer.Typer) -> None:
    app.command("serve")(serve)
    app.command("worker")(worker)
    app.command("api")(api)
    app.command("migrate-db")(migrate)


def main() -> None:
    cli = typer.Typer(add_completion=False, no_args_is_help=True, help="distillery job service")
    register(cli)
    cli()
