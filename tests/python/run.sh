#!/usr/bin/env bash
# Run the Python compatibility suite (tests/python) against an already built
# pubrun binary ($PUBRUN_BIN, default target/debug/pubrun). Builds nothing.
# Creates/updates the venv first (scripts/python-venv.sh, a no-op when current).
# Extra arguments go to pytest, e.g. `tests/python/run.sh -k rest -x`.
# Exits with pytest's code; "no tests collected" (5) counts as a failure.
set -uo pipefail

REPO_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
VENV="$("$REPO_ROOT/scripts/python-venv.sh" | tail -n 1)" || { echo "run.sh: venv setup failed" >&2; exit 1; }

cd "$REPO_ROOT/tests/python"
"$VENV/bin/python" -m pytest -q -c "$REPO_ROOT/tests/python/pytest.ini" "$@"
code=$?
if [ "$code" -eq 5 ]; then
  echo "run.sh: pytest collected no tests; treating as failure" >&2
  exit 1
fi
exit "$code"
