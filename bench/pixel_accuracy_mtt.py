"""MTT, DATM and DQ against `random` at small, documented CPU budgets (protocol dc, same eval for all).

Each invocation distils and evaluates the given methods on one dataset and appends one JSON line per method
to ``--results`` (so runs can be split into short steps); ``--report`` prints the markdown table.

    python bench/pixel_accuracy_mtt.py --dataset mnist --methods random mtt datm dq
    python bench/pixel_accuracy_mtt.py --report

All methods see the same ``--max-per-class`` slice; `random` and MTT's real initialisation draw the same
images for a seed, so MTT's gain over `random` is what distillation added. Budgets are in ``BUDGETS``.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from datetime import date
from pathlib import Path

import torch

from distill.archive import read_archive
from distill.data import get_dataset
from distill.evaluate import EvalConfig, evaluate_distilled
from distill.runner import RunRequest, run_to_archive

RESULTS = Path(__file__).parent / "results" / "pixel_mtt_accuracy.jsonl"

# Reduced budgets for a shared 2-core CPU (the references run 5000 iterations on 100 experts x 50 epochs).
TRAJ = dict(experts=1, expert_train_epochs=4, expert_model="convnet")
TRAJ_C10 = dict(experts=1, expert_train_epochs=3, expert_model="convnet")
MATCH = dict(iterations=20, syn_steps=6, expert_epochs=1, max_start_epoch=4, lr_img=1000.0, lr_lr=1e-6)
DATM_EXTRA = dict(min_start_epoch=0, sequential_generation=False, threshold=1.0)
BUDGETS: dict[str, dict[str, dict]] = {
    "mnist": {"random": {}, "mtt": TRAJ | MATCH, "datm": TRAJ | MATCH | DATM_EXTRA, "dq": {"teacher_from_buffer": True}},
    "cifar10": {"random": {}, "mtt": TRAJ_C10 | MATCH | dict(max_start_epoch=3),
                "datm": TRAJ_C10 | MATCH | DATM_EXTRA | dict(max_start_epoch=3), "dq": {"teacher_from_buffer": True}},
}


def expert_teacher(dataset: str, max_per_class: int) -> str:
    """DQ's "given pretrained weights": the last snapshot of expert 0 of this dataset's MTT buffer, saved as a
    state dict (saves training a separate teacher on the shared CPU)."""
    from safetensors.torch import save_file

    from distill.config import get_settings
    from pixelspace.experts import ExpertSettings, buffer_dir, load_buffer

    traj = BUDGETS[dataset]["mtt"]
    settings = ExpertSettings(dataset=dataset, model=traj["expert_model"], epochs=traj["expert_train_epochs"],
                              max_per_class=max_per_class)
    buffer = load_buffer(buffer_dir(settings))
    net = buffer.load_into(buffer.build_net(get_dataset(dataset)), 0, buffer.epochs)
    path = get_settings().home_dir / f"dq-teacher-{settings.key()}.safetensors"
    save_file({k: v.contiguous() for k, v in net.state_dict().items()}, str(path))
    return str(path)


def run_one(dataset: str, method: str, ipc: int, max_per_class: int, seed: int, config: EvalConfig,
            overrides: dict[str, str] | None = None) -> dict:
    params = dict(BUDGETS[dataset][method]) | (overrides if method != "random" and overrides else {})
    if params.pop("teacher_from_buffer", False):
        params["teacher_weights"] = expert_teacher(dataset, max_per_class)
    with tempfile.TemporaryDirectory() as tmp:
        start = time.perf_counter()
        result = run_to_archive(RunRequest(dataset, method, ipc, params, seed=seed, max_per_class=max_per_class,
                                           device="cpu"), Path(tmp) / "a.tar", log=print)
        distill_s = time.perf_counter() - start
        distilled = read_archive(Path(tmp) / "a.tar").distilled
    res = evaluate_distilled(distilled, get_dataset(dataset), config)
    metrics = result.manifest.get("metrics", {}) or result.distilled.metrics
    return {
        "dataset": dataset, "method": method, "ipc": ipc, "max_per_class": max_per_class, "seed": seed,
        "params": params, "distill_seconds": round(distill_s, 1), "accuracy_mean": round(res.accuracy_mean, 2),
        "accuracy_std": round(res.accuracy_std, 2), "accuracies": [round(a, 2) for a in res.accuracies],
        "eval_lr": res.lr, "eval_epochs": res.epochs, "eval_runs": res.runs, "test_images": res.test_images,
        "soft_labels": distilled.soft_labels is not None, "overrides": overrides or {},
        "loss_first": metrics.get("loss_first"), "loss_last": metrics.get("loss_last"),
        "date": str(date.today()), "device": f"CPU {torch.get_num_threads()} threads",
    }


def report(path: Path) -> str:
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    latest: dict[tuple, dict] = {}
    for row in rows:
        variant = ",".join(f"{k}={v}" for k, v in sorted(row.get("overrides", {}).items()))
        latest[(row["dataset"], row["ipc"], row["method"], variant)] = row
    lines = ["| dataset | IPC | method | accuracy % (mean ± std) | runs | eval lr | distill time "
             "| matching loss first → last | budget |",
             "|---|---|---|---|---|---|---|---|---|"]
    for (dataset, ipc, method, _), row in sorted(latest.items()):
        loss = f"{row['loss_first']:.3f} → {row['loss_last']:.3f}" if row.get("loss_first") is not None else "–"
        budget = ", ".join(f"{k}={Path(v).name if k.endswith('weights') else v}" for k, v in row["params"].items()) or "–"
        lines.append(f"| {dataset} | {ipc} | {method} | {row['accuracy_mean']:.2f} ± {row['accuracy_std']:.2f} | "
                     f"{row['eval_runs']} | {row['eval_lr']:.4g} | {row['distill_seconds']:.0f} s | {loss} | "
                     f"{budget}; max-per-class {row['max_per_class']} |")
    return "\n".join(lines)


def add_budget_arguments(parser: argparse.ArgumentParser) -> None:
    """The small-budget run and evaluation settings these CPU benches share (bench/pixel_e2e.py too)."""
    parser.add_argument("--ipc", type=int, default=1)
    parser.add_argument("--max-per-class", type=int, default=300)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--epochs", type=int, default=100)
    parser.add_argument("--runs", type=int, default=2)
    parser.add_argument("--test-limit", type=int, default=1000)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dataset", choices=sorted(BUDGETS))
    parser.add_argument("--methods", nargs="+", default=["random", "mtt", "datm", "dq"])
    add_budget_arguments(parser)
    parser.add_argument("--results", type=Path, default=RESULTS)
    parser.add_argument("--report", action="store_true")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a parameter of every non-random method (e.g. student_precision=fp32)")
    args = parser.parse_args()
    if args.report:
        print(report(args.results))
        return
    if args.dataset is None:
        parser.error("--dataset is required unless --report")
    config = EvalConfig(protocol="dc", runs=args.runs, epochs=args.epochs, test_limit=args.test_limit, device="cpu")
    args.results.parent.mkdir(parents=True, exist_ok=True)
    if any("=" not in item for item in args.overrides):
        parser.error("--set takes KEY=VALUE")
    overrides = dict(item.split("=", 1) for item in args.overrides)
    for method in args.methods:
        row = run_one(args.dataset, method, args.ipc, args.max_per_class, args.seed, config, overrides)
        with args.results.open("a") as handle:
            handle.write(json.dumps(row) + "\n")
        print(f"{args.dataset} ipc {args.ipc} {method}: {row['accuracy_mean']:.2f} ± {row['accuracy_std']:.2f} "
              f"(distill {row['distill_seconds']:.0f} s, eval lr {row['eval_lr']:.4g})", flush=True)


if __name__ == "__main__":
    main()
