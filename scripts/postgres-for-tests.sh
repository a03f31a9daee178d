#!/usr/bin/env bash
# Start a throw-away PostgreSQL cluster on 127.0.0.1 for the server tests and print its URL.
#
# Installs PostgreSQL from the system packages if it is missing (Debian, as root),
# creates a cluster in $TENSAFE_PG_DIR (default /tmp/tensafe-pg) listening only on
# loopback port $TENSAFE_PG_PORT (default 54329), and a user and database for the
# tests. Running it again reuses the running cluster. Progress goes to stderr; the
# only line on stdout is the URL, e.g.
#   export TENSAFE_TEST_POSTGRES_URL=$(scripts/postgres-for-tests.sh)
set -euo pipefail

PORT="${TENSAFE_PG_PORT:-54329}"
DIR="${TENSAFE_PG_DIR:-/tmp/tensafe-pg}"
USER_NAME=tensafe
DB_NAME=tensafe_test

find_bin() { ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V | tail -n 1; }

BIN="$(find_bin)"
if [ -z "$BIN" ] || [ ! -x "$BIN/initdb" ]; then
    if [ "$(id -u)" != 0 ] || ! command -v apt-get >/dev/null; then
        echo "PostgreSQL is not installed and this is not a Debian machine with root: install it yourself" >&2
        exit 1
    fi
    echo "installing PostgreSQL from the system packages" >&2
    export DEBIAN_FRONTEND=noninteractive
    apt-get install -y -q postgresql >&2 || { apt-get update -q >&2 && apt-get install -y -q postgresql >&2; }
    BIN="$(find_bin)"
fi

# PostgreSQL refuses to run as root: run it as the postgres system user then.
if [ "$(id -u)" = 0 ]; then
    id postgres >/dev/null 2>&1 || useradd --system --home-dir /var/lib/postgresql postgres
    AS=(runuser -u postgres --)
else
    AS=()
fi

if [ ! -f "$DIR/PG_VERSION" ]; then
    mkdir -p "$DIR"
    [ "$(id -u)" = 0 ] && chown postgres "$DIR"
    chmod 700 "$DIR"
    "${AS[@]}" "$BIN/initdb" -D "$DIR" -U postgres -A trust --no-sync >&2
fi
if ! "${AS[@]}" "$BIN/pg_ctl" -D "$DIR" status >/dev/null 2>&1; then
    "${AS[@]}" "$BIN/pg_ctl" -D "$DIR" -l "$DIR/server.log" -w \
        -o "-c listen_addresses=127.0.0.1 -p $PORT -k $DIR" start >&2
fi

PSQL=("$BIN/psql" -h 127.0.0.1 -p "$PORT" -U postgres -v ON_ERROR_STOP=1 -tAq)
if [ -z "$("${PSQL[@]}" -c "SELECT 1 FROM pg_roles WHERE rolname = '$USER_NAME'")" ]; then
    "${PSQL[@]}" -c "CREATE ROLE $USER_NAME LOGIN PASSWORD '$USER_NAME'" >&2
fi
if [ -z "$("${PSQL[@]}" -c "SELECT 1 FROM pg_database WHERE datname = '$DB_NAME'")" ]; then
    "${PSQL[@]}" -c "CREATE DATABASE $DB_NAME OWNER $USER_NAME" >&2
fi
echo "postgresql://$USER_NAME:$USER_NAME@127.0.0.1:$PORT/$DB_NAME"
