#!/bin/sh
# Creates (or refreshes) the workers' MinIO user with the policy below, then exits (master-compose.yml,
# service minio-users). Workers hold this key pair, never the root keys: it reads and lists model files and
# nothing else (Settings.worker_bucket_actions). A job's inputs, outputs and receipts are tenant data: a worker
# reaches those only through the master's API, by the job's lease (nexus/api/leases.py).
# Re-run on every `just master-up`, so a rotated NEXUS_WORKER_S3_SECRET_KEY takes effect.
set -eu
: "${WORKER_S3_ACCESS_KEY:?}" "${WORKER_S3_SECRET_KEY:?}" "${BUCKETS:?}"
until mc ready master >/dev/null 2>&1; do echo "worker-user: waiting for minio"; sleep 2; done

models=""
for bucket in $BUCKETS; do
    case "$bucket" in
        *models) models="$models \"arn:aws:s3:::$bucket\", \"arn:aws:s3:::$bucket/*\"," ;;
    esac
done
cat > /tmp/worker-policy.json <<POLICY
{"Version": "2012-10-17", "Statement": [
  {"Effect": "Allow", "Action": ["s3:GetObject", "s3:ListBucket", "s3:GetBucketLocation", "s3:ListenBucketNotification"],
   "Resource": [${models%,}]}
]}
POLICY
mc admin policy create master nexus-worker /tmp/worker-policy.json
mc admin user add master "$WORKER_S3_ACCESS_KEY" "$WORKER_S3_SECRET_KEY"
mc admin policy attach master nexus-worker --user "$WORKER_S3_ACCESS_KEY" || true  # already attached
echo "worker-user: $WORKER_S3_ACCESS_KEY has policy nexus-worker"
