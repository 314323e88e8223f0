#!/usr/bin/env bash
# Job benchmark for pubrun (issue 3, item 7). A report, not a test: it asserts
# nothing about speed. Run from the repository root:
#
#   bash bench/jobs.sh
#
# Builds `cargo build --release -p pubrun`, starts `pubrun serve` on a free
# 127.0.0.1 port with a temporary data directory and a generated manifest,
# then (bench/jobs.py) measures and prints one markdown table:
#   (a) message → process start latency p50/p99 (200 messages, 20 ms apart);
#   (b) trivial `true` jobs per second (2000 messages, concurrency nproc*2)
#       next to this machine's fork+exec rate of /bin/true from bash loops;
#   (c) a container job's wall time vs plain `docker run --rm` of the same
#       image and command (10 each, interleaved), as a ratio.
# Everything is bounded in count and time; the server, its data directory and
# temp files are removed on exit (KEEP=1 keeps the temp directory).
#
# Knobs (environment): LATENCY_N=200 TPUT_N=2000 DOCKER_N=10 CONC=nproc*2
#   IMAGE=pubrun-test/busybox:latest NO_BUILD=1 (use the existing binary)
#   PUBRUN_BIN=path (measure that binary, no build)
#   PROFILE=release|debug SYNC=always|interval (the server's --sync mode)
#   WORK_DIR=memory (run working directories in a --work-dir on /dev/shm,
#   logs and state in the data directory) | a directory path
set -euo pipefail

repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$repo"
. "$repo/scripts/lib.sh"
profile="${PROFILE:-release}"
nproc="$(nproc)"
conc="${CONC:-$((nproc * 2))}"
image="${IMAGE:-pubrun-test/busybox:latest}"

pubrun="$(bench_pubrun "$repo" "$profile")"

tmp="$(mktemp -d "${TMPDIR:-/tmp}/pubrun-bench.XXXXXX")"
server_pid=""
extra_cleanup=""
cleanup() {
  stop_pid "$server_pid"
  if [ -n "$extra_cleanup" ]; then rm -rf "$extra_cleanup"; fi
  if [ "${KEEP:-0}" = 1 ]; then echo "[bench] kept $tmp" >&2; else rm -rf "$tmp"; fi
}
trap cleanup EXIT
trap 'exit 130' INT TERM

# Container phase prerequisites: an engine and the test image.
no_docker=""
if ! docker version >/dev/null 2>&1; then
  no_docker="no Docker engine answers"
elif ! docker image inspect "$image" >/dev/null 2>&1; then
  if [ "$image" = pubrun-test/busybox:latest ] && [ -f scripts/docker-test-image.sh ]; then
    echo "[bench] building $image with scripts/docker-test-image.sh" >&2
    bash scripts/docker-test-image.sh >&2 || no_docker="could not build $image"
  else
    no_docker="image $image is not present"
  fi
fi

fill_template "$repo/bench/jobs.toml" conc="$conc" image="$image" >"$tmp/bench.toml"

work_args=()
work_note=""
case "${WORK_DIR:-}" in
  "") ;;
  memory)
    work="$(mktemp -d /dev/shm/pubrun-bench-work.XXXXXX)"
    extra_cleanup="$work"
    work_args=(--work-dir "$work")
    work_note=", --work-dir $work"
    ;;
  *) work_args=(--work-dir "$WORK_DIR"); work_note=", --work-dir $WORK_DIR" ;;
esac

port="$(free_port)"
echo "[bench] pubrun serve on 127.0.0.1:$port, slots $conc, --sync ${SYNC:-always}, data in $tmp/data$work_note" >&2
start_server "http://127.0.0.1:$port" "$tmp/server.log" 200 env PUBRUN_LOG="${PUBRUN_LOG:-warn}" \
  "$pubrun" serve --listen "127.0.0.1:$port" --data-dir "$tmp/data" \
  --config "$tmp/bench.toml" --slots "$conc" --sync "${SYNC:-always}" "${work_args[@]}"

set +e
timeout 1800 python3 "$repo/bench/jobs.py" --addr "127.0.0.1:$port" --project bench --conc "$conc" \
  --latency-n "${LATENCY_N:-200}" --tput-n "${TPUT_N:-2000}" --docker-n "${DOCKER_N:-10}" \
  --image "$image" --no-docker "$no_docker" --profile "$profile (--sync ${SYNC:-always}$work_note)" --fsync-dir "$tmp"
rc=$?
set -e
if [ "$rc" != 0 ]; then
  echo "[bench] failed (exit $rc); last server log lines:" >&2
  tail -n 30 "$tmp/server.log" >&2
fi
exit "$rc"
