#!/usr/bin/env bash
# Keeps this worker's MinIO in step with the master's read-mostly buckets
# (worker-compose.yml, profile `replicas`). `mc mirror --watch` copies what exists,
# then follows the master's bucket notifications. Workers read an object here only
# when its ETag matches the one the job message carries, so a copy that lags is
# never served (DESIGN.md, decision 6). Aliases come from MC_HOST_master / MC_HOST_local.
set -eu
: "${MIRROR_BUCKETS:?}"

for alias in master local; do
    until mc ready "$alias" >/dev/null 2>&1; do
        echo "mirror: waiting for $alias"
        sleep 2
    done
done

for bucket in $MIRROR_BUCKETS; do
    # The API creates the buckets on the master at start; never write to the master here.
    until mc stat "master/$bucket" >/dev/null 2>&1; do
        echo "mirror: waiting for bucket master/$bucket"
        sleep 5
    done
    mc mb --ignore-existing "local/$bucket"
    echo "mirror: master/$bucket -> local/$bucket"
    mc mirror --watch --overwrite --remove "master/$bucket" "local/$bucket" &
done

# One mirror stopping stops the container, and `restart: unless-stopped` starts all again.
wait -n
echo "mirror: a mirror stopped; restarting" >&2
exit 1
