"""ImageNet-1K ``oq`` on one H100, projected stage by stage from named rates: one markdown table.

    python bench/imagenet_projection.py                       # the assumed rates (docs/IMAGENET.md, docs/GPU.md)
    python bench/imagenet_projection.py --rates rows.jsonl    # measured rates from bench/gpu_check.py replace them

Every rate is a named constant below with its source; ``--rates`` reads the ``key``/``value`` rows that
``bench/gpu_check.py --out DIR`` writes to ``DIR/rows.jsonl`` and replaces each assumption that a measured
row covers (the table's basis column then says "measured"). Each stage is a low-high range (a rate's range,
or the range of the rates it depends on); the totals add the stages. The setting is ``oq``'s defaults at 256 px
(SD-VAE 4 x 32 x 32 latents, ``decode=nearest``, ``w2_uniform`` on, no refinement above 64 px), a second row
block shows ``decode=diffusion`` (a DiT-XL/2 prior at strength 0.7 of 50 steps) instead, and a last row what
the opt-in pixel refinement would add.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass, replace
from pathlib import Path

IMAGES = 1_281_167  # ImageNet-1K training images
CLASSES = 1000
IPCS = (10, 50)
DIT_STEPS = 35  # strength 0.7 of 50 steps (oq's defaults for decode=diffusion)


@dataclass(frozen=True)
class Rate:
    """One assumption: a low-high range, its unit and where it comes from (``key``: the gpu_check row key
    that replaces it when measured)."""

    low: float
    high: float
    unit: str
    source: str
    key: str = ""

    def text(self) -> str:
        value = _number(self.low) if self.low == self.high else f"{_number(self.low)}-{_number(self.high)}"
        return f"{value} {self.unit} ({self.source})"


def _number(x: float) -> str:
    return f"{x:,.0f}" if abs(x) >= 100 else f"{x:.3g}"


# --- the named assumptions ------------------------------------------------------------------------------------
LOADER_PROCESSES = Rate(16, 16, "processes", "the lent H100 machine's 16 cores, docs/GPU.md", "")
DECODE_PER_CORE = Rate(220, 436, "img/s per core", "436 measured on a quiet core for 500x375 JPEGs -> 256 px; real "
                       "photos assumed up to 2x slower to decode, docs/IMAGENET.md")
LOADER_EFFICIENCY = Rate(0.82, 0.82, "per process", "ImageStream with 2 processes vs the bare loop, measured, "
                         "docs/IMAGENET.md")
ENCODE = Rate(3000, 3000, "img/s", "SD-VAE encoder, H100, bf16: assumption, docs/GPU.md",
              "encode_img_s")
ENCODE_OVERLAP = Rate(1.01, 1.01, "x max(load, encode)", "encode stage wall vs its slower part, measured, "
                      "docs/IMAGENET.md")
FILE_INDEX = Rate(0.5, 1.0, "min", "1.28M stat calls, first run of a process; cached after, docs/IMAGENET.md")
KMEANS_PER_CLASS = {10: Rate(0.15, 0.15, "s per class, one core", "FAISS CPU, 1300 x 4096, measured, "
                             "docs/IMAGENET.md", "kmeans_torch_s_per_class_k10"),
                    50: Rate(0.26, 0.26, "s per class, one core", "FAISS CPU, 1300 x 4096, measured, "
                             "docs/IMAGENET.md", "kmeans_torch_s_per_class_k50")}
W2_UNIFORM_PER_CLASS = Rate(0.1, 0.4, "s per class, one core", "exact OT (POT) incl. the distance matrix, measured, "
                            "docs/IMAGENET.md")
KMEANS_PROCESSES = Rate(16, 16, "processes", "one GPU-less Ray task per class on the 16 cores", "")
NEAREST_LOAD = Rate(220, 436, "img/s per core", "the chosen members decoded serially (decode=nearest): the "
                    "per-core decode rate above")
VAE_DECODE = Rate(1000, 1000, "img/s", "SD-VAE decoder: assumption, a third of the encoder's rate, docs/GPU.md",
                  "vae_decode_img_s_b256")
DIT = Rate(1050, 1400, "latent-steps/s", "DiT-XL/2 with guidance, H100, bf16: assumption (30-40 img/s at 35 steps), "
           "docs/GPU.md", "dit_latent_steps_s_b256")
ARCHIVE_PNG = Rate(5, 10, "ms per image, one core", "PNG encode at 224-256 px: assumption, docs/GPU.md")
STARTUP = Rate(1, 1, "min", "Ray start, worker processes, model loads, docs/GPU.md")
# the opt-in refinement (refine_iterations=N, refine_batch_real=REFINE_BATCH_REAL) at 224 px: DM's class-mean step, ConvNet-3.
# About 5 GFLOP per image forward; per class-iteration 64 real forwards plus IPC synthetic forward + input-gradient
# passes: 0.42 TFLOP at IPC 10, 0.82 at IPC 50, at an assumed 50-150 effective TFLOP/s plus DSA's per-class launches.
REFINE_ITERATIONS = 50  # what the 128 px Imagenette row measured (docs/BENCHMARKS.md, q-nette128-oqr-10)
REFINE_BATCH_REAL = 64  # real images per class per iteration: oq's refine_batch_real=auto from 64 px
REFINE_PER_CLASS_ITER = {10: Rate(0.005, 0.015, "s per class-iteration", "H100, 224 px, 64 real/class: assumption "
                                  "from FLOPs, docs/GPU.md", "refine_s_per_class_iter_ipc10_real64"),
                         50: Rate(0.010, 0.025, "s per class-iteration", "H100, 224 px, 64 real/class: assumption "
                                  "from FLOPs, docs/GPU.md", "refine_s_per_class_iter_ipc50_real64")}

ASSUMPTIONS = {"LOADER_PROCESSES": LOADER_PROCESSES, "DECODE_PER_CORE": DECODE_PER_CORE,
               "LOADER_EFFICIENCY": LOADER_EFFICIENCY, "ENCODE": ENCODE, "ENCODE_OVERLAP": ENCODE_OVERLAP,
               "FILE_INDEX": FILE_INDEX, "KMEANS_PER_CLASS_K10": KMEANS_PER_CLASS[10],
               "KMEANS_PER_CLASS_K50": KMEANS_PER_CLASS[50], "W2_UNIFORM_PER_CLASS": W2_UNIFORM_PER_CLASS,
               "KMEANS_PROCESSES": KMEANS_PROCESSES, "NEAREST_LOAD": NEAREST_LOAD, "VAE_DECODE": VAE_DECODE,
               "DIT": DIT, "ARCHIVE_PNG": ARCHIVE_PNG, "STARTUP": STARTUP,
               "REFINE_PER_CLASS_ITER_10": REFINE_PER_CLASS_ITER[10],
               "REFINE_PER_CLASS_ITER_50": REFINE_PER_CLASS_ITER[50]}


def derived_loader(rates: dict[str, Rate]) -> Rate:
    procs, core, eff = rates["LOADER_PROCESSES"], rates["DECODE_PER_CORE"], rates["LOADER_EFFICIENCY"]
    return Rate(procs.low * core.low * eff.low, procs.high * core.high * eff.high, "img/s",
                f"{procs.low:g} processes x {core.text()} x {eff.low:g}", "loader_img_s")


def read_measured(path: Path) -> dict[str, tuple[float, str]]:
    """``key -> (value, setting)`` of the gpu_check rows that carry one (the last row of a key wins)."""
    measured: dict[str, tuple[float, str]] = {}
    for number, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except ValueError as exc:
            raise SystemExit(f"error: {path}:{number} is not a JSON row ({exc})") from None
        if row.get("key") and isinstance(row.get("value"), int | float) and row.get("status", "ok") == "ok":
            measured[row["key"]] = (float(row["value"]), str(row.get("setting", "")))
    return measured


def apply_measured(rates: dict[str, Rate], measured: dict[str, tuple[float, str]]) -> dict[str, Rate]:
    out = dict(rates)
    for name, rate in rates.items():
        if rate.key and rate.key in measured:
            value, setting = measured[rate.key]
            out[name] = replace(rate, low=value, high=value, source=f"measured: {setting}")
    return out


def minutes(low_s: float, high_s: float) -> tuple[float, float]:
    return low_s / 60, high_s / 60


def stages(rates: dict[str, Rate], loader: Rate, ipc: int, decode: str) -> list[tuple[str, tuple[float, float], str]]:
    """(stage, (low, high) minutes, basis) for one IPC and decode."""
    encode = rates["ENCODE"]
    overlap = rates["ENCODE_OVERLAP"].low
    # decode + encode overlap: the slower of the two sets the stage (the fastest loader with the fastest encoder)
    enc_low = IMAGES / min(loader.high, encode.high) * overlap
    enc_high = IMAGES / min(loader.low, encode.low) * overlap
    kmeans, w2 = rates[f"KMEANS_PER_CLASS_K{ipc}"], rates["W2_UNIFORM_PER_CLASS"]
    procs = rates["KMEANS_PROCESSES"].low
    kmeans_parallel = 1.0 if kmeans.source.startswith("measured") else procs  # a measured GPU row: one device
    out = [
        ("file index (first run only)", (rates["FILE_INDEX"].low, rates["FILE_INDEX"].high), rates["FILE_INDEX"].text()),
        ("JPEG decode + SD-VAE encode, 1.28M images", minutes(enc_low, enc_high),
         f"loader {loader.text()}; encoder {encode.text()}; x {overlap:g} overlap"),
        (f"k-means, {CLASSES} classes, K = IPC", minutes(CLASSES * kmeans.low / kmeans_parallel,
                                                          CLASSES * kmeans.high / kmeans_parallel),
         f"K = {ipc}: {kmeans.text()}" + (f" / {procs:g} processes" if kmeans_parallel > 1 else ", classes one after another")),
        ("uniform-W2 diagnostic (w2_uniform)", minutes(CLASSES * w2.low / procs, CLASSES * w2.high / procs),
         f"{w2.text()} / {procs:g} processes"),
    ]
    n_out = ipc * CLASSES
    if decode == "nearest":
        near = rates["NEAREST_LOAD"]
        out.append(("decode=nearest: IPC x 1000 members read", minutes(n_out / near.high, n_out / near.low),
                    near.text()))
    else:
        dit, vae = rates["DIT"], rates["VAE_DECODE"]
        low = n_out * DIT_STEPS / dit.high + n_out / vae.high
        high = n_out * DIT_STEPS / dit.low + n_out / vae.low
        out.append((f"decode=diffusion: IPC x 1000 latents, {DIT_STEPS} DiT steps + VAE decode", minutes(low, high),
                    f"DiT {dit.text()}; VAE {vae.text()}"))
    png = rates["ARCHIVE_PNG"]
    out.append(("archive, IPC x 1000 PNGs", minutes(n_out * png.low / 1000, n_out * png.high / 1000), png.text()))
    out.append(("Ray start, processes, model loads", (rates["STARTUP"].low, rates["STARTUP"].high),
                rates["STARTUP"].text()))
    return out


def refinement(rates: dict[str, Rate], ipc: int) -> tuple[float, float]:
    """Minutes of the opt-in refinement: classes x iterations x seconds per class-iteration, on one GPU."""
    rate = rates[f"REFINE_PER_CLASS_ITER_{ipc}"]
    return minutes(CLASSES * REFINE_ITERATIONS * rate.low, CLASSES * REFINE_ITERATIONS * rate.high)


def fmt(span: tuple[float, float]) -> str:
    low, high = span
    if high < 1:
        return f"{low * 60:.0f}-{high * 60:.0f} s" if round(low * 60) != round(high * 60) else f"{low * 60:.0f} s"
    return f"{low:.1f}-{high:.1f} min" if round(low, 1) != round(high, 1) else f"{low:.1f} min"


def table(rates: dict[str, Rate], measured_from: str | None) -> str:
    loader = rates.get("LOADER_MEASURED") or derived_loader(rates)
    source = f"rates measured in {measured_from} where given" if measured_from else "assumed rates"
    lines = [f"ImageNet-1K `oq` on one H100, projected ({source}; first run: the file index included; a rerun "
             "with the same encoder skips decode + encode)", "",
             "| stage | IPC 10 | IPC 50 | basis |", "|---|---:|---:|---|"]
    for decode in ("nearest", "diffusion"):
        per_ipc = {ipc: stages(rates, loader, ipc, decode) for ipc in IPCS}
        for i, (stage, _, basis) in enumerate(per_ipc[10]):
            if decode == "diffusion" and i != 4:
                continue  # the other stages are those of decode=nearest
            cells = [fmt(per_ipc[ipc][i][1]) for ipc in IPCS]
            lines.append(f"| {stage} | {cells[0]} | {cells[1]} | {basis} |")
        totals = [(sum(s[1][0] for s in per_ipc[ipc]), sum(s[1][1] for s in per_ipc[ipc])) for ipc in IPCS]
        lines.append(f"| **total, decode={decode}** | **{fmt(totals[0])}** | **{fmt(totals[1])}** | sum of the rows "
                     f"{'above' if decode == 'nearest' else 'of decode=nearest with this decode instead'} |")
    cells = [fmt(refinement(rates, ipc)) for ipc in IPCS]
    lines.append(f"| opt-in refinement (`refine_iterations={REFINE_ITERATIONS} "
                 f"refine_batch_real={REFINE_BATCH_REAL}`, off by default above 64 px), GPU, add to a total "
                 f"| {cells[0]} | {cells[1]} | {CLASSES} classes x "
                 f"{REFINE_ITERATIONS} iterations x {rates['REFINE_PER_CLASS_ITER_10'].text()} (IPC 10); "
                 f"{rates['REFINE_PER_CLASS_ITER_50'].text()} (IPC 50) |")
    reads, near = CLASSES * REFINE_ITERATIONS * REFINE_BATCH_REAL, rates["DECODE_PER_CORE"]
    cell = fmt(minutes(reads / near.high, reads / near.low))
    lines.append(f"| its real batches read on demand (a split larger than `realpool_cache_bytes`: all of ImageNet "
                 f"at 224 px is about 190 GB), one process, add to a total | {cell} | {cell} | {reads:,} JPEG decodes at "
                 f"{near.text()}; a capped split that fits (`--max-per-class`) is read once instead |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--rates", type=Path, default=None, help="rows.jsonl of a bench/gpu_check.py run")
    args = parser.parse_args(argv)
    rates = dict(ASSUMPTIONS)
    if args.rates is not None:
        if not args.rates.is_file():
            print(f"error: {args.rates} is not a file (a gpu_check rows.jsonl)", file=sys.stderr)
            return 2
        measured = read_measured(args.rates)
        rates = apply_measured(rates, measured)
        if "loader_img_s" in measured:  # the lent machine's own loader, on all its cores
            value, setting = measured["loader_img_s"]
            rates["LOADER_MEASURED"] = Rate(value, value, "img/s", f"measured: {setting}", "loader_img_s")
    print(table(rates, str(args.rates) if args.rates else None))
    return 0


if __name__ == "__main__":
    sys.exit(main())
