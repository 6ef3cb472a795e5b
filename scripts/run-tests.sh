#!/usr/bin/env bash
# Run the test suite; "no tests collected" (pytest exit 5) is a failure, not a pass.
set -uo pipefail
PY="${1:-python}"
shift || true
"$PY" -m pytest -q -p no:cacheprovider --timeout 900 "$@"
rc=$?
if [ "$rc" -eq 5 ]; then
  echo "error: pytest collected no tests" >&2
  exit 1
fi
exit "$rc"
