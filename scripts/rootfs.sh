# Sourced by scripts/agent-image.sh and scripts/server-image.sh: the parts of
# a registry-free root filesystem both images share. Not run on its own.
# Needs: ldd, apt-get, dpkg-deb.

# rootfs_busybox ROOTFS WORK: Debian's busybox-static as /bin/busybox with a
# link per applet. The package is cached outside the image (a new binary
# does not mean a new download); WORK is a scratch directory.
rootfs_busybox() {
  local rootfs="$1" work="$2"
  local cache="${PUBRUN_CACHE_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/pubrun}"
  local bb="$cache/busybox-static"
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
    [ -x "$work/deb/pkg/bin/busybox" ] || { echo "busybox-static did not contain /bin/busybox" >&2; return 1; }
    # Copy then rename: a concurrent reader never sees half a file.
    cp "$work/deb/pkg/bin/busybox" "$bb.tmp.$$"
    mv "$bb.tmp.$$" "$bb"
  fi
  cp "$bb" "$rootfs/bin/busybox"
  local applet
  for applet in $("$bb" --list); do
    [ "$applet" = busybox ] || ln -sf busybox "$rootfs/bin/$applet"
  done
}

# rootfs_pubrun ROOTFS BIN WORK: BIN as /usr/local/bin/pubrun plus every
# library ldd resolves, at the same path (the loader included: its path is
# baked into the binary). `cp -L` copies the files symlinks name.
rootfs_pubrun() {
  local rootfs="$1" bin="$2" work="$3"
  cp "$bin" "$rootfs/usr/local/bin/pubrun"
  chmod 755 "$rootfs/usr/local/bin/pubrun"
  if ldd "$bin" >"$work/ldd" 2>&1; then
    local libs extra lib
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
    echo "ldd $bin failed:" >&2; cat "$work/ldd" >&2; return 1
  fi
}

# cargo_target ROOT: the cargo target directory ($CARGO_TARGET_DIR, else
# ROOT/target) as an absolute path.
cargo_target() {
  local target="${CARGO_TARGET_DIR:-$1/target}"
  case "$target" in /*) ;; *) target="$1/$target" ;; esac
  echo "$target"
}

# rootfs_etc ROOTFS [USER UID HOME]: /etc/passwd and /etc/group with root,
# nobody and, when given, one more login-less user (its group has its uid);
# nsswitch.conf resolving names from files, then DNS.
rootfs_etc() {
  local rootfs="$1" user="${2:-}" uid="${3:-}" home="${4:-}"
  {
    echo 'root:x:0:0:root:/root:/bin/sh'
    [ -z "$user" ] || echo "$user:x:$uid:$uid:$user:$home:/bin/false"
    echo 'nobody:x:65534:65534:nobody:/nonexistent:/bin/false'
  } > "$rootfs/etc/passwd"
  {
    echo 'root:x:0:'
    [ -z "$user" ] || echo "$user:x:$uid:"
    echo 'nogroup:x:65534:'
  } > "$rootfs/etc/group"
  printf 'hosts: files dns\n' > "$rootfs/etc/nsswitch.conf"
}
