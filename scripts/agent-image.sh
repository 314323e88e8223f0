#!/usr/bin/env bash
# Builds the image docker pools start machines from: `pubrun-agent:dev` by
# default. No registry involved: a root filesystem is put together here and
# loaded with `docker import`. It holds
#   /usr/local/bin/pubrun        the given binary,
#   the shared libraries it links (ldd) and the dynamic loader,
#   /bin/busybox + applet links  Debian's busybox-static, so process jobs like
#                                `sh -c "echo hi; sleep 5"` run inside,
#   /tmp, /workspace, /etc/passwd.
# No CMD: the provider passes `pubrun agent …` as the command.
#
# Usage: scripts/agent-image.sh [PUBRUN_BINARY] [IMAGE]
#   PUBRUN_BINARY  default $PUBRUN_BIN, else ${CARGO_TARGET_DIR:-target}/debug/pubrun
#   IMAGE          default $PUBRUN_AGENT_IMAGE, else pubrun-agent:dev
#
# Idempotent and quick when nothing changed: the image is also tagged with a
# hash of the binary and of this script, and an existing tag is reused.
# Safe to run from several test processes at once (flock). Prints the image
# name as its last line. Needs: docker, ldd, sha256sum, apt-get, dpkg-deb.
set -euo pipefail

root="$(cd "$(dirname "$0")/.." && pwd)"
. "$root/scripts/rootfs.sh"
target="$(cargo_target "$root")"
BIN="${1:-${PUBRUN_BIN:-$target/debug/pubrun}}"
IMAGE="${2:-${PUBRUN_AGENT_IMAGE:-pubrun-agent:dev}}"

[ -x "$BIN" ] || { echo "agent-image.sh: no executable pubrun at $BIN (cargo build -p pubrun-cli first)" >&2; exit 1; }

# Repository part of IMAGE (a registry port's colon is not a tag).
last="${IMAGE##*/}"
if [[ "$last" == *:* ]]; then repo="${IMAGE%:*}"; else repo="$IMAGE"; fi
hash="$( (sha256sum < "$BIN"; sha256sum < "$0"; sha256sum < "$root/scripts/rootfs.sh") | sha256sum | cut -c1-20)"
HASHED="$repo:bin-$hash"

reuse() {
  if docker image inspect "$HASHED" >/dev/null 2>&1; then
    docker tag "$HASHED" "$IMAGE"
    echo "$IMAGE"
    exit 0
  fi
}
reuse

exec 9>"${TMPDIR:-/tmp}/pubrun-agent-image.lock"
flock 9
reuse

work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
rootfs="$work/rootfs"
mkdir -p "$rootfs"/{bin,etc,tmp,proc,sys,dev,root,workspace,usr/local/bin}
chmod 1777 "$rootfs/tmp"

rootfs_busybox "$rootfs" "$work"
for needed in sh echo sleep cat env ls true false kill; do
  [ -L "$rootfs/bin/$needed" ] || { echo "busybox lacks the applet $needed" >&2; exit 1; }
done
rootfs_pubrun "$rootfs" "$BIN" "$work"
rootfs_etc "$rootfs"

tar --numeric-owner --owner=0 --group=0 -C "$rootfs" -cf "$work/rootfs.tar" .
docker import \
  --change 'ENV PATH=/usr/local/bin:/bin' \
  --change 'WORKDIR /workspace' \
  "$work/rootfs.tar" "$HASHED" >/dev/null
docker tag "$HASHED" "$IMAGE"
# Drop the images of older binaries (each is as big as the binary). One still
# used by a container stays: rmi without -f refuses it.
for old in $(docker image ls --format '{{.Repository}}:{{.Tag}}' "$repo" | grep -F "$repo:bin-" || true); do
  [ "$old" = "$HASHED" ] || docker rmi "$old" >/dev/null 2>&1 || true
done
echo "built $HASHED" >&2
echo "$IMAGE"
