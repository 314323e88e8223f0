#!/usr/bin/env bash
# Create (idempotently) the Python virtualenv used by tests/python and install
# the pinned requirements from tests/python/requirements.txt.
#
#   scripts/python-venv.sh            # venv at $PUBRUN_VENV or <repo>/.venv
#
# Needs only python3 (>= 3.9). On Debian/Ubuntu system Python, `python3 -m venv`
# requires the `python3-venv` package (apt-get install -y python3-venv); this
# script tries to install it when it is missing and we are root.
# Prints the venv path as its last line.
set -euo pipefail

REPO_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${PUBRUN_VENV:-$REPO_ROOT/.venv}"
REQS="$REPO_ROOT/tests/python/requirements.txt"
PYTHON="${PYTHON:-python3}"
STAMP="$VENV/.pubrun-requirements.sha256"

log() { echo "python-venv: $*" >&2; }

if ! command -v "$PYTHON" >/dev/null 2>&1; then
  log "error: $PYTHON not found; install python3 (e.g. apt-get install -y python3 python3-venv)"
  exit 1
fi

venv_ok() { [ -x "$VENV/bin/python" ] && "$VENV/bin/python" -m pip --version >/dev/null 2>&1; }

if ! venv_ok; then
  log "creating venv at $VENV"
  rm -rf "$VENV"
  if ! "$PYTHON" -m venv "$VENV" 2>/dev/null; then
    rm -rf "$VENV"
    if command -v apt-get >/dev/null 2>&1 && [ "$(id -u)" = 0 ]; then
      pyver="$("$PYTHON" -c 'import sys; print(f"{sys.version_info[0]}.{sys.version_info[1]}")')"
      log "python3 -m venv failed; installing python3-venv (Debian)"
      export DEBIAN_FRONTEND=noninteractive
      apt-get update -qq >&2
      apt-get install -y -qq python3-venv >&2 || apt-get install -y -qq "python${pyver}-venv" >&2
      "$PYTHON" -m venv "$VENV"
    else
      log "error: '$PYTHON -m venv' failed; on Debian/Ubuntu install the python3-venv package"
      exit 1
    fi
  fi
fi

want="$(sha256sum "$REQS" | cut -d' ' -f1)"
have="$(cat "$STAMP" 2>/dev/null || true)"
if [ "$want" != "$have" ]; then
  log "installing pinned requirements from $REQS"
  "$VENV/bin/python" -m pip install --disable-pip-version-check -q -r "$REQS" >&2
  echo "$want" >"$STAMP"
else
  log "requirements already installed"
fi

echo "$VENV"
