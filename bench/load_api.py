"""Load on the HTTP API: N concurrent clients poll job status and list jobs for a bounded time while real
jobs are submitted and run by a local worker. Prints markdown tables: latency of status and list requests,
errors, and the service's overhead per job (time around the method's own run).

    python bench/load_api.py --clients 50 --seconds 20            # SQLite under a temporary DISTILL_HOME
    python bench/load_api.py --database-url postgresql+psycopg://postgres@127.0.0.1:5432/test

Starts `python -m workers api` and `python -m workers worker` itself and stops them at the end.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import random
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from datetime import datetime
from pathlib import Path

import httpx

KEY = "bench-key"
JOB = {"dataset": "mnist", "method": "random", "ipc": 10, "params": {}, "max_per_class": 200}


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    k = min(len(ordered) - 1, max(0, round(q / 100 * (len(ordered) - 1))))
    return ordered[k]


async def client_loop(client: httpx.AsyncClient, job_ids: list[str], deadline: float, stats: dict) -> None:
    n = 0
    while time.monotonic() < deadline:
        n += 1
        listing = n % 5 == 0 or not job_ids
        start = time.perf_counter()
        try:
            if listing:
                response = await client.get("/jobs", params={"limit": 20})
            else:
                response = await client.get(f"/jobs/{random.choice(job_ids)}")
            ok = response.status_code == 200
        except httpx.HTTPError:
            ok = False
        elapsed = (time.perf_counter() - start) * 1000
        stats["list" if listing else "status"].append(elapsed)
        if not ok:
            stats["errors"] += 1


async def submitter(client: httpx.AsyncClient, job_ids: list[str], deadline: float, every: float,
                    post_ms: list[float]) -> None:
    seed = 0
    while time.monotonic() < deadline:
        seed += 1
        start = time.perf_counter()
        response = await client.post("/jobs", json={**JOB, "seed": seed})
        post_ms.append((time.perf_counter() - start) * 1000)
        response.raise_for_status()
        job_ids.append(response.json()["id"])
        await asyncio.sleep(every)


async def run_load(base_url: str, clients: int, seconds: float, submit_every: float) -> tuple[dict, list[str], list[float]]:
    stats: dict = {"status": [], "list": [], "errors": 0}
    job_ids: list[str] = []
    post_ms: list[float] = []
    limits = httpx.Limits(max_connections=clients + 5, max_keepalive_connections=clients + 5)
    async with httpx.AsyncClient(base_url=base_url, headers={"Authorization": f"Bearer {KEY}"}, timeout=30,
                                 limits=limits) as client:
        first = await client.post("/jobs", json={**JOB, "seed": 0})
        job_ids.append(first.json()["id"])
        deadline = time.monotonic() + seconds
        tasks = [asyncio.create_task(client_loop(client, job_ids, deadline, stats)) for _ in range(clients)]
        tasks.append(asyncio.create_task(submitter(client, job_ids, deadline, submit_every, post_ms)))
        await asyncio.gather(*tasks)
    return stats, job_ids, post_ms


def wait_healthy(base_url: str, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if httpx.get(base_url + "/healthz", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    raise SystemExit("API did not become healthy")


def parse_time(value: str | None) -> datetime | None:
    return datetime.fromisoformat(value) if value else None


def job_overheads(base_url: str, job_ids: list[str], home: Path, timeout: float) -> list[dict]:
    """Per finished job: queue wait, total wall time, the method's own time (manifest), and the rest."""
    import json
    import tarfile

    rows = []
    deadline = time.monotonic() + timeout
    with httpx.Client(base_url=base_url, headers={"Authorization": f"Bearer {KEY}"}, timeout=30) as client:
        for job_id in job_ids:
            while True:
                job = client.get(f"/jobs/{job_id}").json()
                if job["status"] in ("succeeded", "failed", "cancelled") or time.monotonic() > deadline:
                    break
                time.sleep(0.2)
            if job["status"] != "succeeded":
                continue
            created, started, finished = (parse_time(job[k]) for k in ("created_at", "started_at", "finished_at"))
            with tarfile.open(home / "artifacts" / f"{job_id}.tar") as tar:
                manifest = json.load(tar.extractfile("manifest.json"))
            method_s = float(manifest["timings"].get("total", 0.0))
            wall = (finished - created).total_seconds()
            run = (finished - started).total_seconds()
            rows.append({"queue_s": (started - created).total_seconds(), "wall_s": wall, "run_s": run,
                         "method_s": method_s, "overhead_s": run - method_s})
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--clients", type=int, default=50)
    parser.add_argument("--seconds", type=float, default=20.0)
    parser.add_argument("--submit-every", type=float, default=1.0, help="seconds between job submissions")
    parser.add_argument("--database-url", default=None, help="default: SQLite under the temporary home")
    parser.add_argument("--poll-seconds", type=float, default=0.5, help="worker poll interval")
    args = parser.parse_args()

    home = Path(tempfile.mkdtemp(prefix="distill-load-"))
    port = free_port()
    base_url = f"http://127.0.0.1:{port}"
    env = dict(os.environ, DISTILL_HOME=str(home), DISTILL_API_KEYS=KEY, DISTILL_POLL_SECONDS=str(args.poll_seconds),
               DISTILL_DEVICE="cpu", OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    schema = None
    if args.database_url:
        env["DISTILL_DATABASE_URL"] = args.database_url
        if args.database_url.startswith("postgresql"):
            schema = f"bench_{uuid.uuid4().hex[:8]}"
            env["DISTILL_DB_SCHEMA"] = schema
    log = open(home / "service.log", "wb")
    worker = subprocess.Popen([sys.executable, "-m", "workers", "worker"], env=env, stdout=log, stderr=subprocess.STDOUT)
    api = subprocess.Popen([sys.executable, "-m", "workers", "api", "--port", str(port), "--no-access-log"], env=env,
                           stdout=log, stderr=subprocess.STDOUT)
    try:
        wait_healthy(base_url)
        stats, job_ids, post_ms = asyncio.run(run_load(base_url, args.clients, args.seconds, args.submit_every))
        overheads = job_overheads(base_url, job_ids, home, timeout=120)
    finally:
        for proc in (api, worker):
            proc.send_signal(signal.SIGTERM)
        for proc in (api, worker):
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                proc.kill()
        log.close()
        shutil.rmtree(home, ignore_errors=True)
        if schema:
            from sqlalchemy import create_engine, text

            engine = create_engine(args.database_url)
            with engine.begin() as conn:
                conn.execute(text(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE'))
            engine.dispose()

    backend = "PostgreSQL" if args.database_url and args.database_url.startswith("postgresql") else "SQLite"
    total = len(stats["status"]) + len(stats["list"])
    print(f"\nLoad: {args.clients} clients for {args.seconds:.0f} s, {backend}, one CPU worker, "
          f"a job (random, mnist, ipc {JOB['ipc']}, max_per_class {JOB['max_per_class']}) every {args.submit_every} s\n")
    print("| request | count | p50 ms | p95 ms | p99 ms | max ms |")
    print("|---|---:|---:|---:|---:|---:|")
    for name, values in (("GET /jobs/{id}", stats["status"]), ("GET /jobs?limit=20", stats["list"]),
                         ("POST /jobs", post_ms)):
        print(f"| {name} | {len(values)} | {percentile(values, 50):.1f} | {percentile(values, 95):.1f} | "
              f"{percentile(values, 99):.1f} | {max(values) if values else float('nan'):.1f} |")
    print(f"\nerrors: {stats['errors']} of {total} requests; throughput {total / args.seconds:.0f} requests/s\n")
    if overheads:
        def med(key: str) -> float:
            return statistics.median(r[key] for r in overheads)

        print("| jobs finished | queue wait s (median) | run s (median) | method s (median) | "
              "service overhead per job s (median) | wall s (median) |")
        print("|---:|---:|---:|---:|---:|---:|")
        print(f"| {len(overheads)} of {len(job_ids)} | {med('queue_s'):.2f} | {med('run_s'):.2f} | {med('method_s'):.2f} "
              f"| {med('overhead_s'):.2f} | {med('wall_s'):.2f} |")
        print("\nqueue wait includes waiting behind earlier jobs on the single worker; overhead = claim-to-finish "
              "time minus the method's own total (dataset load, archive write, DB writes, heartbeats).")


if __name__ == "__main__":
    main()
