#!/usr/bin/env bash
# Start a throwaway PostgreSQL server on 127.0.0.1 for the trade-store tests. Prints the
# SQLAlchemy URL on stdout (everything else goes to stderr).
#
# Any user can run it: the server runs as the calling user (as `postgres` when called as
# root, since PostgreSQL refuses to run as root) from a fresh directory under $TMPDIR, with
# its socket there too, so it needs no write access outside it. Debian's package is
# installed only when no server binaries are found: with apt-get as root, or with
# `sudo -n` when the user may use it without a password; otherwise it says what to install.
set -euo pipefail
PORT="${KESTREL_PG_PORT:-54329}"

find_bin() {
  local initdb
  initdb=$(ls /usr/lib/postgresql/*/bin/initdb 2>/dev/null | sort -V | tail -n 1 || true)
  if [ -z "$initdb" ] && command -v initdb >/dev/null 2>&1; then  # Homebrew, conda, RPMs
    initdb=$(readlink -f "$(command -v initdb)")  # a symlink: its siblings are the tools
  fi
  if [ -z "$initdb" ] && command -v pg_config >/dev/null 2>&1; then
    initdb="$(pg_config --bindir)/initdb"
  fi
  if [ -n "$initdb" ] && [ -x "$initdb" ]; then dirname "$initdb"; fi
}

BIN=$(find_bin)
if [ -z "$BIN" ]; then
  if [ "$(id -u)" = 0 ]; then
    SUDO=""
  elif command -v sudo >/dev/null 2>&1 && sudo -n true 2>/dev/null; then
    SUDO="sudo -n"
  else
    echo "postgres.sh: no PostgreSQL server found and not root: install Debian's" \
      "'postgresql' package (or put initdb and pg_ctl on PATH) and run this again" >&2
    exit 1
  fi
  echo "postgres.sh: installing postgresql" >&2
  ($SUDO apt-get update -qq \
    && DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq postgresql) >&2
  BIN=$(find_bin)
fi

URL="postgresql+psycopg://kestrel@127.0.0.1:$PORT/kestrel_test"
# A server already running on the port (a second run on this machine) is reused.
if "$BIN/pg_isready" -q -h 127.0.0.1 -p "$PORT"; then echo "$URL"; exit 0; fi

if [ "$(id -u)" = 0 ]; then
  # postgres must be able to reach the directory root hands it: /tmp, not root's $TMPDIR.
  DIR=$(mktemp -d /tmp/kestrel-pg.XXXXXX)
  chown postgres:postgres "$DIR"
  as_pg() { su postgres -s /bin/bash -c "$*"; }
else
  DIR=$(mktemp -d "${TMPDIR:-/tmp}/kestrel-pg.XXXXXX")
  as_pg() { bash -c "$*"; }
fi
as_pg "'$BIN/initdb' -D '$DIR/data' -U kestrel --auth=trust -E UTF8" >&2
as_pg "'$BIN/pg_ctl' -D '$DIR/data' -l '$DIR/log' -w -o \"-h 127.0.0.1 -p $PORT -k '$DIR'\" start" >&2
as_pg "'$BIN/createdb' -h 127.0.0.1 -p $PORT -U kestrel kestrel_test" >&2
echo "postgres.sh: stop it with: $BIN/pg_ctl -D $DIR/data stop" >&2
echo "$URL"
