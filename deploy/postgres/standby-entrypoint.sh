#!/bin/sh
# Worker-local hot standby of the master's PostgreSQL (worker-compose.yml, profile
# `replicas`). Workers read job specs here once it has replayed past the LSN a
# message carries; claims and writes always go to the master (DESIGN.md, decision 6).
#
# First start: clone the master with `pg_basebackup -R`, which writes standby.signal
# and primary_conninfo, through a physical replication slot named after this node,
# so the master keeps the WAL this standby still needs (bounded on the master by
# max_slot_wal_keep_size). Later starts resume streaming from where they stopped.
set -eu
: "${MASTER_HOST_IP:?}" "${REPLICATION_USER:?}" "${REPLICATION_PASSWORD:?}"
PGDATA="${PGDATA:-/var/lib/postgresql/data/pgdata}"
export PGPASSWORD="$REPLICATION_PASSWORD"  # also read by the WAL receiver's libpq

node="${STANDBY_NODE_NAME:-}"
[ -n "$node" ] || node="$(hostname)"
slot="nexus_$(printf '%s' "$node" | tr 'A-Z' 'a-z' | tr -c 'a-z0-9_' '_' | cut -c1-50)"

clone() {  # $1: extra pg_basebackup flags
    rm -rf "$PGDATA"  # pg_basebackup needs an empty target; drops a half-finished clone
    # shellcheck disable=SC2086
    pg_basebackup -h "$MASTER_HOST_IP" -p 5432 -U "$REPLICATION_USER" -D "$PGDATA" \
        -R -X stream -S "$slot" $1 --progress
}

if [ ! -s "$PGDATA/PG_VERSION" ]; then
    until pg_isready -h "$MASTER_HOST_IP" -p 5432 -q; do
        echo "standby: waiting for the master at $MASTER_HOST_IP:5432"
        sleep 2
    done
    echo "standby: cloning $MASTER_HOST_IP:5432 through slot $slot"
    # --create-slot fails when the slot survives from an earlier clone of this node:
    # then reuse it.
    clone --create-slot || clone ""
    chmod 0700 "$PGDATA"
fi

exec postgres -D "$PGDATA" \
    -c listen_addresses='*' \
    -c hot_standby=on \
    -c hot_standby_feedback=on \
    -c max_standby_streaming_delay=5s
