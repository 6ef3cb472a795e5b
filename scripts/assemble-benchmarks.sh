#!/usr/bin/env bash
# Rebuild docs/BENCHMARKS.md from the summary, the baseline table (bench/results/baselines.jsonl) and the
# per-area sections in docs/bench-parts/.
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-.venv/bin/python}"
{
  cat docs/bench-parts/00-summary.md
  echo
  echo "## Baselines: random, herding, k-center (protocol dc) — \`bench/baselines.py\`"
  echo
  "$PY" bench/baselines.py --table-only --results bench/results/baselines.jsonl
  cat docs/bench-parts/01-baselines-notes.md
  for part in latent diffusion pixel-dc-dm pixel-mtt service scale; do
    echo
    sed -E 's/^(#+) /\1# /' "docs/bench-parts/$part.md"
  done
} > docs/BENCHMARKS.md.tmp
mv docs/BENCHMARKS.md.tmp docs/BENCHMARKS.md
