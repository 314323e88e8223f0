#!/usr/bin/env bash
# Seed 004 on pubrun, end to end, in one command (from anywhere):
#
#   bash examples/seed-004/run.sh [CSV_FILE]
#
# Starts `pubrun serve --config examples/seed-004/pubrun.toml` on a free
# 127.0.0.1 port with a fresh temporary data directory, publishes the CSV
# (default: sample.csv) to `uploads` with attribute name=<file name>, waits
# for the fit-model run to end, prints its log, its model.json and the result
# message from `results`, then stops the server and removes the data
# directory (KEEP=1 keeps it). Builds target/debug/pubrun first if missing.
# Exits with the run's exit code (2 for malformed CSV).
set -euo pipefail

. "$(dirname "${BASH_SOURCE[0]}")/setup.sh" "$@"

port="$(free_port)"
export PUBRUN_ADDR="http://127.0.0.1:$port" PUBRUN_PROJECT=demo

echo "== pubrun serve --listen 127.0.0.1:$port --config $here/pubrun.toml"
# This directory goes on the server's PATH so the job's `command = "fit.py"` resolves.
start_server "$PUBRUN_ADDR" "$data/server.log" 150 env PATH="$here:$PATH" "$pubrun" serve \
  --listen "127.0.0.1:$port" --data-dir "$data/pubrun-data" --config "$here/pubrun.toml"

name="$(basename "$csv")"
echo "== pubrun publish uploads --data-file $name --attr name=$name"
msg_id="$("$pubrun" publish uploads --data-file "$csv" --attr "name=$name" | tr -d '[:space:]')"
echo "message id: $msg_id"

# The run for our message: wait until it exists and is terminal.
run_json=""
for _ in $(seq 1 600); do
  run_json="$("$pubrun" runs --job fit-model --limit 100 --json | python3 -c '
import json, sys
want = sys.argv[1]
for r in json.load(sys.stdin)["runs"]:
    if want in (r["message"]["id"], r["message"]["id"].split("/")[-1]):
        print(json.dumps(r))
        break
' "$msg_id")"
  if [ -n "$run_json" ] && python3 -c 'import json,sys; sys.exit(0 if json.loads(sys.argv[1])["status"] in ("succeeded","failed","timed_out","cancelled") else 1)' "$run_json"; then
    break
  fi
  sleep 0.2
done
[ -n "$run_json" ] || { echo "no run appeared for message $msg_id" >&2; cat "$data/server.log" >&2; exit 1; }
read -r run_id status exit_code < <(python3 -c '
import json, sys
r = json.loads(sys.argv[1]); e = r.get("exit") or {}
code = e.get("exit_code")
print(r["id"], r["status"], "" if code is None else code)' "$run_json")
echo "== run $run_id: $status (exit code ${exit_code:-none})"

echo "== pubrun runs show $run_id"
"$pubrun" runs show "$run_id"

echo "== pubrun logs $run_id"
"$pubrun" logs "$run_id"

model="$data/pubrun-data/runs/$run_id/work/model.json"
if [ -f "$model" ]; then
  echo "== $model"
  cat "$model"
fi

echo "== pubrun pull results-watch --ack"
show_results "$pubrun"

exit_like_run "$status" "$exit_code"
