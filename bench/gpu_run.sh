#!/usr/bin/env bash
# The whole call on a lent GPU machine: install the kit (bench/gpu_kit.py, `make gpu-kit`) without a network,
# run bench/gpu_check.py under its time budget, and leave in $OUT what comes back:
#   env.txt     nvidia-smi, Python, torch / CUDA / cuDNN, the versions of what the check imports, the kit install
#   rows.jsonl  one JSON row per measurement, appended as measured (a killed run keeps what it measured)
#   table.md    the markdown table (rewritten after every row)
#   log.txt     the check's own log (stderr)
#   train_speed.md  bench/train_speed.py --device cuda: evaluation epochs, test passes and DM iterations on the
#               reference path and the fast paths (run after the check, within TRAIN_SPEED_S)
# The device call (from the repository root, with the kit built here first):
#   carry: ["build/gpu-kit"]   command: bash bench/gpu_run.sh   timeout_s: 570
# Variables: OUT (required; set by the device machine), BUDGET_S (420: the check exits within it),
# TRAIN_SPEED_S (75: the training-speed rows after it; on a host without CUDA a short CPU rehearsal), KIT
# (build/gpu-kit), PYTHON (python3: the image's, which holds torch), PIP ("$PYTHON -m pip"), SITE (where the
# kit is installed), BASE_PYTHONPATH (put after the kit: the test suite's rehearsal points it at a copy of the
# image's packages), CHECK_ARGS (more arguments for the check, e.g. --cpu-smoke or --sections).
set -uo pipefail
cd "$(dirname "$0")/.."
: "${OUT:?set OUT to the folder for the results}"
PYTHON=${PYTHON:-python3}
PIP=${PIP:-$PYTHON -m pip}
KIT=${KIT:-build/gpu-kit}
BUDGET_S=${BUDGET_S:-420}
TRAIN_SPEED_S=${TRAIN_SPEED_S:-75}
SITE=${SITE:-/tmp/gpu-kit-site}
mkdir -p "$OUT"
if ! ls "$KIT"/wheels/*.whl >/dev/null 2>&1; then
  echo "error: no kit at $KIT (build it with 'make gpu-kit' and carry it)" | tee "$OUT/env.txt" >&2
  exit 2
fi
{
  date -u '+%Y-%m-%d %H:%M:%S UTC'
  nvidia-smi 2>&1 || echo "nvidia-smi: not available"
  nproc; free -g 2>/dev/null | head -2
} > "$OUT/env.txt" 2>&1
rm -rf "$SITE"
# shellcheck disable=SC2086  # PIP and CHECK_ARGS are word lists
if ! $PIP install -q --no-index --no-deps --no-compile --no-cache-dir --disable-pip-version-check \
    --target "$SITE" "$KIT"/wheels/*.whl >> "$OUT/env.txt" 2>&1; then
  echo "error: the kit did not install (see env.txt)" >&2
  exit 3
fi
export PYTHONPATH="$SITE${BASE_PYTHONPATH:+:$BASE_PYTHONPATH}:$PWD"
case "$KIT" in /*) ;; *) KIT="$PWD/$KIT" ;; esac
export DISTILL_DATA_DIR="$KIT/data" PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 RAY_USAGE_STATS_ENABLED=0
$PYTHON - >> "$OUT/env.txt" 2>&1 <<'PY'
import importlib.metadata as metadata
import platform
import sys

import torch

print("python", sys.version.split()[0], platform.platform())
print("torch", torch.__version__, "cuda", torch.version.cuda, "cudnn", torch.backends.cudnn.version(),
      "device", torch.cuda.get_device_name(0) if torch.cuda.is_available() else "none")
for name in ("numpy", "diffusers", "pydantic", "pydantic-settings", "triton", "scipy", "faiss-cpu", "faiss-gpu-cu12",
             "ray"):
    try:
        print(name, metadata.version(name))
    except metadata.PackageNotFoundError:
        print(name, "not installed")
PY
# shellcheck disable=SC2086
timeout -k 15 $((${BUDGET_S%.*} + 30)) $PYTHON bench/gpu_check.py --budget-s "$BUDGET_S" --out "$OUT" ${CHECK_ARGS:-} \
  > /dev/null 2> "$OUT/log.txt"
rc=$?
if $PYTHON -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)' 2>/dev/null; then
  # no compile path here: four compilations would not fit; the check's pixel section compiles on the GPU
  SPEED_ARGS=(--device cuda --sizes convnet:64,resnet18:224 --rows epoch-ipc10,test-2000,dm-iter
              --paths ref,bf16,bf16+cl --repeats 2 --acc-epochs 0)
else
  SPEED_ARGS=(--quick --paths ref,bf16 --acc-epochs 0)  # the rehearsal: the script runs from the kit
fi
timeout -k 5 "$TRAIN_SPEED_S" $PYTHON bench/train_speed.py "${SPEED_ARGS[@]}" --out "$OUT/train_speed.md" \
  >> "$OUT/log.txt" 2>&1 || echo "train_speed: exit $? (a timeout keeps the rows printed in log.txt)" >> "$OUT/log.txt"
cat "$OUT/table.md" 2>/dev/null || echo "no table: see log.txt"
tail -3 "$OUT/log.txt"
exit $rc
