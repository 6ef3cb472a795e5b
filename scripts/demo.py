"""The main job end to end on the embedded default: request -> queue -> worker -> archive, over real HTTP.

Starts ``distill serve`` (API + one local worker, SQLite job store under DISTILL_HOME) on a free loopback
port and, through :mod:`distill.client` as any program would, submits ``POST /jobs`` (default: the headline
method ``oq`` on MNIST, IPC 10), prints the server's estimate and one line per stage while it runs, downloads the
archive (checked against the job's sha256, written to a temporary name and renamed), with ``--evaluate`` has the
server evaluate it (accuracy, random-subset control, gain), and stops the server.

    python scripts/demo.py --out out/mnist-oq-10.tar [--method oq] [--dataset mnist] [--ipc 10] [--evaluate]
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
from distill.progress import duration, score_text


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
    """One line per stage (when it starts, with the job's overall progress, elapsed time and ETA), and a line at
    most every ``every`` seconds within a long stage: a screen, not a log."""

    def __init__(self, label: str, every: float = 120.0):
        self.label, self.every, self.last, self.stage = label, every, 0.0, None

    def __call__(self, job: Job) -> None:
        now = time.monotonic()
        stage = (job.status, job.stage)
        if job.terminal or (stage == self.stage and now - self.last < self.every):
            return
        if job.status == "running" and job.stage is not None:
            left = f", about {duration(job.eta_seconds)} left" if job.eta_seconds is not None else ""
            print(f"  {self.label}: {job.stage:<9} {100 * job.overall_progress:3.0f}% overall, "
                  f"{duration(job.elapsed_seconds or 0)} elapsed{left}", flush=True)
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
    parser.add_argument("--evaluate", action="store_true",
                        help="then evaluate the archive on the server (accuracy, random-subset control, gain)")
    parser.add_argument("--eval-runs", type=int, default=2)
    parser.add_argument("--eval-epochs", type=int, default=300)
    parser.add_argument("--eval-test-limit", type=int, default=2000)
    args = parser.parse_args()

    try:  # checked before any server starts
        params = json.loads(args.params)
    except json.JSONDecodeError as exc:
        raise SystemExit(f"error: --params is not valid JSON: {exc}") from None

    port = free_port()
    distill = Path(sys.executable).with_name("distill")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    log_path = args.out.with_name(f"{args.out.name}.server.log")
    print(f"distill serve on 127.0.0.1:{port} (API + one local worker; its log: {log_path})", flush=True)
    with open(log_path, "w") as log:
        server = subprocess.Popen([str(distill), "serve", "--port", str(port), "--no-access-log"],
                                  stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
                                  env={**os.environ, "DISTILL_LOG_FORMAT": "json"})
        try:
            with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=60.0) as raw:
                wait_healthy(raw, server)
            with Client(f"http://127.0.0.1:{port}", api_key="", timeout=60.0) as client:
                request = {"dataset": args.dataset, "method": args.method, "ipc": args.ipc, "params": params,
                           "max_per_class": args.max_per_class}
                try:
                    job = client.submit(args.method, args.dataset, args.ipc, params=params,
                                        max_per_class=args.max_per_class, name="demo")
                except ApiError as exc:
                    raise SystemExit(f"error: POST /jobs -> {exc.status}: " + "; ".join(exc.lines())) from None
                print(f"POST /jobs {json.dumps(request)} -> job {job.id}", flush=True)
                if job.estimate is not None:
                    basis = ("from earlier jobs on this host" if job.estimate.basis == "history"
                             else "a rough prior until this method has run here")
                    print(f"  estimate: {duration(job.estimate.seconds)} ({basis}); stages: "
                          + ", ".join(s.name for s in job.estimate.stages), flush=True)
                job = client.wait(job, on_progress=Follow(job.id), poll=2.0, raise_on_failure=False)
                if job.status != "succeeded":
                    raise SystemExit(f"error: job {job.id} {job.status}: {job.error}")
                print(f"  {job.id}: succeeded in {duration(job.elapsed_seconds or 0)}", flush=True)
                client.download(job, args.out)  # resumable, sha256-checked, temporary name then rename
                assert job.artifact is not None
                print(f"wrote {args.out} ({job.artifact.bytes} bytes, sha256 {job.artifact.sha256[:16]}...)")
                if args.evaluate:
                    evaluate(client, job, args)
                print(f"the page: `distill serve`, then http://127.0.0.1:8000/#/jobs/{job.id} "
                      "(the job store under DISTILL_HOME keeps it)", flush=True)
        finally:
            os.killpg(server.pid, signal.SIGTERM)
            try:
                server.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(server.pid, signal.SIGKILL)


def evaluate(client: Client, job: Job, args: argparse.Namespace) -> None:
    """`distill eval`'s protocol as a job on the server: students on the archive, then on a random real subset
    of the same size (the control, cached under DISTILL_HOME), and the gain."""
    evaluation = client.evaluate(job, runs=args.eval_runs, epochs=args.eval_epochs, test_limit=args.eval_test_limit)
    print(f"POST /jobs/{job.id}/evaluations (runs {args.eval_runs}, epochs {args.eval_epochs}, "
          f"{args.eval_test_limit} test images) -> job {evaluation.id}", flush=True)
    evaluation = client.wait(evaluation, on_progress=Follow(evaluation.id), poll=2.0, raise_on_failure=False)
    result = evaluation.evaluation
    if evaluation.status != "succeeded" or result is None or result.accuracy is None:
        raise SystemExit(f"error: evaluation {evaluation.id} {evaluation.status}: {evaluation.error}")
    line = f"result: {args.method} accuracy {score_text(result.accuracy.mean, result.accuracy.std, result.accuracy.runs)}"
    if result.control is not None and result.gain is not None:
        line += (f"; random real images, same size: {score_text(result.control.mean, result.control.std, result.control.runs)}"
                 f"; gain {result.gain:+.2f} points")
    print(line + f" (evaluated in {duration(evaluation.elapsed_seconds or 0)})", flush=True)


if __name__ == "__main__":
    main()
