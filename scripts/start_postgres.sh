#!/usr/bin/env bash
# Start a local PostgreSQL for the results-database tests / shared use, without systemd.
# Idempotent: a server already answering on the port is reused.  Installs Debian's
# `postgresql` package if no server binaries are found (needs root).  Prints the URL
# (last line of stdout), e.g. postgresql://postgres@127.0.0.1:55432/tcae
#
# Env: TCAE_PG_PORT (55432), TCAE_PG_DIR (/tmp/tcae-postgres), TCAE_PG_DB (tcae).
# The cluster trades durability for speed (fsync=off): it is a test / scratch server.
set -euo pipefail
PORT=${TCAE_PG_PORT:-55432}
DIR=${TCAE_PG_DIR:-/tmp/tcae-postgres}
DB=${TCAE_PG_DB:-tcae}
URL="postgresql://postgres@127.0.0.1:${PORT}/${DB}"

find_bindir() {
    if command -v pg_config >/dev/null 2>&1 && [ -x "$(pg_config --bindir)/pg_ctl" ]; then
        pg_config --bindir; return
    fi
    ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V | tail -n 1
}

BIN=$(find_bindir || true)
if [ -z "$BIN" ] || [ ! -x "$BIN/pg_ctl" ]; then
    if [ "$(id -u)" != 0 ]; then
        echo "start_postgres: no PostgreSQL server binaries and not root (cannot apt-get install postgresql)" >&2
        exit 1
    fi
    echo "start_postgres: installing postgresql" >&2
    export DEBIAN_FRONTEND=noninteractive
    apt-get install -y -q postgresql >&2 || { apt-get update -q >&2 && apt-get install -y -q postgresql >&2; }
    BIN=$(find_bindir)
fi

# postgres refuses to run as root: run the server as the `postgres` user then.
if [ "$(id -u)" = 0 ]; then
    id postgres >/dev/null 2>&1 || useradd --system --home-dir "$DIR" postgres
    AS=(runuser -u postgres --)
else
    AS=()
fi

mkdir -p "$DIR"
[ "$(id -u)" = 0 ] && chown postgres "$DIR"
exec 9>"$DIR/.start.lock"
flock -w 120 9  # concurrent callers (parallel test sessions) start one server

if ! "$BIN/pg_isready" -q -h 127.0.0.1 -p "$PORT"; then
    if [ ! -f "$DIR/data/PG_VERSION" ]; then
        "${AS[@]}" "$BIN/initdb" -D "$DIR/data" -U postgres --auth=trust -E UTF8 >"$DIR/initdb.log" 2>&1 \
            || { cat "$DIR/initdb.log" >&2; exit 1; }
    fi
    # 9>&-: the server must not inherit (and hold forever) the start lock.
    "${AS[@]}" "$BIN/pg_ctl" -D "$DIR/data" -l "$DIR/server.log" -w -t 60 start 9>&- \
        -o "-p $PORT -k $DIR -c listen_addresses=127.0.0.1 -c max_connections=300 -c fsync=off -c synchronous_commit=off -c full_page_writes=off" >&2 \
        || { tail -n 20 "$DIR/server.log" >&2; exit 1; }
fi
if ! "$BIN/psql" -h 127.0.0.1 -p "$PORT" -U postgres -d postgres -tAc "SELECT 1 FROM pg_database WHERE datname='$DB'" | grep -q 1; then
    "$BIN/createdb" -h 127.0.0.1 -p "$PORT" -U postgres "$DB"
fi
echo "$URL"
