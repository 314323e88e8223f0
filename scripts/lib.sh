# Shell helpers the examples and benchmarks share. Source it:
#   . "$repo/scripts/lib.sh"
# Nothing here runs on sourcing; every function says what it needs.

# free_port: prints a port on 127.0.0.1 that was free a moment ago.
free_port() {
  python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'
}

# pubrun_bin REPO [PROFILE]: prints the pubrun binary to use: $PUBRUN_BIN,
# else the cargo target directory's PROFILE (debug) build, which is built
# first when it is missing.
pubrun_bin() {
  local repo="$1" profile="${2:-debug}" bin
  bin="${PUBRUN_BIN:-${CARGO_TARGET_DIR:-$repo/target}/$profile/pubrun}"
  if [ ! -x "$bin" ]; then
    command -v cargo >/dev/null 2>&1 || { echo "needs cargo to build $bin" >&2; return 1; }
    cargo_build_pubrun "$repo" "$profile"
  fi
  echo "$bin"
}

# bench_pubrun REPO PROFILE: prints the pubrun binary a benchmark measures:
# $PUBRUN_BIN as given, else the cargo target directory's PROFILE build, which
# is rebuilt first so that it matches the tree (NO_BUILD=1 skips that).
bench_pubrun() {
  local repo="$1" profile="$2" bin
  if [ -n "${PUBRUN_BIN:-}" ]; then
    echo "[bench] using the pubrun binary $PUBRUN_BIN (PUBRUN_BIN set; not building)" >&2
    echo "$PUBRUN_BIN"
    return 0
  fi
  bin="${CARGO_TARGET_DIR:-$repo/target}/$profile/pubrun"
  [ "${NO_BUILD:-0}" = 1 ] || cargo_build_pubrun "$repo" "$profile" || return 1
  [ -x "$bin" ] || { echo "no binary at $bin" >&2; return 1; }
  echo "$bin"
}

# cargo_build_pubrun REPO PROFILE: builds the pubrun binary (release or
# debug), cargo's output on stderr.
cargo_build_pubrun() {
  echo "== building pubrun (cargo build -p pubrun, $2)" >&2
  if [ "$2" = release ]; then
    (cd "$1" && cargo build --release -p pubrun >&2)
  else
    (cd "$1" && cargo build -p pubrun >&2)
  fi
}

# bench_driver REPO: builds the broker load driver (bench/broker/driver, a
# workspace of its own with its own target dir, so it never touches the main
# build) and prints its binary.
bench_driver() {
  local dir="$1/bench/broker/driver"
  echo "[bench] building the load driver (bench/broker/driver)" >&2
  CARGO_TARGET_DIR="$dir/target" cargo build --release -q --locked --manifest-path "$dir/Cargo.toml" >&2 || return 1
  echo "$dir/target/release/broker-bench"
}

# wait_healthy URL PID LOG [TRIES]: polls URL/healthz every 0.1 s until it
# answers (TRIES times, 150 by default); fails, printing LOG, when the
# process PID exits first or the server never answers.
wait_healthy() {
  local url="$1" pid="$2" log="$3" tries="${4:-150}"
  for _ in $(seq 1 "$tries"); do
    curl -fsS "$url/healthz" >/dev/null 2>&1 && return 0
    kill -0 "$pid" 2>/dev/null || { echo "pubrun serve exited:" >&2; cat "$log" >&2; return 1; }
    sleep 0.1
  done
  curl -fsS "$url/healthz" >/dev/null 2>&1 && return 0
  echo "pubrun serve did not answer at $url:" >&2; tail -n 30 "$log" >&2; return 1
}

# start_server URL LOG TRIES COMMAND...: runs COMMAND (a `pubrun serve …`,
# prefixed with `env VAR=value` for extra environment) in the background with
# its stderr in LOG, sets server_pid, and waits until URL is healthy (TRIES
# polls, as wait_healthy).
start_server() {
  local url="$1" log="$2" tries="$3"
  shift 3
  "$@" 2>"$log" &
  server_pid=$!
  wait_healthy "$url" "$server_pid" "$log" "$tries"
}

# temp_data_dir PREFIX: makes a fresh directory (sets data, and server_pid to
# none yet) and traps EXIT to stop the server start_server started and remove
# the directory (KEEP=1 keeps it); INT and TERM exit 130 through that trap.
temp_data_dir() {
  data="$(mktemp -d "${TMPDIR:-/tmp}/$1.XXXXXX")"
  server_pid=""
  trap stop_server_and_data EXIT
  trap 'exit 130' INT TERM
}

stop_server_and_data() {
  stop_pid "$server_pid"
  if [ "${KEEP:-0}" = 1 ]; then
    echo "== data directory kept: $data"
  else
    rm -rf "$data"
  fi
}

# fill_template FILE KEY=VALUE...: prints FILE with each @KEY@ replaced by
# VALUE (the benchmarks' manifests are files with such placeholders).
fill_template() {
  local text kv
  text="$(cat "$1")" || return 1
  shift
  for kv in "$@"; do text="${text//@${kv%%=*}@/${kv#*=}}"; done
  printf '%s\n' "$text"
}

# abs_file PATH: PATH as an absolute path; fails when it is not a file.
abs_file() {
  local path
  path="$(cd "$(dirname "$1")" && pwd)/$(basename "$1")" || return 1
  [ -f "$path" ] || { echo "no such file: $1" >&2; return 1; }
  echo "$path"
}

# stop_pid PID: SIGTERM, up to 10 s to exit, then SIGKILL; reaps it when it
# is a child of this shell. An empty or gone PID is fine.
stop_pid() {
  local pid="$1"
  [ -n "$pid" ] || return 0
  kill -TERM "$pid" 2>/dev/null || return 0
  for _ in $(seq 1 100); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
  kill -KILL "$pid" 2>/dev/null || true
  wait "$pid" 2>/dev/null || true
}

# show_results PUBRUN [TRIES]: prints the first messages that arrive on the
# `results-watch` subscription (acking them), polling every 0.2 s.
show_results() {
  local pubrun="$1" tries="${2:-50}" out=""
  for _ in $(seq 1 "$tries"); do
    out="$("$pubrun" pull results-watch --max 10 --ack 2>/dev/null || true)"
    [ -n "$out" ] && break
    sleep 0.2
  done
  echo "${out:-(no result message)}"
}

# exit_like_run STATUS EXIT_CODE: exits 0 for a succeeded run, else with the
# run's exit code (1 when it has none).
exit_like_run() {
  case "$1" in
    succeeded) exit 0 ;;
    *) exit "${2:-1}" ;;
  esac
}
