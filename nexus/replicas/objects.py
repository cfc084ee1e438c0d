"""Objects from the node's local S3 when its copy is the master's current one.

The test is the ETag: a local copy is served only when its ETag (or, for a
copy this store filled itself, the master ETag recorded in its metadata)
equals the master's. A miss reads the master and fills the local copy, so the
next read of a model file or input is local. Every write goes to the master.
"""

from __future__ import annotations

import contextlib
import io
import logging
import os

import urllib3
from minio import Minio
from minio.error import S3Error

from nexus.replicas.health import Cooldown
from nexus.replicas.stats import ReadStats
from nexus.storage.store import ObjectNotFound, ObjectStore

log = logging.getLogger(__name__)

# User metadata on a filled copy: the master ETag it was copied from (multipart
# uploads get a different ETag when re-uploaded in one piece).
SOURCE_ETAG_META = "nexus-source-etag"
_MISSING = ("NoSuchKey", "NoSuchBucket", "NoSuchObject")
_CHUNK_BYTES = 1024 * 1024


def normalise_etag(etag: str | None) -> str | None:
    return etag.strip().strip('"') if etag else None


def make_local_client(endpoint: str, access_key: str, secret_key: str, secure: bool, region: str) -> Minio:
    # No retries and a 1 s connect timeout: a dead local store must fall through to the master at once.
    http = urllib3.PoolManager(timeout=urllib3.Timeout(connect=1, read=30), retries=False, maxsize=20)
    return Minio(endpoint=endpoint, access_key=access_key, secret_key=secret_key, secure=secure, region=region,
                 http_client=http)


class ReplicatedObjectStore(ObjectStore):
    """An ObjectStore on the master whose reads prefer a local copy with the same ETag.

    `master` is how the master is reached: with a key of the node's own (model files), or one job's
    lease (nexus.storage.leased), which `over` puts under the same local store."""

    def __init__(self, master: ObjectStore, local: Minio, cooldown: Cooldown, stats: ReadStats,
                 local_buckets: set[str] | None = None):
        super().__init__(master.client, master.presign_expiry)
        self.master = master
        self.local = local
        self.cooldown = cooldown
        self.stats = stats
        self._local_buckets = local_buckets if local_buckets is not None else set()

    def over(self, master: ObjectStore) -> "ReplicatedObjectStore":
        """The same local store in front of another way to the master (one job's lease)."""
        return ReplicatedObjectStore(master, self.local, self.cooldown, self.stats, self._local_buckets)

    # Writes and HEADs go to the master, whichever way it is reached.
    def put_bytes(self, bucket: str, key: str, data: bytes, content_type: str = "application/octet-stream") -> str:
        return self.master.put_bytes(bucket, key, data, content_type)

    def etag(self, bucket: str, key: str) -> str | None:
        return self.master.etag(bucket, key)

    def get_bytes(self, bucket: str, key: str, etag: str | None = None) -> bytes:
        return self.get_bytes_with_source(bucket, key, etag)[0]

    def get_bytes_with_source(self, bucket: str, key: str, etag: str | None = None) -> tuple[bytes, str]:
        """(bytes, "local" | "master"). `etag`: the master ETag the message carried; else one HEAD asks the master."""
        wanted = normalise_etag(etag) or normalise_etag(self.etag(bucket, key))
        if wanted is None:
            raise ObjectNotFound(f"{bucket}/{key}")
        if self.cooldown.available():
            data = self._read_local(bucket, key, wanted)
            if data is not None:
                self.stats.count("objects", "local")
                return data, "local"
        data, master_etag = self._read_master(bucket, key)
        self.stats.count("objects", "master")
        if self.cooldown.available():
            self._fill(bucket, key, data, master_etag)
        return data, "master"

    def get_file(self, bucket: str, key: str, path: str, etag: str | None = None) -> str:
        """Stream the object to `path` from the local copy when its ETag is `etag` (else one HEAD asks the
        master), otherwise from the master, then fill the local copy: "local" | "master". For model weights,
        which are too large to hold in memory."""
        wanted = normalise_etag(etag) or normalise_etag(self.etag(bucket, key))
        if wanted is None:
            raise ObjectNotFound(f"{bucket}/{key}")
        if self.cooldown.available() and self._download_local(bucket, key, wanted, path):
            self.stats.count("objects", "local")
            return "local"
        master_etag = self.master.download(bucket, key, path)  # `path` is whole or absent
        self.stats.count("objects", "master")
        if self.cooldown.available():
            self._fill_file(bucket, key, path, normalise_etag(master_etag))
        return "master"

    def _download_local(self, bucket: str, key: str, wanted: str, path: str) -> bool:
        partial = f"{path}.local-partial"
        try:
            response = self.local.get_object(bucket_name=bucket, object_name=key)
            try:
                if not self._is_current(response, wanted):
                    return False
                with open(partial, "wb") as out:
                    for chunk in response.stream(_CHUNK_BYTES):
                        out.write(chunk)
            finally:
                response.close()
                response.release_conn()
            os.replace(partial, path)
            return True
        except S3Error as exc:
            if exc.code in _MISSING:
                self.stats.count("objects", "absent")
            else:
                self._local_failed(exc)
        except Exception as exc:  # connection refused, reset mid-stream: the local store is down
            self._local_failed(exc)
        with contextlib.suppress(FileNotFoundError):
            os.unlink(partial)
        return False

    def _is_current(self, response, wanted: str) -> bool:
        """Whether the local copy is the master's current object: its own ETag, or the one it was copied from."""
        copied_from = normalise_etag(response.headers.get(f"x-amz-meta-{SOURCE_ETAG_META}"))
        if wanted in (normalise_etag(response.headers.get("ETag")), copied_from):
            return True
        self.stats.count("objects", "stale")
        return False

    def _fill_file(self, bucket: str, key: str, path: str, master_etag: str | None) -> None:
        try:
            self._ensure_local_bucket(bucket)
            metadata = {SOURCE_ETAG_META: master_etag} if master_etag else None
            self.local.fput_object(bucket_name=bucket, object_name=key, file_path=path, metadata=metadata)
            self.stats.count("objects", "filled")
        except Exception as exc:  # a failed fill only means the next read goes to the master again
            self._local_failed(exc)

    def _read_local(self, bucket: str, key: str, wanted: str) -> bytes | None:
        try:
            # One request: the headers arrive before the body, which is read only when the ETag matches.
            response = self.local.get_object(bucket_name=bucket, object_name=key)
            try:
                return response.read() if self._is_current(response, wanted) else None
            finally:
                response.close()
                response.release_conn()
        except S3Error as exc:
            if exc.code in _MISSING:
                self.stats.count("objects", "absent")
                return None
            self._local_failed(exc)
            return None
        except Exception as exc:  # connection refused, timeouts: the local store is down
            self._local_failed(exc)
            return None

    def _read_master(self, bucket: str, key: str) -> tuple[bytes, str | None]:
        # The ETag of the bytes we actually got (the object may have changed since the HEAD).
        data, etag = self.master.read_with_etag(bucket, key)
        return data, normalise_etag(etag)

    def _fill(self, bucket: str, key: str, data: bytes, master_etag: str | None) -> None:
        try:
            self._ensure_local_bucket(bucket)
            metadata = {SOURCE_ETAG_META: master_etag} if master_etag else None
            self.local.put_object(bucket_name=bucket, object_name=key, data=io.BytesIO(data), length=len(data),
                                  metadata=metadata)
            self.stats.count("objects", "filled")
        except Exception as exc:  # a failed fill only means the next read goes to the master again
            self._local_failed(exc)

    def _ensure_local_bucket(self, bucket: str) -> None:
        if bucket not in self._local_buckets:
            if not self.local.bucket_exists(bucket_name=bucket):
                self.local.make_bucket(bucket_name=bucket)
            self._local_buckets.add(bucket)

    def _local_failed(self, exc: Exception) -> None:
        """Log, and skip the local store for the cooldown: reads go to the master meanwhile."""
        log.warning("local object store unavailable, using the master for %.0f s: %s", self.cooldown.seconds,
                    str(exc).splitlines()[0] if str(exc) else type(exc).__name__)
        self.cooldown.failed()
        self.stats.count("objects", "error")
