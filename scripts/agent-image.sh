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
target="${CARGO_TARGET_DIR:-$root/target}"
case "$target" in /*) ;; *) target="$root/$target" ;; esac
BIN="${1:-${PUBRUN_BIN:-$target/debug/pubrun}}"
IMAGE="${2:-${PUBRUN_AGENT_IMAGE:-pubrun-agent:dev}}"

[ -x "$BIN" ] || { echo "agent-image.sh: no executable pubrun at $BIN (cargo build -p pubrun-cli first)" >&2; exit 1; }

# Repository part of IMAGE (a registry port's colon is not a tag).
last="${IMAGE##*/}"
if [[ "$last" == *:* ]]; then repo="${IMAGE%:*}"; else repo="$IMAGE"; fi
hash="$( (sha256sum < "$BIN"; sha256sum < "$0") | sha256sum | cut -c1-20)"
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

# busybox-static: cached outside the image so a new binary does not mean a
# new download. Same source as scripts/docker-test-image.sh.
cache="${PUBRUN_CACHE_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/pubrun}"
bb="$cache/busybox-static"
if [ ! -x "$bb" ]; then
  mkdir -p "$cache" "$work/deb"
  (
    cd "$work/deb"
    # `apt-get download` needs package lists; fetch them only when it fails.
    if ! apt-get download -qq busybox-static >/dev/null 2>&1; then
      apt-get update -qq
      apt-get download -qq busybox-static
    fi
    dpkg-deb -x busybox-static_*.deb pkg
  )
  [ -x "$work/deb/pkg/bin/busybox" ] || { echo "busybox-static did not contain /bin/busybox" >&2; exit 1; }
  cp "$work/deb/pkg/bin/busybox" "$bb.tmp.$$"
  mv "$bb.tmp.$$" "$bb"
fi
cp "$bb" "$rootfs/bin/busybox"
for applet in $("$bb" --list); do
  [ "$applet" = busybox ] || ln -sf busybox "$rootfs/bin/$applet"
done
for needed in sh echo sleep cat env ls true false kill; do
  [ -L "$rootfs/bin/$needed" ] || { echo "busybox lacks the applet $needed" >&2; exit 1; }
done

cp "$BIN" "$rootfs/usr/local/bin/pubrun"
chmod 755 "$rootfs/usr/local/bin/pubrun"

# Every library ldd resolves, at the same path (the loader included: its
# path is baked into the binary). `cp -L` copies the files symlinks name.
if ldd "$BIN" >"$work/ldd" 2>&1; then
  libs="$(grep -o '/[^ ]*' "$work/ldd" || true)"
  # glibc loads these at run time for name lookups; ldd does not list them.
  for extra in /lib/x86_64-linux-gnu/libnss_dns.so.2 /lib/x86_64-linux-gnu/libnss_files.so.2 \
               /lib/x86_64-linux-gnu/libresolv.so.2; do
    [ -e "$extra" ] && libs="$libs $extra"
  done
  for lib in $libs; do
    mkdir -p "$rootfs$(dirname "$lib")"
    cp -L "$lib" "$rootfs$lib"
  done
elif ! grep -qiE 'not a dynamic executable|statically linked' "$work/ldd"; then
  echo "ldd $BIN failed:" >&2; cat "$work/ldd" >&2; exit 1
fi

printf 'root:x:0:0:root:/root:/bin/sh\nnobody:x:65534:65534:nobody:/nonexistent:/bin/false\n' > "$rootfs/etc/passwd"
printf 'root:x:0:\nnogroup:x:65534:\n' > "$rootfs/etc/group"
printf 'hosts: files dns\n' > "$rootfs/etc/nsswitch.conf"

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
