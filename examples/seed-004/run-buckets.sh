#!/usr/bin/env bash
# Seed 004 end to end through a bucket, in one command (from anywhere):
#
#   bash examples/seed-004/run-buckets.sh [CSV_FILE]
#
# Starts `pubrun serve --config examples/seed-004/pubrun-buckets.toml` on a
# free 127.0.0.1 port (temporary data dir), uploads the CSV to gs://input/csv/
# with the official google-cloud-storage client (venv made by
# scripts/python-venv.sh), waits for the fit-model run, prints its log, the
# model from gs://output/results/<run id>/model.json and the result message,
# then stops the server (KEEP=1 keeps the data directory). Exits with the
# run's exit code.
set -euo pipefail

. "$(dirname "${BASH_SOURCE[0]}")/setup.sh" "$@"
venv_python="$(bash "$repo/scripts/python-venv.sh" | tail -n 1)/bin/python"

port="$(free_port)"
export PUBRUN_ADDR="http://127.0.0.1:$port" PUBRUN_PROJECT=demo STORAGE_EMULATOR_HOST="http://127.0.0.1:$port"

echo "== pubrun serve --config $here/pubrun-buckets.toml"
start_server "$PUBRUN_ADDR" "$data/server.log" 150 env PATH="$here:$PATH" "$pubrun" serve \
  --listen "127.0.0.1:$port" --data-dir "$data/pubrun-data" --config "$here/pubrun-buckets.toml"

name="csv/$(basename "$csv")"
echo "== upload $name to gs://input with google-cloud-storage"
"$venv_python" - "$csv" "$name" <<'PY'
import sys
from google.auth.credentials import AnonymousCredentials
from google.cloud import storage
client = storage.Client(project="demo", credentials=AnonymousCredentials())
blob = client.bucket("input").blob(sys.argv[2])
blob.upload_from_filename(sys.argv[1], content_type="text/csv")
print(f"uploaded gs://input/{blob.name} (generation {blob.generation}, md5 {blob.md5_hash})")
PY

run_id=""; status=""
for _ in $(seq 1 600); do
  read -r run_id status < <("$pubrun" runs --job fit-model --limit 1 --json | python3 -c '
import json, sys
runs = json.load(sys.stdin)["runs"]
print(runs[0]["id"], runs[0]["status"]) if runs else print("", "")') || true
  case "$status" in succeeded|failed|timed_out|cancelled) break ;; esac
  sleep 0.2
done
[ -n "$run_id" ] || { echo "no run appeared" >&2; cat "$data/server.log" >&2; exit 1; }
echo "== run $run_id: $status"
"$pubrun" logs "$run_id"

echo "== gs://output/results/$run_id/model.json"
curl -fsS "$PUBRUN_ADDR/storage/v1/b/output/o/results%2F$run_id%2Fmodel.json?alt=media" || echo "(no model: the run failed)"

echo "== pubrun pull results-watch --ack"
show_results "$pubrun"
[ "$status" = succeeded ]
