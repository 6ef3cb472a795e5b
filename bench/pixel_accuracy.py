"""Pixel-space methods against `random` at IPC 1 on small, documented CPU budgets (same evaluation for all).

Each invocation distils and evaluates the given methods on one dataset and appends one JSON line per
method to ``--results`` (runs split into short steps on the shared CPU); ``--report`` prints the table.

    python bench/pixel_accuracy.py --dataset mnist --methods random dc dsa dm dd
    python bench/pixel_accuracy.py --report

Evaluation: distill.evaluate protocol 'dc' (ConvNet-3 IN, SGD m 0.9, lr 0.01 or the archive's learned lr,
DSA augmentation), ``EVAL_EPOCHS`` epochs instead of 1000, ``EVAL_RUNS`` runs, ``TEST_LIMIT`` test images
(stratified, seeded). Distillation budgets are in ``METHODS`` (reduced from the papers: see
docs/BENCHMARKS.md, "Every pixel method at a reduced budget"). To add a method, append a ``MethodBudget`` to ``METHODS``.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from dataclasses import dataclass, field
from datetime import date
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from distill.archive import read_archive  # noqa: E402
from distill.data import get_dataset  # noqa: E402
from distill.evaluate import EvalConfig, evaluate_distilled  # noqa: E402
from distill.runner import RunRequest, run_to_archive  # noqa: E402

RESULTS = Path(__file__).parent / "results" / "pixel_accuracy.jsonl"
EVAL_EPOCHS = 100
EVAL_RUNS = 2
TEST_LIMIT = 1000
IPC = 1


@dataclass(frozen=True)
class MethodBudget:
    """One method's reduced budget: ``params`` go to ``distill run --set``; ``per_dataset`` overrides them."""

    method: str
    params: dict = field(default_factory=dict)
    per_dataset: dict = field(default_factory=dict)
    note: str = ""

    def params_for(self, dataset: str) -> dict:
        return {**self.params, **self.per_dataset.get(dataset, {})}


METHODS: list[MethodBudget] = [
    MethodBudget("random", note="IPC real images per class"),
    MethodBudget("dm", {"iterations": 40, "batch_real": 32}, note="paper: 20000 iterations, batch_real 256"),
    MethodBudget("dc", {"iterations": 20, "batch_real": 32, "init": "real"},
                 note="paper: 1000 iterations, batch_real 256, init noise"),
    MethodBudget("dsa", {"iterations": 20, "batch_real": 32}, note="paper: 1000 iterations, batch_real 256"),
    MethodBudget("dd", {"iterations": 30, "batch_real": 64, "lr": 0.05, "init": "real"},
                 note="paper: 400 epochs x 59 steps, batch 1024, Adam lr 0.01, init noise"),
]


def budget(name: str) -> MethodBudget:
    for entry in METHODS:
        if entry.method == name:
            return entry
    raise SystemExit(f"no budget for method '{name}'; known: {', '.join(m.method for m in METHODS)}")


def run_one(dataset: str, entry: MethodBudget, seed: int, threads: int) -> dict:
    """Distil (timed) and evaluate one method; returns the JSON record."""
    import torch

    torch.set_num_threads(threads)
    params = entry.params_for(dataset)
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / f"{entry.method}.tar"
        start = time.perf_counter()
        result = run_to_archive(RunRequest(dataset, entry.method, IPC, params, seed=seed, device="cpu"), out)
        distill_s = time.perf_counter() - start
        archive = read_archive(out)
    distilled = archive.distilled if hasattr(archive, "distilled") else archive
    config = EvalConfig(protocol="dc", runs=EVAL_RUNS, epochs=EVAL_EPOCHS, test_limit=TEST_LIMIT, seed=seed)
    ev = evaluate_distilled(distilled, get_dataset(dataset), config)
    return {
        "dataset": dataset, "method": entry.method, "ipc": IPC, "params": params, "seed": seed,
        "distill_seconds": round(distill_s, 1), "eval_seconds": ev.wall_seconds, "eval_lr": ev.lr,
        "accuracy_mean": round(ev.accuracy_mean, 2), "accuracy_std": round(ev.accuracy_std, 2),
        "accuracies": [round(a, 2) for a in ev.accuracies], "epochs": EVAL_EPOCHS, "runs": EVAL_RUNS,
        "test_images": ev.test_images, "final_loss": result.distilled.metrics.get("final_loss"),
        "first_loss": result.distilled.metrics.get("first_loss"), "date": str(date.today()),
        "device": f"CPU, {threads} threads",
    }


def report(path: Path) -> None:
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.exists() else []
    latest: dict[tuple[str, str], dict] = {}
    for row in rows:
        latest[(row["dataset"], row["method"])] = row
    print(f"IPC {IPC}; evaluation protocol dc, ConvNet-3 IN, {EVAL_EPOCHS} epochs, {EVAL_RUNS} runs, "
          f"{TEST_LIMIT} test images; CPU 2 cores (shared)\n")
    print("| dataset | method | budget (--set) | accuracy % (mean ± std) | vs random | distill s | eval lr |")
    print("|---|---|---|---|---|---|---|")
    for (dataset, method), row in sorted(latest.items()):
        base = latest.get((dataset, "random"))
        delta = f"{row['accuracy_mean'] - base['accuracy_mean']:+.2f}" if base and method != "random" else ""
        params = ", ".join(f"{k}={v}" for k, v in row["params"].items()) or "-"
        print(f"| {dataset} | {method} | {params} | {row['accuracy_mean']:.2f} ± {row['accuracy_std']:.2f} | {delta} "
              f"| {row['distill_seconds']} | {row['eval_lr']:.4g} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dataset", default="mnist")
    parser.add_argument("--methods", nargs="*", default=[m.method for m in METHODS])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1, help="1 is faster on the shared, loaded CPU")
    parser.add_argument("--results", type=Path, default=RESULTS)
    parser.add_argument("--report", action="store_true", help="print the markdown table of the results file")
    args = parser.parse_args()
    if args.report:
        report(args.results)
        return
    args.results.parent.mkdir(parents=True, exist_ok=True)
    for name in args.methods:
        record = run_one(args.dataset, budget(name), args.seed, args.threads)
        with args.results.open("a") as fh:
            fh.write(json.dumps(record) + "\n")
        print(json.dumps(record), flush=True)


if __name__ == "__main__":
    main()
