"""Scale bench: `oq` on a synthetic ImageNet-shaped folder, 1000 classes x N images, wall time per stage and
peak RSS, with slope and R^2 of time against N.

    python bench/scale.py --data /tmp/synthetic-imagenet-scale --ns 10 20 40 --ipc 10 --ipc50

Each run is its own `distill run oq` process (peak RSS = that process' ru_maxrss) on ``imagefolder:DATA``
(JPEGs of 67-160 px at ``--size 0.2``: above the 64 px in-memory limit, so the training split streams from the
files) with TAEF2 encoding at ``--resolution`` px (32: 32x4x4 latents, small enough for a 2-core CPU),
``--max-per-class N`` (a lazy sample view), a fresh latent cache per run. ``--ipc50`` adds IPC 50 at the
largest N, and with ``--old PATH`` (a checkout of the previous code) the same run on the old code path.
Stage times come from the archive manifest (encode, quantize, decode, archive = the rest of the wall time).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def _fit(xs: list[float], ys: list[float]) -> tuple[float, float, float]:
    """Least squares y = a + b x -> (b, a, R^2)."""
    x, y = np.asarray(xs, dtype=float), np.asarray(ys, dtype=float)
    b, a = np.polyfit(x, y, 1)
    residual = float(((y - (a + b * x)) ** 2).sum())
    total = float(((y - y.mean()) ** 2).sum()) or 1e-12
    return float(b), float(a), 1.0 - residual / total


def run_once(code: Path, data: Path, n: int, ipc: int, resolution: int, home: Path, workers: int,
             out: Path, classes: int = 1000, encoder: str = "taef2", extra: tuple[str, ...] = ()) -> dict:
    env = dict(os.environ, DISTILL_HOME=str(home), DISTILL_NUM_THREADS="1", OMP_NUM_THREADS="1",
               DISTILL_LOADER_WORKERS=str(workers), PYTHONPATH=str(code), PYTHONDONTWRITEBYTECODE="1")
    shutil.rmtree(home / "cache" / "latents", ignore_errors=True)  # every run encodes (fresh cache)
    args = ["run", "oq", "--dataset", f"imagefolder:{data}", "--ipc", str(ipc), "--max-per-class", str(n),
            "--out", str(out), "--set", f"resolution={resolution}", "--set", f"encoder={encoder}", "--device", "cpu", "--quiet"]
    for item in extra:
        args += ["--set", item]
    log = out.with_suffix(".log")
    start = time.perf_counter()
    with open(log, "w") as handle:
        proc = subprocess.Popen([sys.executable, "-c", "from distill.cli import main; main()", *args], env=env,
                                cwd=code, stdout=handle, stderr=subprocess.STDOUT)
        _, status, usage = os.wait4(proc.pid, 0)  # this child's own rusage: its peak RSS
    proc.returncode = os.waitstatus_to_exitcode(status)
    wall = time.perf_counter() - start
    peak_kb = usage.ru_maxrss
    if proc.returncode != 0:
        raise SystemExit(f"error: run failed (N={n}, ipc={ipc}, code={code}):\n{log.read_text()[-3000:]}")
    with tarfile.open(out) as tar:
        handle = tar.extractfile("manifest.json")
        assert handle is not None
        manifest = json.loads(handle.read())
    timings = manifest.get("timings", {})
    stages = {k: float(timings.get(k, 0.0)) for k in ("encode", "quantize", "decode")}
    stages["method"] = float(timings.get("total", sum(stages.values())))
    stages["startup+index+archive"] = max(0.0, wall - stages["method"])
    return {"n": n, "ipc": ipc, "images": classes * n, "wall_s": round(wall, 2), **{k: round(v, 2) for k, v in stages.items()},
            "peak_rss_mb": round(peak_kb / 1024, 1), "code": str(code),
            "archive_mb": round(out.stat().st_size / 2**20, 1), "format": manifest.get("format_version")}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=Path("/tmp/synthetic-imagenet-scale"))
    parser.add_argument("--ns", type=int, nargs="+", default=[10, 20, 40])
    parser.add_argument("--classes", type=int, default=1000)
    parser.add_argument("--ipc", type=int, default=10)
    parser.add_argument("--ipc50", action="store_true", help="also IPC 50 at the largest N")
    parser.add_argument("--old", type=Path, default=None, help="checkout of the old code for the IPC 50 comparison")
    parser.add_argument("--resolution", type=int, default=32)
    parser.add_argument("--size", type=float, default=0.2, help="synthetic JPEG size scale (0.2: ~100 x 75)")
    parser.add_argument("--workers", type=int, default=1, help="loader processes per run (2 processes at most)")
    parser.add_argument("--home", type=Path, default=Path("/tmp/distill-scale-home"))
    parser.add_argument("--encoder", default="taef2",
                        help="taef2, or sd-shaped: an AutoencoderKL of Stable Diffusion's VAE shape with random weights "
                             "(bench/gpu_check.py's SD_VAE config), saved under --home")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="extra oq parameter for every run (e.g. decode=vae, the old default, for the IPC 50 "
                             "memory comparison)")
    args = parser.parse_args()
    for item in args.set:
        if "=" not in item:
            parser.error(f"--set {item}: expected KEY=VALUE")

    from bench.synthetic_imagenet import generate

    need = max(args.ns)
    marker = args.data / f".complete-{args.classes}-{need}-{args.size}"
    if not marker.exists():
        generate(args.data, args.classes, need, 1, seed=0, workers=2, size_scale=args.size)
        marker.write_text("ok")
    repo = Path(__file__).resolve().parents[1]
    args.home.mkdir(parents=True, exist_ok=True)
    encoder = args.encoder
    if encoder == "sd-shaped":
        from bench.gpu_check import SD_VAE, save_random_vae

        encoder = str(args.home / "sd-vae-random")
        if not (Path(encoder) / "config.json").exists():
            save_random_vae(Path(encoder), SD_VAE)
    rows = []
    plan = [(repo, n, args.ipc) for n in args.ns]
    if args.ipc50:
        if args.ipc != 50:
            plan.append((repo, need, 50))
        if args.old is not None:
            plan.append((args.old, need, 50))
    for code, n, ipc in plan:
        row = run_once(code, args.data, n, ipc, args.resolution, args.home, args.workers, args.home / f"scale-{n}-{ipc}.tar",
                       args.classes, encoder, tuple(args.set))
        print(json.dumps(row), file=sys.stderr, flush=True)
        rows.append(row)
    print(f"oq, imagefolder:{args.data} ({args.classes} classes), {args.encoder} at {args.resolution} px, {args.workers} "
          f"loader process(es), 1 torch thread, {' '.join(args.set) or 'default parameters'}, "
          f"{time.strftime('%Y-%m-%d')}\n")
    print("| N / class | images | IPC | code | encode s | quantize s | decode s | method s | startup + index + "
          "archive s | wall s | peak RSS MB | archive MB |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        code = "new" if Path(r["code"]) == repo else "old"
        print(f"| {r['n']} | {r['images']} | {r['ipc']} | {code} | {r['encode']} | {r['quantize']} | {r['decode']} | "
              f"{r['method']} | {r['startup+index+archive']} | {r['wall_s']} | {r['peak_rss_mb']} | "
              f"{r['archive_mb']} |")
    base = [r for r in rows if r["ipc"] == args.ipc and Path(r["code"]) == repo]
    if len(base) >= 2:
        print()
        for key in ("wall_s", "method", "encode"):
            slope, intercept, r2 = _fit([r["n"] for r in base], [r[key] for r in base])
            print(f"- {key}: {slope:.2f} s per image/class (= {slope / args.classes * 1e3:.2f} ms per image), "
                  f"intercept {intercept:.1f} s, R^2 = {r2:.4f}")
        rss = [r["peak_rss_mb"] for r in base]
        print(f"- peak RSS across N: {min(rss):.0f}-{max(rss):.0f} MB (spread {100 * (max(rss) / min(rss) - 1):.1f} %)")


if __name__ == "__main__":
    main()
