#!/usr/bin/env bash
# System packages the project needs: Fashion-MNIST from Debian (the other datasets come from DISTILL_DATA_DIR).
set -euo pipefail
if [ -d /usr/share/datasets/fashion-mnist ]; then
  exit 0
fi
if command -v apt-get >/dev/null 2>&1 && [ "$(id -u)" = "0" ]; then
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq dataset-fashion-mnist
else
  echo "note: Fashion-MNIST missing; run 'sudo apt-get install dataset-fashion-mnist' or put it in \$DISTILL_DATA_DIR/fashion-mnist" >&2
fi
