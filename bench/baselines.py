"""Baselines (random, herding, k-center) at IPC 1/10/50 and the whole-dataset ConvNet, protocol `dc`.

Prints one markdown table with the published numbers side by side. Results are appended to a JSON-lines
file as they finish (``--results``), so a long run can be resumed and partial tables printed.

    python bench/baselines.py --datasets mnist fashion-mnist cifar10 --ipcs 1 10 50 --epochs 300 --runs 2
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import tempfile
import time
from datetime import date
from pathlib import Path

import torch

from distill.archive import read_archive
from distill.data import get_dataset
from distill.evaluate import EvalConfig, evaluate_distilled, evaluate_full
from distill.runner import RunRequest, run_to_archive

# Published protocol-dc references (docs/METHODS.md §8; CIFAR-10 from InfoUtil's table).
PUBLISHED = {
    ("cifar10", "random"): {1: "14.4±2.0", 10: "26.0±1.2", 50: "43.4±1.0"},
    ("cifar10", "herding"): {1: "21.5±1.2", 10: "31.6±0.7", 50: "40.4±0.6"},
    ("cifar10", "kcenter"): {1: "23.3±0.9*", 10: "36.4±0.6*", 50: "48.7±0.3*"},
    ("cifar10", "full"): {0: "84.8±0.1"},
}


def device_name() -> str:
    if torch.cuda.is_available():
        return torch.cuda.get_device_name(0)
    return f"CPU {torch.get_num_threads()} threads ({platform.machine()})"


def load_results(path: Path) -> list[dict]:
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def measure(args: argparse.Namespace) -> list[dict]:
    results = load_results(args.results)
    done = {(r["dataset"], r["method"], r["ipc"]) for r in results if r.get("augment", "auto") == args.augment}
    device = "cuda" if torch.cuda.is_available() else "cpu"
    for dataset in args.datasets:
        ds = get_dataset(dataset)
        for ipc in args.ipcs:
            for method in args.methods:
                if (dataset, method, ipc) in done:
                    continue
                epochs = args.epochs_by_ipc.get(ipc, args.epochs)
                with tempfile.TemporaryDirectory() as tmp:
                    start = time.perf_counter()
                    run = run_to_archive(RunRequest(dataset, method, ipc, {}, seed=0, device=device), Path(tmp) / "a.tar")
                    distill_seconds = time.perf_counter() - start
                    archive = read_archive(run.path)
                config = EvalConfig(runs=args.runs, epochs=epochs, test_limit=args.test_limit, device=device,
                                    augment=args.augment)
                result = evaluate_distilled(archive.distilled, ds, config)
                row = {
                    "dataset": dataset, "method": method, "ipc": ipc, "epochs": epochs, "runs": args.runs,
                    "mean": round(result.accuracy_mean, 2), "std": round(result.accuracy_std, 2),
                    "accuracies": [round(a, 2) for a in result.accuracies], "test_images": result.test_images,
                    "distill_s": round(distill_seconds, 1), "eval_s": result.wall_seconds, "device": device_name(),
                    "date": date.today().isoformat(), "augment": args.augment,
                }
                _append(args.results, row)
                results.append(row)
                print(json.dumps(row), file=sys.stderr, flush=True)
        if args.full_epochs and (dataset, "full", 0) not in done:
            config = EvalConfig(runs=1, epochs=args.full_epochs, test_limit=args.test_limit, device=device)
            result = evaluate_full(ds, config, max_per_class=args.full_max_per_class)
            row = {"dataset": dataset, "method": "full", "ipc": 0, "epochs": args.full_epochs, "runs": 1,
                   "mean": round(result.accuracy_mean, 2), "std": 0.0, "accuracies": result.accuracies,
                   "test_images": result.test_images, "train_images": result.train_images, "distill_s": 0.0,
                   "eval_s": result.wall_seconds, "device": device_name(), "date": date.today().isoformat()}
            _append(args.results, row)
            results.append(row)
            print(json.dumps(row), file=sys.stderr, flush=True)
    return results


def _append(path: Path, row: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as handle:
        handle.write(json.dumps(row) + "\n")


def table(results: list[dict]) -> str:
    lines = [
        "| dataset | method | IPC | ours: acc % (mean ± std) | published | runs x epochs | test images | eval s "
        "| device | date |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    order = {"random": 0, "herding": 1, "kcenter": 2, "full": 3}
    for r in sorted(results, key=lambda r: (r["dataset"], r["ipc"] if r["ipc"] else 999, order.get(r["method"], 9))):
        published = PUBLISHED.get((r["dataset"], r["method"]), {}).get(r["ipc"], "n/a")
        ipc = r["ipc"] if r["method"] != "full" else f"all ({r.get('train_images', '?')} images)"
        aug = "none" if r.get("augment") == "none" else "DSA"
        lines.append(
            f"| {r['dataset']} | {r['method']} | {ipc} | {r['mean']:.2f} ± {r['std']:.2f} | {published} | "
            f"{r['runs']} x {r['epochs']}, aug {aug} | {r['test_images']} | {r['eval_s']:.0f} | {r['device']} | {r['date']} |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--datasets", nargs="+", default=["mnist", "fashion-mnist", "cifar10"])
    parser.add_argument("--methods", nargs="+", default=["random", "herding", "kcenter"])
    parser.add_argument("--ipcs", nargs="+", type=int, default=[1, 10, 50])
    parser.add_argument("--epochs", type=int, default=1000, help="student epochs (protocol dc default 1000)")
    parser.add_argument("--epochs-ipc50", type=int, default=None, help="a smaller budget for IPC 50 on a CPU")
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--augment", default="auto", help="DSA strategy during evaluation; 'none' = DC paper's CIFAR protocol")
    parser.add_argument("--test-limit", type=int, default=None)
    parser.add_argument("--full-epochs", type=int, default=0, help="whole-dataset epochs (0 = skip)")
    parser.add_argument("--full-max-per-class", type=int, default=None)
    parser.add_argument("--results", type=Path, default=Path("bench/results/baselines.jsonl"))
    parser.add_argument("--table-only", action="store_true", help="print the table of stored results")
    args = parser.parse_args()
    args.epochs_by_ipc = {50: args.epochs_ipc50} if args.epochs_ipc50 else {}
    results = load_results(args.results) if args.table_only else measure(args)
    print(table(results))


if __name__ == "__main__":
    main()
