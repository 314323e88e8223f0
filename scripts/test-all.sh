#!/usr/bin/env bash
# The whole test suite: formatting and clippy, Rust unit + integration tests, then the official
# Google client tests against the real binary. README and .ci/run call this.
set -euo pipefail
cd "$(dirname "$0")/.."

echo "== cargo fmt --check, clippy"
cargo fmt --all --check
cargo clippy --workspace --all-targets --locked -- -D warnings
echo "== cargo build"
cargo build --workspace --locked
echo "== cargo test"
cargo test --workspace --locked --no-fail-fast
if [ -f tests/python/run.sh ]; then
  echo "== official Google client tests (python)"
  bash scripts/python-venv.sh
  PUBRUN_BIN="${CARGO_TARGET_DIR:-$PWD/target}/debug/pubrun" bash tests/python/run.sh
  echo "== official Google client tests (python) through a 3-server cluster on PostgreSQL"
  PUBRUN_TEST_STORE=cluster PUBRUN_BIN="${CARGO_TARGET_DIR:-$PWD/target}/debug/pubrun" bash tests/python/run.sh
fi
