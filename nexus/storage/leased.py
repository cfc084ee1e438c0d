"""A job's objects as its worker reaches them: through the master, by the lease it holds (docs/ARCHITECTURE.md,
"Roles hold only what they need").

A worker holds no key to tenant data. Each read and write of a job's object is a request to the master's
lease routes (nexus.api.leases), which answer only the attempt holding the job's current lease, and only
for objects that job may reach: its input, its own outputs, its parent's or its children's, its own
receipt. So a worker reads no other tenant's object, writes only while it holds the lease, and never
replaces or deletes a receipt.

Model files are not tenant data: the worker's standing key reads them (and nothing else), here as before.
A node's local object store (nexus.replicas.objects) sits in front of this as in front of the master's.
"""

from __future__ import annotations

import io
import json
import os
import uuid
from typing import IO, Any
from urllib.parse import quote

import requests

from nexus.config import Settings
from nexus.storage.store import ObjectNotFound, ObjectStore


class ObjectRefused(PermissionError):
    """The master refused this object to this lease (not the job's own, a receipt already written, the
    lease lost). Retried like any failure that is not the job's input: a lost lease ends the attempt
    anyway, and a newer one asks again."""


ETAG_HEADER = "X-Nexus-ETag"  # the store's ETag of the bytes answered (HTTP's own ETag has rules of its own)
_CHUNK_BYTES = 1024 * 1024


class LeaseGrants:
    """One per worker process: the master's lease routes, and the standing store for model files."""

    def __init__(self, api_url: str, standing: ObjectStore, buckets: dict[str, str], timeout: float = 30.0):
        self.api_url = api_url.rstrip("/")
        self.standing = standing
        self.buckets = buckets  # real bucket name -> route name ("nexus-inputs" -> "inputs")
        self.timeout = timeout
        self.http = requests.Session()

    def store(self, job_id: uuid.UUID, attempt: int, lease_token: uuid.UUID | None) -> "LeasedStore":
        return LeasedStore(self, job_id, attempt, lease_token)


class LeasedStore(ObjectStore):
    """The ObjectStore a job handler sees on a worker: one lease's objects, through the master."""

    def __init__(self, grants: LeaseGrants, job_id: uuid.UUID, attempt: int, lease_token: uuid.UUID | None):
        # The standing (models-only) client: any call this class does not route through the master is
        # made with a key that reaches model files only.
        super().__init__(grants.standing.client, grants.standing.presign_expiry)
        self.grants = grants
        self.job_id, self.attempt, self.lease_token = job_id, attempt, lease_token

    # --- reads ---------------------------------------------------------------------------
    def get_bytes(self, bucket: str, key: str) -> bytes:
        return self.read_with_etag(bucket, key)[0]

    def read_with_etag(self, bucket: str, key: str) -> tuple[bytes, str | None]:
        if self._standing(bucket):
            return self.grants.standing.read_with_etag(bucket, key)
        response = self._call("GET", bucket, key)
        return response.content, response.headers.get(ETAG_HEADER)

    def get_file(self, bucket: str, key: str, path: str, etag: str | None = None) -> str:
        self.download(bucket, key, path)
        return "master"

    def download(self, bucket: str, key: str, path: str) -> str | None:
        if self._standing(bucket):
            return self.grants.standing.download(bucket, key, path)
        partial = f"{path}.part"
        with self._call("GET", bucket, key, stream=True) as response:
            with open(partial, "wb") as out:
                for chunk in response.iter_content(_CHUNK_BYTES):
                    out.write(chunk)
            etag = response.headers.get(ETAG_HEADER)
        os.replace(partial, path)  # whole or absent, as fget_object
        return etag

    def etag(self, bucket: str, key: str) -> str | None:
        if self._standing(bucket):
            return self.grants.standing.etag(bucket, key)
        try:
            return self._call("HEAD", bucket, key).headers.get(ETAG_HEADER)
        except ObjectNotFound:
            return None

    # --- writes ---------------------------------------------------------------------------
    def put_bytes(self, bucket: str, key: str, data: bytes, content_type: str = "application/octet-stream") -> str:
        return self.put_stream(bucket, key, io.BytesIO(data), len(data), content_type)

    def put_stream(self, bucket: str, key: str, data: IO[bytes], length: int,
                   content_type: str = "application/octet-stream") -> str:
        if self._standing(bucket):
            raise ObjectRefused(f"{bucket}/{key}: workers write no model file")
        response = self._call("PUT", bucket, key, data=data,
                              headers={"Content-Type": content_type, "Content-Length": str(length)})
        return str(response.json()["etag"])

    # --- the master's lease routes --------------------------------------------------------
    def _standing(self, bucket: str) -> bool:
        return bucket not in self.grants.buckets

    def _call(self, method: str, bucket: str, key: str, **kwargs: Any) -> requests.Response:
        url = (f"{self.grants.api_url}/api/v1/leases/{self.job_id}/{self.attempt}/objects/"
               f"{self.grants.buckets[bucket]}/{quote(key)}")
        headers = {"Authorization": f"Bearer {self.lease_token}", **kwargs.pop("headers", {})}
        response = self.grants.http.request(method, url, headers=headers, timeout=self.grants.timeout, **kwargs)
        if response.status_code == 404:
            raise ObjectNotFound(f"{bucket}/{key}")
        if response.status_code in (401, 403, 409):
            raise ObjectRefused(f"{bucket}/{key}: {_message(response)}")
        response.raise_for_status()  # 5xx: the master is away; the job fails and is retried
        return response


def _message(response: requests.Response) -> str:
    try:
        return str(json.loads(response.content)["error"]["message"])
    except (ValueError, KeyError, TypeError):
        return f"HTTP {response.status_code}"


def lease_grants(settings: Settings, standing: ObjectStore) -> LeaseGrants:
    """A worker's LeaseGrants: the master's user API, and `standing` (the node's key) for model files."""
    buckets = {settings.bucket_inputs: "inputs", settings.bucket_outputs: "outputs",
               settings.bucket_receipts: "receipts"}
    return LeaseGrants(settings.public_api_url, standing, buckets, settings.agent_request_timeout_seconds * 3)
