#!/usr/bin/env bash
# Seed 001 on pubrun, end to end, in one command (from anywhere):
#
#   bash examples/seed-001/run.sh
#
# On a machine with Docker (and cargo, to build pubrun when
# target/debug/pubrun is missing; PUBRUN_BIN=path uses another binary):
#
#  1. builds the images: the agent image `pubrun-agent:dev` (scripts/agent-image.sh:
#     the pubrun binary + busybox) and the job image `seed001-importer:latest`
#     (busybox + import.sh), both without a registry;
#  2. creates the docker network `pubrun-seed001-$$` and starts `pubrun serve` on
#     its gateway address (the host side, where machine containers reach it)
#     with a random --token, a temporary data directory and pubrun.toml
#     (network and server_url rewritten for that network and a free port);
#  3. fires the nightly schedule now (`pubrun schedules run-now nightly-import`);
#  4. shows the machine starting, the container job running on it, its log,
#     the result message from `results` (status, exit code), the machine
#     deleted once idle, and `pubrun cost --machines --runs`;
#  5. stops the server, removes the network, any container left and the data
#     directory (KEEP=1 keeps the directory).
#
# Exits with the run's exit code. FAIL=1 makes the importer fail (exit 3):
# the result message then says status=failed, exit_code=3, after 2 attempts.
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
repo="$(cd "$here/../.." && pwd)"
. "$repo/scripts/lib.sh"

need() { command -v "$1" >/dev/null 2>&1 || { echo "run.sh: needs $1" >&2; exit 1; }; }
need docker
need curl
docker version --format '{{.Server.Version}}' >/dev/null || { echo "run.sh: the Docker engine does not answer" >&2; exit 1; }

pubrun="$(pubrun_bin "$repo")"

echo "== images"
bash "$repo/scripts/agent-image.sh" "$pubrun" pubrun-agent:dev | tail -n1
# The job image: busybox (as the tests build it, from Debian's busybox-static)
# plus import.sh, assembled with create/cp/commit: no registry, no builder.
bash "$repo/scripts/docker-test-image.sh" >/dev/null
cid="$(docker create pubrun-test/busybox:latest)"
docker cp "$here/import.sh" "$cid:/import.sh" >/dev/null
docker commit --change 'CMD ["/bin/sh", "/import.sh"]' --change 'WORKDIR /workspace' \
  "$cid" seed001-importer:latest >/dev/null
docker rm "$cid" >/dev/null
echo "seed001-importer:latest"

data="$(mktemp -d "${TMPDIR:-/tmp}/pubrun-seed001.XXXXXX")"
net="pubrun-seed001-$$"
server_pid=""
cleanup() {
  stop_pid "$server_pid"
  # Machines the server did not get to delete (interrupted run).
  left="$(docker ps -aq --filter "label=pubrun.pool=big" --filter "network=$net" 2>/dev/null || true)"
  [ -z "$left" ] || docker rm -f $left >/dev/null 2>&1 || true
  docker network rm "$net" >/dev/null 2>&1 || true
  if [ "${KEEP:-0}" = 1 ]; then
    echo "== data directory kept: $data"
  else
    # The machines' run directories were made by the engine (as root).
    if [ -d "$data/machines" ] && [ "$(id -u)" != 0 ]; then
      docker run --rm -v "$data/machines:/m" pubrun-test/busybox:latest sh -c 'rm -rf /m/*' >/dev/null 2>&1 || true
    fi
    rm -rf "$data" 2>/dev/null || true
  fi
}
trap cleanup EXIT
trap 'exit 130' INT TERM

docker network create "$net" >/dev/null
gw="$(docker network inspect -f '{{range .IPAM.Config}}{{.Gateway}} {{end}}' "$net" | tr ' ' '\n' | grep -m1 -E '^[0-9]+\.[0-9]+\.[0-9]+\.[0-9]+$')"
# A free port on the gateway address.
port=""
for p in $(seq 18085 18185); do
  if ! (exec 3<>"/dev/tcp/$gw/$p") 2>/dev/null; then port="$p"; break; fi
done
[ -n "$port" ] || { echo "run.sh: no free port on $gw" >&2; exit 1; }

token="$(head -c 16 /dev/urandom | od -An -tx1 | tr -d ' \n')"
export PUBRUN_ADDR="http://$gw:$port" PUBRUN_TOKEN="$token" PUBRUN_PROJECT=demo
sed -e "s|^network = .*|network = \"$net\"|" \
    -e "s|^server_url = .*|server_url = \"http://$gw:$port\"|" \
    -e "s|^docker_socket = true.*|docker_socket = true\nmachine_data_dir = \"$data/machines\"|" \
    "$here/pubrun.toml" > "$data/pubrun.toml"
if [ "${FAIL:-0}" = 1 ]; then
  sed -i -e 's|INDEX = "{{ data.index }}" }|INDEX = "{{ data.index }}", FAIL = "1" }|' \
         -e 's|initial_backoff = "30s"|initial_backoff = "1s"|' "$data/pubrun.toml"
fi

echo "== pubrun serve --listen $gw:$port --token … --config pubrun.toml (network $net)"
start_server "$PUBRUN_ADDR" "$data/server.log" 300 "$pubrun" serve --listen "$gw:$port" \
  --token "$token" --data-dir "$data/pubrun-data" --config "$data/pubrun.toml"

echo "== pubrun machines   (no work: no machine)"
"$pubrun" machines

echo "== pubrun schedules run-now nightly-import"
"$pubrun" schedules run-now nightly-import

# Small JSON helpers without python or jq: the first value of a key.
field() { grep -o "\"$1\": *\"[^\"]*\"" | head -n1 | sed -e 's/.*: *"//' -e 's/"$//'; }
num() { grep -o "\"$1\": *[0-9-]*" | head -n1 | sed -e 's/.*: *//'; }
fail() { echo "run.sh: $*" >&2; echo "--- server log ---" >&2; tail -n 50 "$data/server.log" >&2; exit 1; }

run_id=""
for _ in $(seq 1 300); do
  run_id="$("$pubrun" runs --job es-import --json | num id || true)"
  [ -n "$run_id" ] && break
  sleep 0.2
done
[ -n "$run_id" ] || fail "no run of es-import appeared"
echo "run $run_id queued; waiting for a machine"

machine_seen=""
status=""
for _ in $(seq 1 900); do
  if [ -z "$machine_seen" ]; then
    if "$pubrun" machines 2>/dev/null | grep -q "big"; then
      echo "== pubrun machines   (a machine for the run)"
      "$pubrun" machines
      machine_seen=1
    fi
  fi
  status="$("$pubrun" runs show "$run_id" --json | field status)"
  case "$status" in succeeded|failed|timed_out|cancelled) break ;; esac
  sleep 0.2
done
case "$status" in succeeded|failed|timed_out|cancelled) ;; *) fail "run $run_id did not end (status $status)" ;; esac

echo "== pubrun runs show $run_id"
"$pubrun" runs show "$run_id"
echo "== pubrun logs $run_id"
"$pubrun" logs "$run_id"

echo "== pubrun pull results-watch --ack   (the run's end, as a message)"
show_results "$pubrun" 100

echo "== waiting for the idle machine to be deleted (idle_timeout = 10s)"
gone=""
for _ in $(seq 1 600); do
  if ! "$pubrun" machines --json | grep -qE '"state": *"(provisioning|ready|busy|idle|stopping)"' \
     && [ -z "$(docker ps -aq --filter "label=pubrun.pool=big" --filter "network=$net")" ]; then
    gone=1; break
  fi
  sleep 0.5
done
[ -n "$gone" ] || fail "the machine is still up"
"$pubrun" machines

echo "== pubrun cost --machines --runs"
"$pubrun" cost --machines --runs

exit_like_run "$status" "$("$pubrun" runs show "$run_id" --json | num exit_code || true)"
