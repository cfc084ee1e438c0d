#!/bin/sh
# Master PostgreSQL, first start only (docker-entrypoint-initdb.d): create the role
# that worker standbys use for pg_basebackup and WAL streaming, and accept
# replication connections from the cluster subnet only.
# The entrypoint restarts the server after these scripts, so the new pg_hba line
# takes effect before any worker connects.
set -eu
: "${REPLICATION_USER:?}" "${REPLICATION_PASSWORD:?}" "${CLUSTER_SUBNET:?}"

psql -v ON_ERROR_STOP=1 --username "$POSTGRES_USER" --dbname "$POSTGRES_DB" \
     -v repl_user="$REPLICATION_USER" -v repl_password="$REPLICATION_PASSWORD" <<'SQL'
CREATE ROLE :"repl_user" WITH REPLICATION LOGIN PASSWORD :'repl_password';
SQL

# `all` in pg_hba does not cover replication connections: they need their own line.
echo "host replication $REPLICATION_USER $CLUSTER_SUBNET scram-sha-256" >> "$PGDATA/pg_hba.conf"
echo "nexus: replication role '$REPLICATION_USER' allowed from $CLUSTER_SUBNET"
