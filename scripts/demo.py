"""The main job end to end on the embedded default: request -> queue -> worker -> archive, over real HTTP.

Starts ``distill serve`` (API + one local worker, SQLite job store under DISTILL_HOME) on a free loopback
port, submits ``POST /jobs`` (default: the headline method ``oq`` on MNIST, IPC 10), shows the job's
stage and progress while it runs, downloads the archive (checked against the job's sha256, written to a
temporary name and renamed) and stops the server. ``make demo`` then runs ``distill eval`` on the archive.

    python scripts/demo.py --out out/mnist-oq-10.tar [--method oq] [--dataset mnist] [--ipc 10]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx


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


def follow(client: httpx.Client, job_id: str, poll: float = 2.0) -> dict:
    """Poll the job until it finishes, printing its stage and progress on one line."""
    last = ""
    while True:
        job = client.get(f"/jobs/{job_id}").raise_for_status().json()
        line = f"  {job['status']:<9} stage={job.get('stage') or '-':<10} progress={100 * (job.get('progress') or 0):5.1f} %"
        if line != last:
            print(line, flush=True)
            last = line
        if job["status"] in ("succeeded", "failed", "cancelled"):
            return job
        time.sleep(poll)


def download(client: httpx.Client, job: dict, out: Path) -> None:
    tmp = out.with_name(f".{out.name}.{os.getpid()}.part")
    digest = hashlib.sha256()
    try:
        with client.stream("GET", job["artifact"]["url"]) as response, open(tmp, "wb") as handle:
            response.raise_for_status()
            for chunk in response.iter_bytes():
                digest.update(chunk)
                handle.write(chunk)
        if digest.hexdigest() != job["artifact"]["sha256"]:
            raise SystemExit("error: the downloaded archive does not match the job's sha256")
        tmp.replace(out)
    finally:
        tmp.unlink(missing_ok=True)


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
            with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=60.0) as client:
                wait_healthy(client, server)
                request = {"dataset": args.dataset, "method": args.method, "ipc": args.ipc, "params": params,
                           "max_per_class": args.max_per_class}
                response = client.post("/jobs", json=request)
                if response.status_code >= 400:
                    raise SystemExit(f"error: POST /jobs -> {response.status_code}: {response.text}")
                job = response.json()
                print(f"POST /jobs {json.dumps(request)} -> job {job['id']}", flush=True)
                job = follow(client, job["id"])
                if job["status"] != "succeeded":
                    raise SystemExit(f"error: job {job['id']} {job['status']}: {job.get('error')}")
                download(client, job, args.out)
                print(f"wrote {args.out} ({job['artifact']['bytes']} bytes, sha256 {job['artifact']['sha256'][:16]}...)")
        finally:
            os.killpg(server.pid, signal.SIGTERM)
            try:
                server.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(server.pid, signal.SIGKILL)

if __name__ == "__main__":
    main()
