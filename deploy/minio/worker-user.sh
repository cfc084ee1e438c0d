#!/bin/sh
# Creates (or refreshes) the workers' MinIO user with the policy below, then exits (master-compose.yml,
# service minio-users). Workers hold this key pair, never the root keys: they read inputs and model
# files, read and write outputs and receipts, and create or delete no bucket (Settings.worker_bucket_actions).
# Re-run on every `just master-up`, so a rotated NEXUS_WORKER_S3_SECRET_KEY takes effect.
set -eu
: "${WORKER_S3_ACCESS_KEY:?}" "${WORKER_S3_SECRET_KEY:?}" "${BUCKETS:?}"
until mc ready master >/dev/null 2>&1; do echo "worker-user: waiting for minio"; sleep 2; done

read_only="" read_write=""
for bucket in $BUCKETS; do
    case "$bucket" in
        *outputs|*receipts) read_write="$read_write \"arn:aws:s3:::$bucket\", \"arn:aws:s3:::$bucket/*\"," ;;
        *) read_only="$read_only \"arn:aws:s3:::$bucket\", \"arn:aws:s3:::$bucket/*\"," ;;
    esac
done
cat > /tmp/worker-policy.json <<POLICY
{"Version": "2012-10-17", "Statement": [
  {"Effect": "Allow", "Action": ["s3:GetObject", "s3:ListBucket", "s3:GetBucketLocation", "s3:ListenBucketNotification"],
   "Resource": [${read_only%,}, ${read_write%,}]},
  {"Effect": "Allow", "Action": ["s3:PutObject", "s3:DeleteObject", "s3:AbortMultipartUpload", "s3:ListMultipartUploadParts"],
   "Resource": [${read_write%,}]}
]}
POLICY
mc admin policy create master nexus-worker /tmp/worker-policy.json
mc admin user add master "$WORKER_S3_ACCESS_KEY" "$WORKER_S3_SECRET_KEY"
mc admin policy attach master nexus-worker --user "$WORKER_S3_ACCESS_KEY" || true  # already attached
echo "worker-user: $WORKER_S3_ACCESS_KEY has policy nexus-worker"
