#!/usr/bin/env bash
# Makes sure a PostgreSQL server answers on 127.0.0.1:5432 with a `dynamiccl_test` database for
# the storage tests: installs Debian's postgresql and starts a cluster when none is running.
# Idempotent and quiet when all is already in place; prints the database URL for the tests
# (DYNAMICCL_TEST_POSTGRES_URL) on stdout.
set -euo pipefail

HOST=127.0.0.1
PORT=5432
DB=dynamiccl_test

ready() { pg_isready -q -h "$HOST" -p "$PORT" 2>/dev/null; }

if ! command -v pg_ctlcluster >/dev/null 2>&1; then
    echo "postgres.sh: installing PostgreSQL (Debian package)" >&2
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq >/dev/null
    apt-get install -y -qq postgresql >/dev/null
fi

if ! ready; then
    version=$(ls /etc/postgresql | sort -V | tail -n 1)
    if [ -z "$version" ]; then
        version=$(ls /usr/lib/postgresql | sort -V | tail -n 1)
        pg_createcluster "$version" main >/dev/null
    fi
    hba=/etc/postgresql/$version/main/pg_hba.conf
    if ! grep -q "dynamiccl-test" "$hba"; then
        # Trust local connections: this server only exists for the test suite on this machine.
        sed -i '1i host all all 127.0.0.1/32 trust # dynamiccl-test\nlocal all all trust # dynamiccl-test' "$hba"
    fi
    pg_ctlcluster --skip-systemctl-redirect "$version" main start
    for _ in $(seq 1 30); do ready && break; sleep 1; done
fi
ready || { echo "postgres.sh: PostgreSQL does not answer on $HOST:$PORT" >&2; exit 1; }

if ! psql -h "$HOST" -p "$PORT" -U postgres -tAc "SELECT 1 FROM pg_database WHERE datname='$DB'" | grep -q 1; then
    psql -h "$HOST" -p "$PORT" -U postgres -qc "CREATE DATABASE $DB" >/dev/null
fi

echo "postgresql+psycopg://postgres@$HOST:$PORT/$DB"
