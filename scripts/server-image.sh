#!/usr/bin/env bash
# Builds the pubrun server image, `pubrun-server:dev` by default, from a
# local binary and without any registry: a root filesystem is put together
# here and `docker build` turns it into an image `FROM scratch`. It is
# configured like the Dockerfile at the repository's root (non-root user
# 10001, /data volume, port 8085, HEALTHCHECK with `pubrun healthcheck`,
# entry point pubrun, command serve) and holds
#   /usr/local/bin/pubrun        the given binary,
#   the shared libraries it links (ldd) and the dynamic loader,
#   /bin/busybox + applet links  Debian's busybox-static, for process jobs
#                                and `docker exec … sh`,
#   /etc/ssl/certs/ca-certificates.crt  when this machine has it.
#
# Usage: scripts/server-image.sh [PUBRUN_BINARY] [IMAGE]
#   PUBRUN_BINARY  default $PUBRUN_BIN, else ${CARGO_TARGET_DIR:-target}/release/pubrun,
#                  else …/debug/pubrun
#   IMAGE          default $PUBRUN_SERVER_IMAGE, else pubrun-server:dev
# Run:  docker run -d -p 8085:8085 -v pubrun-data:/data IMAGE serve --token T
# Prints the image name as its last line. Safe to run concurrently (flock).
# Needs: docker, ldd, apt-get, dpkg-deb.
set -euo pipefail

root="$(cd "$(dirname "$0")/.." && pwd)"
. "$root/scripts/rootfs.sh"
target="$(cargo_target "$root")"
default_bin="$target/release/pubrun"
[ -x "$default_bin" ] || default_bin="$target/debug/pubrun"
BIN="${1:-${PUBRUN_BIN:-$default_bin}}"
IMAGE="${2:-${PUBRUN_SERVER_IMAGE:-pubrun-server:dev}}"
[ -x "$BIN" ] || { echo "server-image.sh: no executable pubrun at $BIN (cargo build -p pubrun first)" >&2; exit 1; }

exec 9>"${TMPDIR:-/tmp}/pubrun-server-image.lock"
flock 9

work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
rootfs="$work/rootfs"
mkdir -p "$rootfs"/{bin,etc/ssl/certs,tmp,proc,sys,dev,data,usr/local/bin}
chmod 1777 "$rootfs/tmp"

rootfs_busybox "$rootfs" "$work"
rootfs_pubrun "$rootfs" "$BIN" "$work"
[ -r /etc/ssl/certs/ca-certificates.crt ] && cp /etc/ssl/certs/ca-certificates.crt "$rootfs/etc/ssl/certs/"

rootfs_etc "$rootfs" pubrun 10001 /data

# The Dockerfile's runtime stage, FROM scratch (no base image to pull): its
# configuration is taken from the root Dockerfile, from `USER` on, so the
# two images cannot drift apart. scratch has no PATH of its own.
{
  printf 'FROM scratch\nADD rootfs.tar /\nENV PATH=/usr/local/bin:/bin\n'
  sed -n '/^USER /,$p' "$root/Dockerfile"
} > "$work/Dockerfile"
grep -q '^CMD \["serve"\]' "$work/Dockerfile" || { echo "server-image.sh: no runtime stage in $root/Dockerfile" >&2; exit 1; }
# ADD extracts the tar with its owners: root everywhere, but /data belongs
# to the image's user (a new volume mounted there takes its owner from it).
chmod 750 "$rootfs/data"
tar --numeric-owner --owner=0 --group=0 -C "$rootfs" -cf "$work/rootfs.tar" --exclude=./data .
tar --numeric-owner --owner=10001 --group=10001 -C "$rootfs" -rf "$work/rootfs.tar" ./data
rm -rf "$rootfs"
DOCKER_BUILDKIT=0 docker build -q -t "$IMAGE" "$work" >/dev/null
echo "built $IMAGE" >&2
echo "$IMAGE"
