#!/usr/bin/env bash
# Starts a private Docker registry on 127.0.0.1 for the exec tests and puts
# the test image in it behind a password, so that pulling it needs
# credentials. Prints the registry's port (the only line on stdout).
#
#   image:    127.0.0.1:<port>/pubrun/busybox:auth
#   user:     $PUBRUN_TEST_REGISTRY_USER     (default "pubrun")
#   password: $PUBRUN_TEST_REGISTRY_PASSWORD (default "pubrun-test-secret")
#
# Debian's `docker-registry` (distribution 2.8) with htpasswd auth over plain
# HTTP: the Docker engine treats registries on 127.0.0.0/8 as insecure, so no
# TLS is needed. Installs docker-registry, apache2-utils (htpasswd) and curl
# with apt-get when missing. Builds the test image first
# (scripts/docker-test-image.sh).
#
# Idempotent: when the registry started by an earlier call still runs and
# holds the image, it only prints the port. State lives in
# $PUBRUN_TEST_REGISTRY_DIR (default /tmp/pubrun-test-registry); the
# registry keeps running in the background after the script returns.
set -euo pipefail

here="$(cd "$(dirname "$0")" && pwd)"
dir="${PUBRUN_TEST_REGISTRY_DIR:-${TMPDIR:-/tmp}/pubrun-test-registry}"
user="${PUBRUN_TEST_REGISTRY_USER:-pubrun}"
password="${PUBRUN_TEST_REGISTRY_PASSWORD:-pubrun-test-secret}"
repo="pubrun/busybox"
tag="auth"

log() { echo "docker-registry.sh: $*" >&2; }

mkdir -p "$dir"
exec 9>"$dir/lock"
flock 9

# The image is ready when the running registry serves its manifest to us.
ready() {
  local port="$1"
  curl -sf -o /dev/null -u "$user:$password" \
    -H 'Accept: application/vnd.docker.distribution.manifest.v2+json' \
    "http://127.0.0.1:$port/v2/$repo/manifests/$tag"
}

# Whether the pid file names a live registry process (not a reused pid).
ours() {
  [ -f "$dir/pid" ] && grep -qa docker-registry "/proc/$(cat "$dir/pid")/cmdline" 2>/dev/null
}

if [ -f "$dir/port" ] && ours; then
  port="$(cat "$dir/port")"
  if ready "$port"; then
    echo "$port"
    exit 0
  fi
  log "registry on port $port does not serve the image; restarting it"
  kill "$(cat "$dir/pid")" 2>/dev/null || true
fi

missing=()
command -v docker-registry >/dev/null || missing+=(docker-registry)
command -v htpasswd >/dev/null || missing+=(apache2-utils)
command -v curl >/dev/null || missing+=(curl)
if [ ${#missing[@]} -gt 0 ]; then
  log "installing ${missing[*]}"
  export DEBIAN_FRONTEND=noninteractive
  if ! apt-get install -y -qq "${missing[@]}" >&2; then
    apt-get update -qq >&2
    apt-get install -y -qq "${missing[@]}" >&2
  fi
fi

bash "$here/docker-test-image.sh" >&2

port="$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')"
mkdir -p "$dir/data"
htpasswd -Bbn "$user" "$password" > "$dir/htpasswd"
cat > "$dir/config.yml" <<EOF
version: 0.1
log:
  level: warn
storage:
  filesystem:
    rootdirectory: $dir/data
  delete:
    enabled: true
http:
  addr: 127.0.0.1:$port
auth:
  htpasswd:
    realm: pubrun-test
    path: $dir/htpasswd
EOF

# fd 9 holds the lock: the long-lived registry must not inherit it.
setsid docker-registry serve "$dir/config.yml" >"$dir/registry.log" 2>&1 </dev/null 9>&- &
echo $! > "$dir/pid"
echo "$port" > "$dir/port"

for _ in $(seq 1 100); do
  code="$(curl -s -o /dev/null -w '%{http_code}' "http://127.0.0.1:$port/v2/" || true)"
  [ "$code" = 401 ] && break
  ours || { cat "$dir/registry.log" >&2; log "registry died"; exit 1; }
  sleep 0.1
done
[ "$code" = 401 ] || { cat "$dir/registry.log" >&2; log "registry did not answer on port $port"; exit 1; }

# Push with a throw-away client config so ~/.docker/config.json is untouched,
# then forget the credentials and the local tag: a pull must authenticate.
ref="127.0.0.1:$port/$repo:$tag"
export DOCKER_CONFIG="$dir/docker-config"
mkdir -p "$DOCKER_CONFIG"
docker tag pubrun-test/busybox:latest "$ref"
echo "$password" | docker login -u "$user" --password-stdin "127.0.0.1:$port" >&2
docker push "$ref" >&2
docker logout "127.0.0.1:$port" >&2
docker image rm "$ref" >/dev/null
ready "$port" || { log "pushed image is not served"; exit 1; }
log "registry on 127.0.0.1:$port serves $ref (user $user)"
echo "$port"
