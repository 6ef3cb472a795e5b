"""Every pixel-space method end to end through the CLI: ``distill run`` then ``distill eval``, one dataset.

The point is the path a user takes (CLI, archive on disk, evaluation of that archive), at small documented
budgets that fit a CPU; accuracy against ``random`` at the same budget is printed beside it. Budgets are
those of bench/pixel_accuracy.py and bench/pixel_accuracy_mtt.py (the papers' budgets need a GPU).

    python bench/pixel_e2e.py --dataset fashion-mnist [--methods dd dc ...] [--ipc 1]

Prints a markdown table: method, budget, distill seconds, accuracy (mean ± std).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from pixel_accuracy import budget as pixel_budget  # sibling bench scripts (bench/ is on sys.path)
from pixel_accuracy_mtt import BUDGETS as TRAJECTORY_BUDGETS
from pixel_accuracy_mtt import add_budget_arguments

METHODS = ["random", "dd", "dc", "dsa", "dm", "mtt", "datm", "dq"]
# DQ through the CLI trains (and caches) a small teacher for its features; pixel_accuracy_mtt.py instead
# passes an expert snapshot as teacher_weights, which needs its expert buffer.
DQ_BUDGET = {"teacher_epochs": 2, "teacher_max_per_class": 300}


def method_budget(method: str, dataset: str) -> dict:
    """The ``--set`` parameters of ``method``: MTT/DATM use the digits budget of pixel_accuracy_mtt.py on
    every dataset (one 4-epoch expert), the others pixel_accuracy.py's budget for the dataset."""
    if method in ("mtt", "datm"):
        return dict(TRAJECTORY_BUDGETS["mnist"][method])
    if method == "dq":
        return dict(DQ_BUDGET)
    return pixel_budget(method).params_for(dataset)


def distill_cli() -> list[str]:
    return [sys.executable, "-m", "distill.cli"]


def run_method(method: str, args: argparse.Namespace, folder: Path) -> tuple[float, dict]:
    archive = folder / f"{method}.tar"
    sets = [item for key, value in method_budget(method, args.dataset).items() for item in ("--set", f"{key}={value}")]
    start = time.perf_counter()
    subprocess.run([*distill_cli(), "run", method, "--dataset", args.dataset, "--ipc", str(args.ipc), "--out",
                    str(archive), "--max-per-class", str(args.max_per_class), "--seed", str(args.seed), "--quiet",
                    *sets], check=True)
    seconds = time.perf_counter() - start
    out = subprocess.run([*distill_cli(), "eval", str(archive), "--runs", str(args.runs), "--epochs", str(args.epochs),
                          "--test-limit", str(args.test_limit), "--json"], check=True, capture_output=True, text=True)
    return seconds, json.loads(out.stdout)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dataset", default="fashion-mnist")
    parser.add_argument("--methods", nargs="+", default=METHODS, choices=METHODS)
    add_budget_arguments(parser)
    args = parser.parse_args()
    print(f"{args.dataset}, IPC {args.ipc}, {args.max_per_class} training images per class seen; eval protocol dc, "
          f"{args.epochs} epochs, {args.runs} runs, {args.test_limit} test images\n")
    print("| method | budget (`--set`) | distill s | accuracy % (mean ± std) | eval lr |")
    print("|---|---|---|---|---|")
    with tempfile.TemporaryDirectory() as tmp:
        for method in args.methods:
            seconds, result = run_method(method, args, Path(tmp))
            budget = ", ".join(f"{k}={v}" for k, v in method_budget(method, args.dataset).items()) or "-"
            print(f"| {method} | {budget} | {seconds:.0f} | {result['accuracy_mean']:.2f} ± {result['accuracy_std']:.2f} "
                  f"| {result['lr']:.4g} |", flush=True)


if __name__ == "__main__":
    main()
