"""A small object-store interface over the minio SDK.

Messages and rows carry keys and checksums; bytes live here (docs/ARCHITECTURE.md, "Queues carry routing").
"""

from __future__ import annotations

import io
import json
from datetime import timedelta
from typing import IO, Any

import urllib3
from minio import Minio
from minio.error import S3Error

from nexus.config import Settings


class ObjectNotFound(KeyError):
    pass


class ObjectStore:
    def __init__(self, client: Minio, presign_expiry: timedelta = timedelta(minutes=15)):
        self.client = client
        self.presign_expiry = presign_expiry

    # --- buckets -------------------------------------------------------
    def ensure_buckets(self, names: tuple[str, ...] | list[str]) -> None:
        for name in names:
            if not self.client.bucket_exists(bucket_name=name):
                try:
                    self.client.make_bucket(bucket_name=name)
                except S3Error as exc:  # another master created it meanwhile
                    if exc.code not in ("BucketAlreadyOwnedByYou", "BucketAlreadyExists"):
                        raise

    def ping(self) -> None:
        self.client.list_buckets()

    # --- objects -------------------------------------------------------------
    def put_bytes(self, bucket: str, key: str, data: bytes, content_type: str = "application/octet-stream") -> str:
        return self.put_stream(bucket, key, io.BytesIO(data), len(data), content_type)

    def put_stream(self, bucket: str, key: str, data: IO[bytes], length: int,
                   content_type: str = "application/octet-stream") -> str:
        """Store `length` bytes read from `data` (a request body, streamed on: never whole in memory)."""
        result = self.client.put_object(
            bucket_name=bucket, object_name=key, data=data, length=length, content_type=content_type
        )
        return result.etag

    def get_bytes(self, bucket: str, key: str) -> bytes:
        return self.read_with_etag(bucket, key)[0]

    def read_with_etag(self, bucket: str, key: str) -> tuple[bytes, str | None]:
        """The bytes and the ETag of the bytes actually read (the object may change between a HEAD and a GET)."""
        try:
            response = self.client.get_object(bucket_name=bucket, object_name=key)
        except S3Error as exc:
            if exc.code in ("NoSuchKey", "NoSuchBucket"):
                raise ObjectNotFound(f"{bucket}/{key}") from None
            raise
        try:
            return response.read(), response.headers.get("ETag")
        finally:
            response.close()
            response.release_conn()

    def get_file(self, bucket: str, key: str, path: str, etag: str | None = None) -> str:
        """Write the object to `path` (streamed, never whole in memory); returns where it came from.
        `etag` is the version the caller expects; a replica-aware store uses it to trust a local copy."""
        self.download(bucket, key, path)
        return "master"

    def download(self, bucket: str, key: str, path: str) -> str | None:
        """Stream the object to `path` (whole or absent: fget_object renames a .part file); its ETag."""
        try:
            return self.client.fget_object(bucket_name=bucket, object_name=key, file_path=path).etag
        except S3Error as exc:
            if exc.code in ("NoSuchKey", "NoSuchBucket"):
                raise ObjectNotFound(f"{bucket}/{key}") from None
            raise

    def put_json(self, bucket: str, key: str, obj: Any) -> str:
        data = json.dumps(obj, separators=(",", ":"), sort_keys=True).encode()
        return self.put_bytes(bucket, key, data, content_type="application/json")

    def get_json(self, bucket: str, key: str) -> Any:
        return json.loads(self.get_bytes(bucket, key))

    def exists(self, bucket: str, key: str) -> bool:
        return self.etag(bucket, key) is not None

    def etag(self, bucket: str, key: str) -> str | None:
        try:
            return self.client.stat_object(bucket_name=bucket, object_name=key).etag
        except S3Error as exc:
            if exc.code in ("NoSuchKey", "NoSuchBucket", "NoSuchObject"):
                return None
            raise

    def remove_many(self, bucket: str, keys: list[str]) -> int:
        """Delete these objects in bulk requests (a missing one is no error); returns how many were asked."""
        from minio.deleteobjects import DeleteObject

        for start in range(0, len(keys), 1000):  # S3 takes at most 1,000 keys per DeleteObjects request
            errors = self.client.remove_objects(
                bucket_name=bucket, delete_object_list=[DeleteObject(k) for k in keys[start:start + 1000]])
            failed = [e for e in errors if e.code not in ("NoSuchKey", "NoSuchBucket")]
            if failed:
                raise RuntimeError(f"could not delete {bucket}/{failed[0].name}: {failed[0].code} {failed[0].message}")
        return len(keys)

    def presigned_get(self, bucket: str, key: str, expires: timedelta | None = None) -> str:
        return self.client.presigned_get_object(
            bucket_name=bucket, object_name=key, expires=expires or self.presign_expiry
        )


def make_minio_client(endpoint: str, access_key: str, secret_key: str, secure: bool, region: str) -> Minio:
    # Short timeouts and few retries: a dead store must surface as 503 quickly, not hang a request.
    http = urllib3.PoolManager(
        timeout=urllib3.Timeout(connect=3, read=30),
        retries=urllib3.Retry(total=2, backoff_factor=0.2, status_forcelist=[500, 502, 503, 504]),
        maxsize=20,
    )
    return Minio(
        endpoint=endpoint, access_key=access_key, secret_key=secret_key, secure=secure, region=region, http_client=http
    )


def make_object_store(settings: Settings) -> ObjectStore:
    client = make_minio_client(
        settings.s3_endpoint, settings.s3_access_key, settings.s3_secret_key, settings.s3_secure, settings.s3_region
    )
    return ObjectStore(client, timedelta(seconds=settings.presign_expiry_seconds))
