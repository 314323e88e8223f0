#!/usr/bin/env bash
# Builds the Docker image the exec tests run, `pubrun-test/busybox:latest`,
# without any registry: Debian's statically linked busybox in an otherwise
# empty root filesystem, imported with `docker import`.
#
# Idempotent: does nothing when the image is already present. Safe to call
# from several test processes at once (serialised with flock).
# Needs: docker (the engine answering), apt-get, dpkg-deb.
set -euo pipefail

IMAGE="${PUBRUN_TEST_IMAGE:-pubrun-test/busybox:latest}"

if docker image inspect "$IMAGE" >/dev/null 2>&1; then
  echo "$IMAGE is present"
  exit 0
fi

exec 9>"${TMPDIR:-/tmp}/pubrun-docker-test-image.lock"
flock 9
if docker image inspect "$IMAGE" >/dev/null 2>&1; then
  echo "$IMAGE is present"
  exit 0
fi

work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
cd "$work"

# `apt-get download` needs package lists; fetch them only when it fails.
if ! apt-get download -qq busybox-static >/dev/null 2>&1; then
  apt-get update -qq
  apt-get download -qq busybox-static
fi
dpkg-deb -x busybox-static_*.deb pkg
bb="pkg/bin/busybox"
[ -x "$bb" ] || { echo "busybox-static did not contain /bin/busybox" >&2; exit 1; }

mkdir -p rootfs/bin rootfs/etc rootfs/tmp rootfs/proc rootfs/sys rootfs/dev rootfs/workspace rootfs/root
chmod 1777 rootfs/tmp
cp "$bb" rootfs/bin/busybox
# One symlink per applet: sh (ash, with trap), echo, sleep, cat, env, ls,
# true, false, kill, head, tail, dd, … whatever this busybox build offers.
for applet in $("$bb" --list); do
  [ "$applet" = busybox ] || ln -sf busybox "rootfs/bin/$applet"
done
for needed in sh echo sleep cat env ls true false kill head tail dd; do
  [ -L "rootfs/bin/$needed" ] || { echo "busybox lacks the applet $needed" >&2; exit 1; }
done
printf 'root:x:0:0:root:/root:/bin/sh\nnobody:x:65534:65534:nobody:/nonexistent:/bin/false\n' > rootfs/etc/passwd
printf 'root:x:0:\nnogroup:x:65534:\n' > rootfs/etc/group

tar --numeric-owner --owner=0 --group=0 -C rootfs -cf rootfs.tar .
docker import \
  --change 'CMD ["/bin/sh"]' \
  --change 'ENV PATH=/bin' \
  rootfs.tar "$IMAGE" >/dev/null
echo "built $IMAGE"
