#!/usr/bin/env bash
# Cluster benchmark (issue 12, item 7): pubrun on the embedded store, in
# cluster mode with 1 and with 3 servers on one PostgreSQL, and a plain
# PostgreSQL queue baseline (pgbench running `FOR UPDATE SKIP LOCKED` worker
# loops, as pgmq/River do), side by side in one run. A report, not a test:
# it prints one markdown table of figures and ratios and asserts nothing.
#
#   bash bench/cluster.sh
#   PUBRUN_BIN=target/release/pubrun bash bench/cluster.sh   # skip the cargo build
# Knobs: BENCH_COUNT (messages, 50000) JOBS_N (trivial runs, 2000)
#   SLOW_N (executor-bound runs, 90) AGENT_SLOTS (per server, 2) BENCH_KEEP=1
#
# Workloads, each against every configuration:
#  publish   BENCH_COUNT × 100 B, 100 msgs/request, 4 requests in flight (driver phase a)
#  consume   StreamingPull + ack of those messages (driver phase b)
#  jobs      JOBS_N trivial `true` process jobs run by the owner: runs/s from the
#            first run's creation to the last run's end (run records' times)
#  executor  SLOW_N `sleep 0.2` runs of an `agents` pool served by every server's
#            built-in agent (--agent-pool, AGENT_SLOTS slots each): the executor
#            is the bottleneck, so more servers should mean more runs/s
# In the 3-server configuration every call goes to a standby and is forwarded
# to the owner (the worst case of "any server answers").
# PostgreSQL runs with its defaults (fsync on, synchronous_commit on), like
# pubrun's fdatasync before acknowledging. Everything listens on 127.0.0.1.
set -euo pipefail

ROOT="$(cd "$(dirname "$0")/.." && pwd)"
cd "$ROOT"
. "$ROOT/scripts/lib.sh"
COUNT="${BENCH_COUNT:-50000}"
JOBS_N="${JOBS_N:-2000}"
SLOW_N="${SLOW_N:-90}"
AGENT_SLOTS="${AGENT_SLOTS:-2}"

PUBRUN_BIN="$(bench_pubrun "$ROOT" release)"
DRIVER="$(bench_driver "$ROOT")"

PGBIN="$(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V | tail -n 1)"
[ -x "$PGBIN/initdb" ] || { echo "PostgreSQL server binaries not found: apt-get install postgresql" >&2; exit 1; }

tmp="$(mktemp -d "${TMPDIR:-/tmp}/pubrun-cluster-bench.XXXXXX")"
pgdir="$(mktemp -d /tmp/pubrun-bench-pg.XXXXXX)"
pids=()
as_pg=()
if [ "$(id -u)" = 0 ]; then chown postgres: "$pgdir"; as_pg=(runuser -u postgres --); fi
pg() { "${as_pg[@]}" "$PGBIN/$1" "${@:2}"; }
stop_servers() {
  for p in "${pids[@]:-}"; do [ -n "$p" ] && kill -TERM "$p" 2>/dev/null || true; done
  for p in "${pids[@]:-}"; do [ -n "$p" ] && wait "$p" 2>/dev/null || true; done
  pids=()
}
cleanup() {
  stop_servers
  pg pg_ctl -D "$pgdir/data" -m immediate stop >/dev/null 2>&1 || true
  if [ "${BENCH_KEEP:-0}" = 1 ]; then echo "[bench] kept $tmp and $pgdir" >&2; else rm -rf "$tmp" "$pgdir"; fi
}
trap cleanup EXIT
trap 'exit 130' INT TERM

PGPORT="$(free_port)"
pg initdb -D "$pgdir/data" -A trust -U postgres -E UTF8 --locale C >/dev/null
pg pg_ctl -D "$pgdir/data" -l "$pgdir/pg.log" -w \
  -o "-p $PGPORT -k $pgdir -c listen_addresses=127.0.0.1 -c max_connections=200" start >/dev/null
psql_() { "$PGBIN/psql" -h 127.0.0.1 -p "$PGPORT" -U postgres -qAt "$@"; }
url_for() { echo "postgres://postgres@127.0.0.1:$PGPORT/$1?sslmode=disable"; }

fill_template "$ROOT/bench/cluster.toml" conc="$(( $(nproc) * 2 ))" >"$tmp/bench.toml"

# start_server NAME PORT [--store URL]: waits until /healthz answers.
start_server() {
  local name="$1" port="$2"; shift 2
  PUBRUN_LOG=warn PUBRUN_AGENT_TOKEN=bench-agent-token "$PUBRUN_BIN" serve \
    --listen "127.0.0.1:$port" --data-dir "$tmp/$cfg-$name" --node-name "$name" \
    --agent-pool workers --agent-slots "$AGENT_SLOTS" "$@" 2>"$tmp/$cfg-$name.log" &
  pids+=($!)
  wait_healthy "http://127.0.0.1:$port" "${pids[-1]}" "$tmp/$cfg-$name.log" 300 || exit 1
}

measure() { # cfg addr(host:port) owner-pid
  local addr="$2" pid="$3"
  echo "[bench] $1: publish/consume $COUNT msgs through $addr" >&2
  "$DRIVER" run --target pubrun --addr "http://$addr" --pid "$pid" --out "$tmp/$1.jsonl" \
    --phases ab --count "$COUNT" >&2
  "$PUBRUN_BIN" apply -f "$tmp/bench.toml" --yes --addr "http://$addr" --project bench >/dev/null
  echo "[bench] $1: $JOBS_N trivial runs, $SLOW_N executor-bound runs" >&2
  python3 "$ROOT/bench/cluster.py" jobs --addr "$addr" --jobs-n "$JOBS_N" --slow-n "$SLOW_N" >>"$tmp/$1.jsonl"
}

cfg=embedded
p1="$(free_port)"
start_server a "$p1"
measure embedded "127.0.0.1:$p1" "${pids[0]}"
stop_servers

cfg=cluster1
psql_ -c "CREATE DATABASE bench_c1"
p1="$(free_port)"
start_server a "$p1" --store "$(url_for bench_c1)"
measure cluster1 "127.0.0.1:$p1" "${pids[0]}"
stop_servers

cfg=cluster3
psql_ -c "CREATE DATABASE bench_c3"
p1="$(free_port)"; p2="$(free_port)"; p3="$(free_port)"
start_server a "$p1" --store "$(url_for bench_c3)"
start_server b "$p2" --store "$(url_for bench_c3)"
start_server c "$p3" --store "$(url_for bench_c3)"
measure cluster3 "127.0.0.1:$p2" "${pids[0]}"
stop_servers

echo "[bench] PostgreSQL queue baseline (pgbench, SKIP LOCKED)" >&2
psql_ -c "CREATE DATABASE bench_pg"
PGDB=bench_pg
psql_ -d "$PGDB" -c "CREATE TABLE q (id bigserial PRIMARY KEY, payload bytea NOT NULL);
  CREATE TABLE runs (id bigserial PRIMARY KEY, status text NOT NULL, started timestamptz, ended timestamptz);"
cat > "$pgdir/publish.sql" <<'SQL'
INSERT INTO q (payload) SELECT convert_to(repeat('x', 100), 'UTF8') FROM generate_series(1, 100);
SQL
cat > "$pgdir/consume.sql" <<'SQL'
DELETE FROM q WHERE id IN (SELECT id FROM q ORDER BY id LIMIT 100 FOR UPDATE SKIP LOCKED);
SQL
cat > "$pgdir/dispatch.sql" <<'SQL'
BEGIN;
UPDATE runs SET status = 'running', started = now() WHERE id = (SELECT id FROM runs WHERE status = 'queued' ORDER BY id LIMIT 1 FOR UPDATE SKIP LOCKED) RETURNING id \gset
UPDATE runs SET status = 'succeeded', ended = now() WHERE id = :id;
COMMIT;
SQL
chmod a+r "$pgdir"/*.sql
pgb() { # script clients transactions → tps (excluding connection setup)
  "$PGBIN/pgbench" -h 127.0.0.1 -p "$PGPORT" -U postgres -n -f "$1" -c "$2" -j 2 -t "$3" "$PGDB" 2>/dev/null \
    | awk '/^tps =/ {print $3; exit}'
}
tx=$(( COUNT / 100 / 4 ))
pub_tps="$(pgb "$pgdir/publish.sql" 4 "$tx")"
con_tps="$(pgb "$pgdir/consume.sql" 4 "$tx")"
psql_ -d "$PGDB" -c "INSERT INTO runs (status) SELECT 'queued' FROM generate_series(1, $(( JOBS_N * 2 )))"
disp_tps="$(pgb "$pgdir/dispatch.sql" 4 $(( JOBS_N / 4 )))"
python3 - "$pub_tps" "$con_tps" "$disp_tps" >>"$tmp/pg.jsonl" <<'PY'
import json, sys
pub, con, disp = (float(x) for x in sys.argv[1:4])
for metric, value, note in (("publish_batched", pub * 100, "pgbench, 4 clients, INSERT of 100 rows per transaction"),
                            ("consume_stream", con * 100, "pgbench, 4 clients, DELETE … 100 rows FOR UPDATE SKIP LOCKED"),
                            ("jobs_runs_per_s", disp, "pgbench, 4 clients, claim one queued row SKIP LOCKED + mark it done")):
    print(json.dumps({"target": "pg", "metric": metric, "value": value, "unit": "/s", "note": note}))
PY

python3 "$ROOT/bench/cluster.py" table --dir "$tmp" --count "$COUNT" --jobs-n "$JOBS_N" \
  --slow-n "$SLOW_N" --agent-slots "$AGENT_SLOTS" --pg-version "$("$PGBIN/postgres" --version)"
