"""Encode-stage scaling over Ray's logical GPUs: the same latent cache built with 1, then 2 (...) GPUs.

    python bench/ray_scaling.py --gpus 1 2 --per-class 96 --shards 8

On a CPU host each "GPU" is a logical Ray resource and each shard task encodes on one CPU thread
(OMP_NUM_THREADS=1), so the speed-up measures the fan-out itself (scheduling, streaming results back,
per-process warm caches), not a GPU. Each setting starts a fresh local Ray, warms every worker process with a
throw-away cache (imports, dataset, encoder weights), then times a fresh cache of ``--per-class`` MNIST images
per class cut into ``--shards`` shards. Prints a markdown table (wall seconds, images/s, speed-up, how many
worker processes ran shards, and the host's load average, which matters on a shared machine).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def build(per_class: int, shards: int, seed: int):
    from quantize.latent_cache import EncoderSpec, SplitSpec, _encoder, _split, build_latent_cache
    from workers.ray_executor import RayExecutor

    split_spec = SplitSpec("mnist", per_class, seed)
    split = _split(split_spec)
    local = _encoder(EncoderSpec("taef2", 64, 28, "cpu", 64))
    spec = EncoderSpec("taef2", 64, 28, "auto", 64)
    start = time.perf_counter()
    store = build_latent_cache(split, split_spec=split_spec, encoder_spec=spec, encoder_key=local.key,
                               num_classes=10, latent_shape=local.latent_shape, executor=RayExecutor(),
                               shard_size=-(-len(split) // shards))
    wall = time.perf_counter() - start
    tasks = json.loads((store.folder / "complete.json").read_text())["tasks"]
    return wall, len(split), tasks


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--gpus", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--per-class", type=int, default=96)
    parser.add_argument("--shards", type=int, default=8)
    parser.add_argument("--cpus", type=int, default=os.cpu_count() or 2)
    args = parser.parse_args()
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    import ray

    from distill.config import reload_settings

    rows = []
    base = None
    for gpus in args.gpus:
        home = Path(tempfile.mkdtemp(prefix="ray-scaling-"))
        os.environ["DISTILL_HOME"] = str(home)
        reload_settings()
        ray.init(num_cpus=args.cpus, num_gpus=gpus, include_dashboard=False, log_to_driver=False,
                 configure_logging=False)
        try:
            build(max(2, args.shards // 4), 2 * gpus, seed=99)  # warm every worker process (tiny, 2 shards/GPU)
            load_before = os.getloadavg()[0]
            wall, images, tasks = build(args.per_class, args.shards, seed=0)
            load_after = os.getloadavg()[0]
        finally:
            ray.shutdown()
            shutil.rmtree(home, ignore_errors=True)
        base = base or wall
        shard_s = sorted(t["end"] - t["start"] for t in tasks)
        rows.append(f"| {gpus} | {images} | {len(tasks)} | {len({t['pid'] for t in tasks})} | {wall:.1f} | "
                    f"{images / wall:.1f} | {base / wall:.2f}x | {shard_s[len(shard_s) // 2]:.1f} | "
                    f"{load_before:.1f} / {load_after:.1f} |")
        print(rows[-1], file=sys.stderr, flush=True)
    print(f"Encode stage over Ray logical GPUs, MNIST TAEF2 64 px, {args.cpus} CPUs, one thread per task, "
          f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}\n")
    print("| logical GPUs | images | shards | worker processes | wall s | images/s | speed-up | median shard s | "
          "load avg before / after |")
    print("|---:|---:|---:|---:|---:|---:|---:|---:|---|")
    print("\n".join(rows))


if __name__ == "__main__":
    main()
