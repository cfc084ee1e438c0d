"""Object storage: the minio SDK against any S3-compatible server (MinIO, SeaweedFS, ...)."""

from nexus.storage.store import ObjectStore, ObjectNotFound, make_object_store

__all__ = ["ObjectStore", "ObjectNotFound", "make_object_store"]
