"""Benchmarks of the diffusion decode path and the trained latent prior; each part prints a markdown table.

    python bench/diffusion.py train   --dataset mnist --max-per-class 100 --iterations 400
    python bench/diffusion.py decode  --prior DIR [--n 100]
    python bench/diffusion.py dit-xl  [--batch 1 --steps 2]
    python bench/diffusion.py oq      --prior DIR --ipc 10 [--max-per-class 100 --epochs 300 --runs 2]

Run with OMP_NUM_THREADS / DISTILL_NUM_THREADS set to the cores you may use; the results in
docs/BENCHMARKS.md (section "Encoders and diffusion decode on the CPU") say which.
"""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
import torch


def _table(header: list[str], rows: list[list]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def _setting(**kw) -> str:
    return "Setting: " + ", ".join(f"{k} {v}" for k, v in kw.items()) + f", torch threads {torch.get_num_threads()}"


# -------------------------------------------------------------------------------------------- train
def bench_train(args) -> None:
    from quantize.prior import PriorConfig, load_dataset_latents, train_prior_on_latents

    t0 = time.perf_counter()
    latents, labels, num_classes, meta = load_dataset_latents(
        args.dataset, args.encoder, args.resolution, max_per_class=args.max_per_class
    )
    encode_s = time.perf_counter() - t0
    config = PriorConfig(num_layers=args.layers, num_attention_heads=args.heads, attention_head_dim=args.head_dim)
    out = Path(args.out) if args.out else Path(f"/tmp/prior-bench-{args.dataset}")
    result = train_prior_on_latents(
        latents, labels, num_classes, out, iterations=args.iterations, batch_size=args.batch_size, lr=args.lr,
        config=config, seed=args.seed, meta=meta,
    )
    tr = result.meta["training"]
    print(_setting(dataset=args.dataset, encoder=args.encoder, resolution=meta["resolution"],
                   images=len(latents), iterations=args.iterations, batch=args.batch_size, lr=args.lr,
                   device="cpu"))
    print()
    print(_table(
        ["latents (load/encode s)", "params", "train s", "s/iter", "held-out loss start", "held-out loss end"],
        [[f"{len(latents)} ({encode_s:.1f})", f"{tr['parameters'] / 1e6:.2f}M", f"{result.seconds:.1f}",
          f"{result.seconds / args.iterations:.3f}", f"{result.eval_loss_start:.4f}", f"{result.eval_loss_end:.4f}"]],
    ))
    print()
    buckets = 10
    k = max(1, args.iterations // buckets)
    rows = [[f"{i + 1}-{min(i + k, args.iterations)}", f"{np.mean(result.losses[i:i + k]):.4f}"]
            for i in range(0, args.iterations, k)]
    print(_table(["iterations", "mean training loss"], rows))
    print(f"\nsaved: {result.path}")


# ------------------------------------------------------------------------------------------- decode
def bench_decode(args) -> None:
    from quantize.diffusion import LatentPrior, decode_with_prior
    from quantize.encoders import load_encoder

    prior = LatentPrior.load(args.prior)
    meta = prior.meta
    side = int(prior.transformer.config.sample_size)
    c, h, w = meta.get("latent_shape", [prior.in_channels, side, side])
    g = torch.Generator().manual_seed(0)
    mean, std = prior.mean.view(1, -1, 1, 1), prior.std.view(1, -1, 1, 1)
    z = torch.randn(args.n, c, h, w, generator=g) * std + mean
    y = torch.arange(args.n) % prior.num_classes
    rows = []
    vae = load_encoder(meta.get("encoder", "taef2"), resolution=meta.get("resolution", 64))
    t = time.perf_counter()
    vae.decode(z)
    vae_s = time.perf_counter() - t
    rows.append(["VAE decode only", "-", "-", "-", f"{args.n / vae_s:.1f}"])
    for scheduler in ("ddim", "dpm"):
        for steps, strength in ((50, 0.5), (25, 0.5), (50, 1.0)):
            t = time.perf_counter()
            decode_with_prior(z, y, prior, strength=strength, steps=steps, guidance=4.0, scheduler=scheduler,
                              batch_size=args.batch_size)
            s = time.perf_counter() - t
            evals = int(steps * strength)
            rows.append([f"DiT prior, {scheduler}", steps, strength, evals, f"{args.n / s:.1f}"])
    params = sum(p.numel() for p in prior.transformer.parameters())
    print(_setting(prior=f"{Path(args.prior).name} ({params / 1e6:.2f}M params)", latents=f"{args.n} x {c}x{h}x{w}",
                   guidance=4.0, batch=args.batch_size, device="cpu fp32"))
    print()
    print(_table(["path", "steps", "strength", "denoising steps (x2 with CFG)", "latents/s"], rows))


# ------------------------------------------------------------------------------------------- DiT-XL
def bench_dit_xl(args) -> None:
    """DiT-XL/2 at 256 px (4 x 32 x 32 latents, learned sigma, 1000 classes), random weights."""
    from diffusers import DDPMScheduler, DiTTransformer2DModel

    from quantize.diffusion import LatentPrior, decode_with_prior

    t = time.perf_counter()
    model = DiTTransformer2DModel(num_attention_heads=16, attention_head_dim=72, in_channels=4, out_channels=8,
                                  num_layers=28, sample_size=32, patch_size=2, num_embeds_ada_norm=1000)
    build_s = time.perf_counter() - t
    params = sum(p.numel() for p in model.parameters())
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        model.save_pretrained(root / "transformer")
        DDPMScheduler(num_train_timesteps=1000, beta_schedule="linear").save_pretrained(root / "scheduler")
        del model
        z = torch.randn(args.batch, 4, 32, 32)
        y = torch.arange(args.batch) % 1000
        t = time.perf_counter()
        prior = LatentPrior.load(root)
        load_s = time.perf_counter() - t
        # strength 1 runs exactly args.steps denoising steps
        t = time.perf_counter()
        decode_with_prior(z, y, prior, strength=1.0, steps=args.steps, guidance=4.0, scheduler="ddim")
        total = time.perf_counter() - t
    print(_setting(model=f"DiT-XL/2 random ({params / 1e6:.0f}M params)", batch=args.batch,
                   steps=args.steps, guidance="4 (CFG doubles the batch)", device="cpu fp32"))
    print()
    print(_table(["build s", "load s", "decode s", "s per denoising step (batch)", "est. s/image at 35 steps"],
                 [[f"{build_s:.1f}", f"{load_s:.1f}", f"{total:.1f}", f"{total / args.steps:.2f}",
                   f"{total / args.steps * 35 / args.batch:.0f}"]]))


# ----------------------------------------------------------------------------------------------- oq
def bench_oq(args) -> None:
    """oq with VAE decode vs decode through the trained prior, evaluated with protocol dc (reduced budget)."""
    from distill.data import get_dataset
    from distill.evaluate import EvalConfig, evaluate_distilled
    from distill.runner import RunRequest, run_to_archive

    dataset = get_dataset(args.dataset)
    rows = []
    variants = [("random (reference)", "random", {}), ("oq, VAE decode", "oq", {"decode": "vae"})]
    for strength in args.strengths:
        variants.append((f"oq, prior decode s={strength}", "oq",
                         {"decode": "diffusion", "prior": args.prior, "strength": strength, "steps": args.steps,
                          "guidance": args.guidance}))
    wanted = set(args.variants)
    variants = [v for v in variants if ("random" if v[1] == "random" else v[2]["decode"]) in wanted]
    for name, method, params in variants:
        out = Path(tempfile.mkdtemp()) / "set.tar"
        t = time.perf_counter()
        result = run_to_archive(RunRequest(dataset=args.dataset, method=method, ipc=args.ipc, params=params,
                                           seed=0, max_per_class=args.max_per_class, device="cpu"), out)
        run_s = time.perf_counter() - t
        config = EvalConfig(protocol="dc", model="convnet", runs=args.runs, epochs=args.epochs,
                            test_limit=args.test_limit, seed=0, device="cpu")
        ev = evaluate_distilled(result.distilled, dataset, config)
        shutil.rmtree(out.parent, ignore_errors=True)
        rows.append([name, f"{run_s:.0f}", f"{ev.accuracy_mean:.2f} ± {ev.accuracy_std:.2f}"])
        print(json.dumps({"variant": name, "run_s": run_s, "acc": ev.accuracy_mean, "std": ev.accuracy_std}),
              flush=True)
    print(_setting(dataset=args.dataset, ipc=args.ipc, max_per_class=args.max_per_class, eval="dc convnet",
                   epochs=args.epochs, runs=args.runs, test_limit=args.test_limit, steps=args.steps,
                   guidance=args.guidance, device="cpu"))
    print()
    print(_table(["method / decode", "distill s", "accuracy %"], rows))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="part", required=True)
    p = sub.add_parser("train", help="prior training time and loss curve")
    p.add_argument("--dataset", default="mnist")
    p.add_argument("--encoder", default="taef2")
    p.add_argument("--resolution", type=int, default=None)
    p.add_argument("--max-per-class", type=int, default=100)
    p.add_argument("--iterations", type=int, default=400)
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--head-dim", type=int, default=32)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=None)
    p.set_defaults(fn=bench_train)
    p = sub.add_parser("decode", help="DiT-prior decode throughput")
    p.add_argument("--prior", required=True)
    p.add_argument("--n", type=int, default=100)
    p.add_argument("--batch-size", type=int, default=100)
    p.set_defaults(fn=bench_decode)
    p = sub.add_parser("dit-xl", help="DiT-XL/2-sized random transformer decode speed")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--steps", type=int, default=2)
    p.set_defaults(fn=bench_dit_xl)
    p = sub.add_parser("oq", help="oq accuracy, VAE decode vs trained-prior decode")
    p.add_argument("--prior", required=True)
    p.add_argument("--dataset", default="mnist")
    p.add_argument("--ipc", type=int, default=10)
    p.add_argument("--max-per-class", type=int, default=100)
    p.add_argument("--strengths", type=float, nargs="+", default=[0.3, 0.6])
    p.add_argument("--steps", type=int, default=50)
    p.add_argument("--guidance", type=float, default=4.0)
    p.add_argument("--variants", nargs="+", default=["random", "vae", "diffusion"],
                   choices=["random", "vae", "diffusion"], help="which rows to run (split long runs)")
    p.add_argument("--epochs", type=int, default=300)
    p.add_argument("--runs", type=int, default=2)
    p.add_argument("--test-limit", type=int, default=2000)
    p.set_defaults(fn=bench_oq)
    args = parser.parse_args()
    args.fn(args)


if __name__ == "__main__":
    main()
