"""Latent pipeline benchmarks on CPU: encoder/decoder throughput, the linear cost curve of encode+cluster, and
accuracy of ``oq`` / ``d4m`` against ``random`` with the ``dc`` protocol at reduced budgets.

    python bench/latent.py throughput --images 256
    python bench/latent.py scaling --per-class 25 50 100 200
    python bench/latent.py accuracy --dataset mnist --ipcs 1 10 --max-per-class 200 --epochs 300 --runs 2

Each sub-command prints one markdown table. Runs go through :func:`distill.runner.run_to_archive` (the same
path as ``distill run``) and :func:`distill.evaluate.evaluate_distilled`.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def _timed_round_trip(enc, x: torch.Tensor, channels: int, size: int) -> tuple[float, float, float, float]:
    """Encode then decode ``x``: (encode s, encode CPU-s, decode s, decode CPU-s)."""
    start, cpu = time.perf_counter(), time.process_time()
    z = enc.encode(x)
    t_enc, c_enc = time.perf_counter() - start, time.process_time() - cpu
    start, cpu = time.perf_counter(), time.process_time()
    enc.decode(z, channels=channels, size=size)
    return t_enc, c_enc, time.perf_counter() - start, time.process_time() - cpu


def throughput(args: argparse.Namespace) -> None:
    from distill.data import get_dataset
    from quantize.encoders import load_encoder, wrap_autoencoder_kl

    # Wall-clock rates depend on what else runs on the host; images per CPU-second (process time, all
    # threads) is the contention-independent figure.
    print("| encoder | dataset | encode px | latent | batch | encode img/s | decode img/s | encode img/CPU-s | "
          "decode img/CPU-s |")
    print("|---|---|---|---|---|---|---|---|---|")
    for name in args.datasets:
        ds = get_dataset(name)
        x = ds.train.load(np.arange(args.images)).float() / 255.0
        for resolution in args.resolutions:
            enc = load_encoder("taef2", image_size=ds.image_size, resolution=resolution, batch_size=args.batch)
            enc.encode(x[: args.batch])  # warm-up
            t_enc, c_enc, t_dec, c_dec = _timed_round_trip(enc, x, ds.channels, ds.image_size)
            print(f"| taef2 | {name} | {resolution} | {'x'.join(map(str, enc.latent_shape))} | {args.batch} | "
                  f"{len(x) / t_enc:.1f} | {len(x) / t_dec:.1f} | {len(x) / c_enc:.1f} | {len(x) / c_dec:.1f} |",
                  flush=True)
    if args.sd_vae_images:
        from diffusers import AutoencoderKL

        # SD-VAE-sized AutoencoderKL (diffusers defaults of sd-vae-ft-mse), random weights: speed only.
        vae = AutoencoderKL(block_out_channels=(128, 256, 512, 512), down_block_types=("DownEncoderBlock2D",) * 4,
                            up_block_types=("UpDecoderBlock2D",) * 4, layers_per_block=2, latent_channels=4,
                            sample_size=256)
        enc = wrap_autoencoder_kl(vae, "sd-vae-random", "sd-vae-random", 256, torch.device("cpu"), torch.float32, 4)
        ds = get_dataset(args.datasets[0])
        x = ds.train.load(np.arange(args.sd_vae_images)).float() / 255.0
        t_enc, c_enc, t_dec, c_dec = _timed_round_trip(enc, x, ds.channels, ds.image_size)
        print(f"| SD-VAE-sized AutoencoderKL (random) | {args.datasets[0]} | 256 | 4x32x32 | 4 | "
              f"{len(x) / t_enc:.2f} | {len(x) / t_dec:.2f} | {len(x) / c_enc:.2f} | {len(x) / c_dec:.2f} |",
              flush=True)


def scaling(args: argparse.Namespace) -> None:
    from distill.data import get_dataset
    from distill.methods.base import RunContext
    from quantize.encoders import load_encoder
    from quantize.latent_cache import latents_for_context
    from quantize.methods import LatentOQParams, quantize_classes

    ds = get_dataset(args.dataset)
    encoder = load_encoder("taef2", image_size=ds.image_size)
    print(f"| dataset | images | encode s | k-means s (K={args.ipc}/class, faiss) | total s | s per 1000 images | "
          "total CPU-s | CPU-s per 1000 images |")
    print("|---|---|---|---|---|---|---|---|")
    for per_class in args.per_class:
        ctx = RunContext(dataset=ds, ipc=args.ipc, seed=args.seed, max_per_class=per_class)
        _ = ctx.train  # sampling the split is not part of the measured cost
        start, cpu = time.perf_counter(), time.process_time()
        store = latents_for_context(ctx, "taef2", encoder=encoder)
        t_enc = time.perf_counter() - start
        start = time.perf_counter()
        quantize_classes(ctx, store, LatentOQParams(w2_uniform=False), seed_per_class=True)
        t_km = time.perf_counter() - start
        c_all = time.process_time() - cpu
        n = len(store)
        print(f"| {args.dataset} | {n} | {t_enc:.1f} | {t_km:.2f} | {t_enc + t_km:.1f} | "
              f"{1000 * (t_enc + t_km) / n:.1f} | {c_all:.1f} | {1000 * c_all / n:.1f} |", flush=True)


def accuracy(args: argparse.Namespace) -> None:
    from distill.data import get_dataset
    from distill.evaluate import EvalConfig, evaluate_distilled
    from distill.runner import RunRequest, run_to_archive

    ds = get_dataset(args.dataset)
    config = EvalConfig(protocol=args.protocol, runs=args.runs, epochs=args.epochs, test_limit=args.test_limit,
                        teacher_epochs=args.teacher_epochs, teacher_max_per_class=args.teacher_max_per_class, device="cpu")
    # Under the softlabel protocol the latent methods also store the same teacher's logits (labels=teacher).
    teacher = ({"labels": "teacher", "teacher_epochs": args.teacher_epochs,
                "teacher_max_per_class": args.teacher_max_per_class} if args.protocol == "softlabel" else {})
    extra = dict(item.split("=", 1) for item in args.set)  # --set KEY=VALUE for every latent variant
    raw = {"latent_norm": "none", "refine_iterations": 0, **teacher}  # oq variants name every choice (--set overrides)
    settings = [  # (key for --only, label, method, parameters, images seen per class)
        ("random", "random (full train split)", "random", {}, None),
        ("herding-seen", "herding (the same images seen as oq)", "herding", {}, args.max_per_class),
        ("oq", "oq (faiss, weighted, VAE decode)", "oq", {**raw, "decode": "vae", "w2_uniform": False},
         args.max_per_class),
        ("oq-unweighted", "oq, weighted=false", "oq", {**raw, "decode": "vae", "weighted": False, "w2_uniform": False},
         args.max_per_class),
        ("d4m", "d4m (partial_fit stream, VAE decode)", "d4m", {"w2_uniform": False, **teacher}, args.max_per_class),
        ("oq-nearest", "oq, decode=nearest (weighted)", "oq", {**raw, "decode": "nearest"}, args.max_per_class),
        ("oq-nearest-unweighted", "oq, decode=nearest, weighted=false", "oq",
         {**raw, "decode": "nearest", "weighted": False, "w2_uniform": False}, args.max_per_class),
        ("oq-nearest-sqrt", "oq, decode=nearest, weight_power=0.5", "oq",
         {**raw, "decode": "nearest", "weight_power": 0.5, "w2_uniform": False}, args.max_per_class),
        ("oq-default", "oq, its defaults (nearest, instance norm, refine_iterations=auto)", "oq", {**teacher},
         args.max_per_class),
    ]
    print(f"protocol {args.protocol}" + (f", teacher {args.teacher_epochs} epochs on "
          f"{args.teacher_max_per_class or 'all'} images/class" if args.protocol == "softlabel" else ""))
    print(f"| dataset | IPC | method | train images seen | distill s | accuracy % (mean ± std, {args.runs} runs) |")
    print("|---|---|---|---|---|---|")
    with tempfile.TemporaryDirectory() as tmp:
        for ipc in args.ipcs:
            for key, label, method, params, max_per_class in settings:
                if args.only and key not in args.only:
                    continue
                params = {**params, **extra} if method in ("oq", "d4m") else params
                start = time.perf_counter()
                result = run_to_archive(RunRequest(args.dataset, method, ipc, params, seed=args.seed,
                                                   max_per_class=max_per_class, device="cpu"),
                                        Path(tmp) / f"{method}-{ipc}.tar")
                t_run = time.perf_counter() - start
                ev = evaluate_distilled(result.distilled, ds, config)
                seen = "all" if max_per_class is None else f"{max_per_class}/class"
                w2 = {k: v for k, v in result.manifest["metrics"].items() if k.startswith("w2_") and k.endswith(("mean", "pct"))}
                if w2:
                    print(f"{key} ipc {ipc} {w2}", file=sys.stderr, flush=True)
                if extra and method in ("oq", "d4m"):
                    label += " " + " ".join(args.set)
                print(f"| {args.dataset} | {ipc} | {label} | {seen} | {t_run:.1f} | "
                      f"{ev.accuracy_mean:.2f} ± {ev.accuracy_std:.2f} |", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("throughput")
    p.add_argument("--datasets", nargs="+", default=["mnist", "cifar10"])
    p.add_argument("--resolutions", type=int, nargs="+", default=[32, 64, 128])
    p.add_argument("--images", type=int, default=256)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--sd-vae-images", type=int, default=0)
    p = sub.add_parser("scaling")
    p.add_argument("--dataset", default="mnist")
    p.add_argument("--per-class", type=int, nargs="+", default=[25, 50, 100, 200])
    p.add_argument("--ipc", type=int, default=10)
    p.add_argument("--seed", type=int, default=0)
    p = sub.add_parser("accuracy")
    p.add_argument("--dataset", default="mnist")
    p.add_argument("--ipcs", type=int, nargs="+", default=[1, 10])
    p.add_argument("--max-per-class", type=int, default=200)
    p.add_argument("--epochs", type=int, default=300)
    p.add_argument("--runs", type=int, default=2)
    p.add_argument("--test-limit", type=int, default=2000)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--only", nargs="*", default=None, help="variants to run (random, herding-seen, oq, oq-unweighted, d4m, "
                                                                "oq-nearest, oq-nearest-unweighted, oq-nearest-sqrt, oq-default)")
    p.add_argument("--protocol", choices=["dc", "softlabel"], default="dc",
                   help="softlabel: every variant's students learn from one cached teacher (RDED style)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="extra parameter of oq / d4m")
    p.add_argument("--teacher-epochs", type=int, default=15)
    p.add_argument("--teacher-max-per-class", type=int, default=None, help="cap the teacher's training images")
    args = parser.parse_args()
    torch.manual_seed(args.__dict__.get("seed", 0))
    {"throughput": throughput, "scaling": scaling, "accuracy": accuracy}[args.command](args)


if __name__ == "__main__":
    main()
