"""The main job end to end on the embedded default: request -> queue -> worker -> archive, over real HTTP.

Starts ``distill serve`` (API + one local worker, SQLite job store under DISTILL_HOME) on a free loopback
port and, through :mod:`distill.client` as any program would, submits ``POST /jobs`` (default: the headline
method ``oq`` on MNIST, IPC 10), shows the job's stage and progress while it runs, downloads the archive
(checked against the job's sha256, written to a temporary name and renamed) and stops the server.
``make demo`` then runs ``distill eval`` on the archive.

    python scripts/demo.py --out out/mnist-oq-10.tar [--method oq] [--dataset mnist] [--ipc 10]
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx

from distill.api_types import Job
from distill.client import ApiError, Client


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_healthy(client: httpx.Client, server: subprocess.Popen, timeout: float = 120.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if server.poll() is not None:
            raise SystemExit(f"error: the server exited with code {server.returncode} before it was ready")
        try:
            if client.get("/healthz").status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.5)
    raise SystemExit("error: the server did not become healthy in time")


class Follow:
    """Prints the job's status, stage and progress on a stage change and at most every ``every`` seconds."""

    def __init__(self, every: float = 15.0):
        self.every, self.last, self.stage = every, 0.0, None

    def __call__(self, job: Job) -> None:
        now = time.monotonic()
        stage = (job.status, job.stage)
        if stage != self.stage or now - self.last >= self.every or job.terminal:
            print(f"  {job.status:<9} stage={job.stage or '-':<10} progress={100 * job.progress:5.1f} %", flush=True)
            self.stage, self.last = stage, now


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--dataset", default="mnist")
    parser.add_argument("--method", default="oq")
    parser.add_argument("--ipc", type=int, default=10)
    parser.add_argument("--max-per-class", type=int, default=500,
                        help="training images per class the job sees (keeps the demo to minutes on a CPU)")
    parser.add_argument("--params", default="{}", help="method parameters as JSON")
    args = parser.parse_args()

    try:  # checked before any server starts
        params = json.loads(args.params)
    except json.JSONDecodeError as exc:
        raise SystemExit(f"error: --params is not valid JSON: {exc}") from None

    port = free_port()
    distill = Path(sys.executable).with_name("distill")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    log_path = args.out.with_name(f"{args.out.name}.server.log")
    print(f"distill serve on 127.0.0.1:{port} (API + one local worker; log: {log_path})", flush=True)
    with open(log_path, "w") as log:
        server = subprocess.Popen([str(distill), "serve", "--port", str(port), "--no-access-log"],
                                  stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=60.0) as raw:
                wait_healthy(raw, server)
            with Client(f"http://127.0.0.1:{port}", api_key="", timeout=60.0) as client:
                request = {"dataset": args.dataset, "method": args.method, "ipc": args.ipc, "params": params,
                           "max_per_class": args.max_per_class}
                try:
                    job = client.submit(args.method, args.dataset, args.ipc, params=params,
                                        max_per_class=args.max_per_class)
                except ApiError as exc:
                    raise SystemExit(f"error: POST /jobs -> {exc.status}: " + "; ".join(exc.lines())) from None
                print(f"POST /jobs {json.dumps(request)} -> job {job.id}", flush=True)
                job = client.wait(job, on_progress=Follow(), poll=2.0, raise_on_failure=False)
                if job.status != "succeeded":
                    raise SystemExit(f"error: job {job.id} {job.status}: {job.error}")
                client.download(job, args.out)  # resumable, sha256-checked, temporary name then rename
                assert job.artifact is not None
                print(f"wrote {args.out} ({job.artifact.bytes} bytes, sha256 {job.artifact.sha256[:16]}...)")
        finally:
            os.killpg(server.pid, signal.SIGTERM)
            try:
                server.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(server.pid, signal.SIGKILL)

if __name__ == "__main__":
    main()
