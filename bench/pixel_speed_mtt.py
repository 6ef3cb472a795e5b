"""MTT seconds per distillation iteration and peak memory: a reference-equivalent loop vs pixelspace.mtt.

Setting of docs/REFERENCE-TIMINGS.md: MNIST, IPC 10 (100 synthetic images, batch_syn = all), ConvNet-3 IN,
syn_steps 10, expert_epochs 2, DSA, 2 threads. Every configuration runs in its own fresh process (peak RSS
is per process), the configurations are interleaved ``--repeats`` times, and the table reports medians of
the per-iteration wall time, CPU time and the process's peak RSS, plus the RSS growth during iterations.

- ``reference``: a line-for-line re-implementation of mtt-distillation ``distill.py`` L294-399: a flat-
  parameter student (ReparamModule's role), a new random student net per iteration, ``create_graph`` per
  step, ``mse_loss(reduction='sum') / num_params`` normalisation, ``.backward()`` then SGD steps, and the
  real training split held as float tensors as ``distill.py`` does for ``pix_init real``.
- ``ours-plain``: ``pixelspace.mtt.match_trajectory(memory_efficient=False)`` (one graph over the unroll).
- ``ours-lean``: ``memory_efficient=True`` (adjoint sweep: one step's graph at a time).
- ``ours-plain-auto`` / ``ours-lean-auto``: the same with ``student_precision=auto`` (the method's default:
  bf16 student network on CPUs with native bf16 kernels, fp32 elsewhere); the two above are fp32.

    python bench/pixel_speed_mtt.py --iterations 3 --warmup 1 --repeats 1
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import resource
import statistics
import time
from datetime import date

CONFIGS = ["reference", "ours-plain", "ours-lean", "ours-plain-auto", "ours-lean-auto"]


def _rss_gib() -> float:
    with open("/proc/self/status") as handle:
        for line in handle:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 2**20
    return float("nan")


def worker(config: str, args: dict, queue) -> None:  # runs in a fresh process
    import numpy as np
    import torch
    from torch.nn import functional as F

    from distill.augment import diff_augment, strategy_for
    from distill.data import get_dataset
    from distill.methods.base import RunContext
    from distill.nets import build_network
    from pixelspace.experts import ExpertSettings, FlatModel, ensure_buffer
    from pixelspace.mtt import make_plan, make_step_loss, match_trajectory, student_dtype

    torch.set_num_threads(args["threads"])
    ds = get_dataset("mnist")
    ctx = RunContext(dataset=ds, ipc=args["ipc"], seed=0, max_per_class=args["buffer_max_per_class"])
    buffer = ensure_buffer(ds, ctx.train, ExpertSettings(dataset="mnist", epochs=args["buffer_epochs"],
                                                         max_per_class=args["buffer_max_per_class"]), 1)
    strategy = strategy_for(True)
    rng = np.random.default_rng(0)
    n = args["ipc"] * 10
    if config == "reference":
        # distill.py keeps every training image as a float tensor (images_all) for pix_init real
        images_all = ds.normalize(torch.from_numpy(np.asarray(ds.train.load(np.arange(len(ds.train))))).float() / 255)
        idx = np.concatenate([rng.choice(np.flatnonzero(ds.train.labels == c), args["ipc"], replace=False) for c in range(10)])
        image_syn = images_all[idx].clone().requires_grad_(True)
    else:
        idx = np.concatenate([rng.choice(np.flatnonzero(ds.train.labels == c), args["ipc"], replace=False) for c in range(10)])
        image_syn = ds.normalize(ds.train.load(idx).float() / 255).requires_grad_(True)
    label_syn = torch.arange(10).repeat_interleave(args["ipc"])
    syn_lr = torch.tensor(0.01).requires_grad_(True)
    opt_img = torch.optim.SGD([image_syn], lr=1000, momentum=0.5)
    opt_lr = torch.optim.SGD([syn_lr], lr=1e-5, momentum=0.5)
    syn_steps, expert_epochs = args["syn_steps"], args["expert_epochs"]
    max_start = buffer.epochs - expert_epochs + 1
    generator = torch.Generator().manual_seed(0)
    model = FlatModel(build_network("convnet", 1, 10, 28, seed=0))
    dtype = student_dtype("auto" if config.endswith("-auto") else "fp32", torch.device("cpu"))
    rss_setup = _rss_gib()
    walls, cpus, losses = [], [], []
    for _ in range(args["iterations"]):
        t0, c0 = time.perf_counter(), time.process_time()
        expert = int(rng.integers(0, buffer.num_experts))
        start_epoch = int(rng.integers(0, max_start))
        if config == "reference":
            # get_network + ReparamModule per iteration; NCHW inputs as the reference
            student = FlatModel(build_network("convnet", 1, 10, 28), channels_last=False)
            num_params = student.num_params
            target = buffer.snapshot(expert, start_epoch + expert_epochs).clone()
            starting = buffer.snapshot(expert, start_epoch).clone()
            student_params = [starting.clone().requires_grad_(True)]
            chunks: list = []
            for _step in range(syn_steps):
                if not chunks:
                    chunks = list(torch.split(torch.randperm(n), n))
                these = chunks.pop()
                x = diff_augment(image_syn[these], strategy)
                out = student(student_params[-1], x)
                ce = F.cross_entropy(out, label_syn[these])
                grad = torch.autograd.grad(ce, student_params[-1], create_graph=True)[0]
                student_params.append(student_params[-1] - syn_lr * grad)
            param_loss = F.mse_loss(student_params[-1], target, reduction="sum") / num_params
            param_dist = F.mse_loss(starting, target, reduction="sum") / num_params
            loss = param_loss / param_dist
            opt_img.zero_grad()
            opt_lr.zero_grad()
            loss.backward()
            opt_img.step()
            opt_lr.step()
            losses.append(float(loss.detach()))
            del student_params
        else:
            start = buffer.snapshot(expert, start_epoch)
            target = buffer.snapshot(expert, start_epoch + expert_epochs)
            plan = make_plan(n, syn_steps, n, generator)
            step_loss = make_step_loss(model, image_syn, label_syn, plan, strategy, dtype=dtype)
            result = match_trajectory(step_loss, start, target, syn_lr, [image_syn], syn_steps,
                                      config.startswith("ours-lean"))
            for opt, tensor, grad in ((opt_img, image_syn, result.grads[0]), (opt_lr, syn_lr, result.grad_lr)):
                tensor.grad = grad
                opt.step()
                tensor.grad = None
            losses.append(result.loss)
        walls.append(time.perf_counter() - t0)
        cpus.append(time.process_time() - c0)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    queue.put({"config": config, "walls": walls, "cpus": cpus, "peak_rss_gib": peak, "rss_setup_gib": rss_setup,
               "losses": losses})


def run_config(config: str, args: dict) -> dict:
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    proc = ctx.Process(target=worker, args=(config, args, queue))
    proc.start()
    out = queue.get()
    proc.join()
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--iterations", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--ipc", type=int, default=10)
    parser.add_argument("--syn-steps", type=int, default=10)
    parser.add_argument("--expert-epochs", type=int, default=2)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--buffer-epochs", type=int, default=4)
    parser.add_argument("--buffer-max-per-class", type=int, default=300)
    parser.add_argument("--configs", nargs="+", default=CONFIGS, choices=CONFIGS)
    parser.add_argument("--warmup", type=int, default=1, help="iterations per process left out of the medians "
                        "(the first one includes oneDNN kernel creation)")
    ns = parser.parse_args()
    if ns.warmup >= ns.iterations:
        parser.error("--iterations must exceed --warmup")
    args = {"iterations": ns.iterations, "ipc": ns.ipc, "syn_steps": ns.syn_steps, "expert_epochs": ns.expert_epochs,
            "threads": ns.threads, "buffer_epochs": ns.buffer_epochs, "buffer_max_per_class": ns.buffer_max_per_class}
    results: dict[str, dict] = {c: {"walls": [], "cpus": [], "peaks": [], "growth": []} for c in ns.configs}
    for _ in range(ns.repeats):
        for config in ns.configs:
            out = run_config(config, args)
            results[config]["walls"] += out["walls"][ns.warmup:]
            results[config]["cpus"] += out["cpus"][ns.warmup:]
            results[config]["peaks"].append(out["peak_rss_gib"])
            results[config]["growth"].append(out["peak_rss_gib"] - out["rss_setup_gib"])
            print(json.dumps(out), flush=True)
    ref = results.get("reference")
    print(f"\nMNIST IPC {ns.ipc}, syn_steps {ns.syn_steps}, expert_epochs {ns.expert_epochs}, batch_syn all, ConvNet-3 IN, "
          f"{ns.threads} threads, {ns.iterations} iterations ({ns.warmup} warm-up left out) x {ns.repeats} interleaved repeats, "
          f"{date.today()}\n")
    print("| implementation | s/iteration (median wall) | CPU s/iteration (median) | peak RSS GiB | RSS growth in "
          "iterations GiB | time vs reference | peak RSS vs reference |")
    print("|---|---|---|---|---|---|---|")
    for config, r in results.items():
        wall, cpu = statistics.median(r["walls"]), statistics.median(r["cpus"])
        peak, growth = statistics.median(r["peaks"]), statistics.median(r["growth"])
        if ref:
            t_ratio = wall / statistics.median(ref["walls"])
            m_ratio = peak / statistics.median(ref["peaks"])
            ratios = f"{t_ratio:.2f}x | {m_ratio:.2f}x"
        else:
            ratios = "– | –"
        print(f"| {config} | {wall:.2f} | {cpu:.2f} | {peak:.2f} | {growth:.2f} | {ratios} |")


if __name__ == "__main__":
    main()
