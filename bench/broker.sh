#!/usr/bin/env bash
# Broker benchmark: pubrun vs NATS JetStream (Debian's nats-server), side by
# side, same workloads, same machine, one markdown table of pubrun/NATS ratios.
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
PUBRUN_PORT="${BENCH_PUBRUN_PORT:-18085}"
NATS_PORT="${BENCH_NATS_PORT:-14222}"
COUNT="${BENCH_COUNT:-100000}"
BACKLOG="${BENCH_BACKLOG:-1000000}"
RATE="${BENCH_RATE:-2000}"
SECS="${BENCH_SECS:-10}"
DRIVER_DIR="$ROOT/bench/broker/driver"
DRIVER="$DRIVER_DIR/target/release/broker-bench"

log() { printf '== %s\n' "$*" >&2; }

# ---- tools ------------------------------------------------------------------
NATS_BIN="$(command -v nats-server || true)"
[ -z "$NATS_BIN" ] && [ -x /usr/sbin/nats-server ] && NATS_BIN=/usr/sbin/nats-server
if [ -z "$NATS_BIN" ]; then
    log "installing Debian's nats-server"
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq nats-server >/dev/null
    NATS_BIN="$(command -v nats-server || echo /usr/sbin/nats-server)"
fi
if [ -n "${PUBRUN_BIN:-}" ]; then
    log "using the pubrun binary $PUBRUN_BIN (PUBRUN_BIN set; not building)"
else
    log "building pubrun (release)"
    cargo build --release -q -p pubrun
    PUBRUN_BIN="$ROOT/target/release/pubrun"
fi
log "building the load driver"
CARGO_TARGET_DIR="$DRIVER_DIR/target" cargo build --release -q --manifest-path "$DRIVER_DIR/Cargo.toml"

for port in "$PUBRUN_PORT" "$NATS_PORT"; do
    if (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null; then
        echo "port $port on 127.0.0.1 is in use; set BENCH_PUBRUN_PORT / BENCH_NATS_PORT" >&2
        exit 1
    fi
done

WORK="$(mktemp -d "${BENCH_TMPDIR:-${TMPDIR:-/tmp}}/broker-bench.XXXXXX")"
RESULTS="$WORK/results.jsonl"
PUBRUN_PID=""
NATS_PID=""
stop() { # stop PID: SIGTERM, wait, then SIGKILL if it lingers
    local pid="$1"
    [ -n "$pid" ] || return 0
    kill -TERM "$pid" 2>/dev/null || return 0
    for _ in $(seq 1 100); do kill -0 "$pid" 2>/dev/null || return 0; sleep 0.1; done
    kill -KILL "$pid" 2>/dev/null || true
}
cleanup() {
    stop "$PUBRUN_PID"; stop "$NATS_PID"
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

start_pubrun() { # start_pubrun DATA_DIR
    PUBRUN_LOG=warn "$PUBRUN_BIN" serve --listen "127.0.0.1:$PUBRUN_PORT" --data-dir "$1" >"$WORK/pubrun.log" 2>&1 &
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

start_nats() { # start_nats STORE_DIR
    nats_conf "$1" "$NATS_SYNC_LINE" >"$WORK/nats.conf"
    "$NATS_BIN" -c "$WORK/nats.conf" >"$WORK/nats.log" 2>&1 &
    NATS_PID=$!
    wait_port "$NATS_PORT" "$NATS_PID" nats
}

drive() { # drive TARGET ADDR PID PHASES
    "$DRIVER" run --target "$1" --addr "$2" --pid "$3" --phases "$4" --out "$RESULTS" \
        --count "$COUNT" --backlog "$BACKLOG" --rate "$RATE" --secs "$SECS"
}

LOAD_START="$(cut -d' ' -f1-3 /proc/loadavg)"
pick_nats_sync
NATS_VERSION="$("$NATS_BIN" --version 2>&1 | head -1)"
log "data dirs under $WORK ($(df -T "$WORK" | awk 'NR==2 {print $2}')); $NATS_VERSION: $NATS_SYNC_NOTE"

for round in abc d; do
    log "phases $round: pubrun"
    start_pubrun "$WORK/pubrun-$round"
    drive pubrun "http://127.0.0.1:$PUBRUN_PORT" "$PUBRUN_PID" "$round"
    [ "$round" = d ] && log "pubrun data dir: $(du -sh "$WORK/pubrun-$round" | cut -f1)"
    stop "$PUBRUN_PID"; PUBRUN_PID=""
    log "phases $round: NATS JetStream"
    start_nats "$WORK/nats-$round"
    drive nats "127.0.0.1:$NATS_PORT" "$NATS_PID" "$round"
    [ "$round" = d ] && log "nats store dir: $(du -sh "$WORK/nats-$round" | cut -f1)"
    stop "$NATS_PID"; NATS_PID=""
done

echo
echo "pubrun $(git -C "$ROOT" rev-parse --short HEAD 2>/dev/null || echo '?')$(git -C "$ROOT" diff --quiet 2>/dev/null || echo '+dirty') ($PUBRUN_BIN) vs $NATS_VERSION;" \
    "$(nproc) cores, $(awk '/MemTotal/ {printf "%.0f GiB", $2/1048576}' /proc/meminfo);" \
    "data on $(df -T "$WORK" | awk 'NR==2 {print $2}'); servers and driver on one machine;" \
    "load average $LOAD_START at the start, $(cut -d' ' -f1-3 /proc/loadavg) at the end."
echo "NATS durability: $NATS_SYNC_NOTE."
echo
"$DRIVER" table "$RESULTS"
if [ -n "${BENCH_RESULTS_JSONL:-}" ]; then cp "$RESULTS" "$BENCH_RESULTS_JSONL"; fi
