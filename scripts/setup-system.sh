#!/usr/bin/env bash
# System packages, per use: `setup-system.sh demo` needs none (MNIST comes from DISTILL_DATA_DIR); `setup-system.sh
# test` adds Fashion-MNIST from Debian and Debian's chromium + chromium-driver for the web page's browser tests
# (tests/interfaces/test_browser.py). apt's own output goes to a log file; one line says what happened.
set -euo pipefail
purpose="${1:-test}"
missing=()
case "$purpose" in
  demo) ;;
  test)
    [ -d /usr/share/datasets/fashion-mnist ] || missing+=(dataset-fashion-mnist)
    command -v chromium >/dev/null 2>&1 || missing+=(chromium)
    command -v chromedriver >/dev/null 2>&1 || missing+=(chromium-driver)
    ;;
  *) echo "usage: setup-system.sh demo|test" >&2; exit 2 ;;
esac
if [ "${#missing[@]}" -eq 0 ]; then
  exit 0
fi
if command -v apt-get >/dev/null 2>&1 && [ "$(id -u)" = "0" ]; then
  log="${TMPDIR:-/tmp}/distill-setup-system.log"
  echo "installing system packages for the $purpose: ${missing[*]} (apt's output: $log)"
  { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}"; } >"$log" 2>&1 \
    || { tail -20 "$log" >&2; exit 1; }
else
  echo "note: missing system packages: ${missing[*]}; run 'sudo apt-get install ${missing[*]}'" \
       "(Fashion-MNIST can also go in \$DISTILL_DATA_DIR/fashion-mnist; without chromium the browser tests are skipped)" >&2
fi
