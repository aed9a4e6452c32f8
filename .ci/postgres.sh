#!/usr/bin/env bash
# Start a throwaway PostgreSQL server on 127.0.0.1 for the trade-store tests, installing
# Debian's package first when the machine lacks it. Prints the SQLAlchemy URL on stdout.
set -euo pipefail
PORT="${KESTREL_PG_PORT:-54329}"
if ! ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1; then
  (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq postgresql) >&2
fi
BIN=$(dirname "$(ls /usr/lib/postgresql/*/bin/initdb | sort -V | tail -n 1)")
URL="postgresql+psycopg://kestrel@127.0.0.1:$PORT/kestrel_test"
# A server already running on the port (a second run on this machine) is reused.
if "$BIN/pg_isready" -q -h 127.0.0.1 -p "$PORT"; then echo "$URL"; exit 0; fi
DIR=$(mktemp -d /tmp/kestrel-pg.XXXXXX)
chown postgres:postgres "$DIR" 2>/dev/null || true
as_pg() { if [ "$(id -u)" = 0 ]; then su postgres -s /bin/bash -c "$*"; else bash -c "$*"; fi; }
as_pg "'$BIN/initdb' -D '$DIR/data' -U kestrel --auth=trust -E UTF8" >&2
as_pg "'$BIN/pg_ctl' -D '$DIR/data' -l '$DIR/log' -w -o \"-h 127.0.0.1 -p $PORT -k '$DIR'\" start" >&2
as_pg "'$BIN/createdb' -h 127.0.0.1 -p $PORT -U kestrel kestrel_test" >&2
echo "$URL"
