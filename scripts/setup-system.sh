#!/usr/bin/env bash
# System packages the project needs: Fashion-MNIST from Debian (the other datasets come from DISTILL_DATA_DIR), and
# Debian's chromium + chromium-driver for the web page's browser tests (tests/interfaces/test_browser.py).
set -euo pipefail
missing=()
[ -d /usr/share/datasets/fashion-mnist ] || missing+=(dataset-fashion-mnist)
command -v chromium >/dev/null 2>&1 || missing+=(chromium)
command -v chromedriver >/dev/null 2>&1 || missing+=(chromium-driver)
if [ "${#missing[@]}" -eq 0 ]; then
  exit 0
fi
if command -v apt-get >/dev/null 2>&1 && [ "$(id -u)" = "0" ]; then
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}"
else
  echo "note: missing system packages: ${missing[*]}; run 'sudo apt-get install ${missing[*]}'" \
       "(Fashion-MNIST can also go in \$DISTILL_DATA_DIR/fashion-mnist; without chromium the browser tests are skipped)" >&2
fi
