#!/usr/bin/env bash
# Installs pubrun as a system service: the binary, the systemd units, an
# example manifest, a fresh token, shell completions and man pages.
#
# Usage: sudo examples/systemd/install.sh [PUBRUN_BINARY]
#   PUBRUN_BINARY  default: target/release/pubrun of this checkout
# Environment (all optional; for packaging and tests):
#   DESTDIR     staging root prepended to every path (default: none)
#   PREFIX      where bin/ and share/ go (default /usr/local)
#   SYSCONFDIR  where pubrun/ config goes (default /etc)
#   UNITDIR     where the units go (default /etc/systemd/system)
# Existing config (manifest, tokens, env files) is never overwritten.
# Afterwards: systemctl enable --now pubrun  (and pubrun-agent on agents).
set -euo pipefail

here="$(cd "$(dirname "$0")" && pwd)"
root="$(cd "$here/../.." && pwd)"
BIN="${1:-${CARGO_TARGET_DIR:-$root/target}/release/pubrun}"
DESTDIR="${DESTDIR:-}"
PREFIX="${PREFIX:-/usr/local}"
SYSCONFDIR="${SYSCONFDIR:-/etc}"
UNITDIR="${UNITDIR:-/etc/systemd/system}"
[ -x "$BIN" ] || { echo "install.sh: no pubrun binary at $BIN (cargo build --release -p pubrun)" >&2; exit 1; }

bindir="$DESTDIR$PREFIX/bin"
confdir="$DESTDIR$SYSCONFDIR/pubrun"
install -d "$bindir" "$DESTDIR$UNITDIR" "$DESTDIR$PREFIX/share/man/man1" \
  "$DESTDIR$PREFIX/share/bash-completion/completions" \
  "$DESTDIR$PREFIX/share/zsh/site-functions" \
  "$DESTDIR$PREFIX/share/fish/vendor_completions.d"
install -d -m 0750 "$confdir"
install -m 0755 "$BIN" "$bindir/pubrun"

# Units: ExecStart points at the installed binary; config paths at SYSCONFDIR
# (%E is /etc for system units; rewritten only when SYSCONFDIR differs).
for unit in pubrun.service pubrun-agent.service; do
  sed -e "s|@PREFIX@|$PREFIX|g" \
      -e "$( [ "$SYSCONFDIR" = /etc ] && echo 's|x|x|' || echo "s|%E/pubrun|$SYSCONFDIR/pubrun|g")" \
      "$here/$unit" > "$DESTDIR$UNITDIR/$unit.tmp"
  chmod 0644 "$DESTDIR$UNITDIR/$unit.tmp"
  mv "$DESTDIR$UNITDIR/$unit.tmp" "$DESTDIR$UNITDIR/$unit"
done

keep() { # keep SRC DST MODE: install unless DST exists
  [ -e "$2" ] || install -m "$3" "$1" "$2"
}
keep "$here/pubrun.toml" "$confdir/pubrun.toml" 0640
keep "$here/agent.env" "$confdir/agent.env" 0640
# A random token for the server; clients use the same value (PUBRUN_TOKEN).
if [ ! -e "$confdir/token" ]; then
  (umask 077; od -An -tx1 -N32 /dev/urandom | tr -d ' \n' > "$confdir/token")
fi
[ -e "$confdir/agent-token" ] || (umask 077; : > "$confdir/agent-token")

"$bindir/pubrun" completions bash > "$DESTDIR$PREFIX/share/bash-completion/completions/pubrun"
"$bindir/pubrun" completions zsh > "$DESTDIR$PREFIX/share/zsh/site-functions/_pubrun"
"$bindir/pubrun" completions fish > "$DESTDIR$PREFIX/share/fish/vendor_completions.d/pubrun.fish"
"$bindir/pubrun" man --dir "$DESTDIR$PREFIX/share/man/man1"

echo "installed $("$bindir/pubrun" --version) to $bindir/pubrun"
if [ -z "$DESTDIR" ] && [ "$UNITDIR" = /etc/systemd/system ] && command -v systemctl >/dev/null \
   && [ -d /run/systemd/system ]; then
  systemctl daemon-reload
  echo "next: systemctl enable --now pubrun   (token: $confdir/token)"
  echo "      agents: put the pool token in $confdir/agent-token, edit $confdir/agent.env,"
  echo "      then systemctl enable --now pubrun-agent"
fi
