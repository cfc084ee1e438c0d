"""Model weights on the worker: a local path as it is, or a folder copied from the object store.

A download lands in a temporary folder that is renamed into place only when
complete, so a crash half-way never leaves a folder that looks usable. Each
file is read with the ETag the master listed for it, so a replica-aware store
(nexus.replicas: the node's local S3 mirror) serves its copy only when it is
the master's current one, and fills it otherwise.
"""

from __future__ import annotations

import hashlib
import shutil
from pathlib import Path

from nexus.models.catalog import ModelSpec
from nexus.storage import ObjectStore

COMPLETE_MARKER = ".nexus-complete"


def local_model_path(spec: ModelSpec, store: ObjectStore, cache_dir: Path) -> Path:
    """Where the model's files are on this machine, downloading them first if needed."""
    location = spec.s3_location
    if location is None:
        path = Path(spec.source).expanduser()
        if not path.is_dir():
            raise FileNotFoundError(f"model {spec.name}: {path} is not a folder on this worker")
        return path
    bucket, prefix = location
    target = cache_dir / _safe_name(spec.name, spec.source)
    if (target / COMPLETE_MARKER).exists():
        return target
    return download_prefix(store, bucket, prefix, target)


def download_prefix(store: ObjectStore, bucket: str, prefix: str, target: Path) -> Path:
    prefix = prefix.rstrip("/") + "/" if prefix else ""
    partial = target.with_name(target.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir(parents=True)
    count = 0
    for obj in store.client.list_objects(bucket_name=bucket, prefix=prefix, recursive=True):
        relative = obj.object_name[len(prefix):]
        if not relative or relative.endswith("/"):
            continue
        destination = partial / relative
        destination.parent.mkdir(parents=True, exist_ok=True)
        store.get_file(bucket, obj.object_name, str(destination), etag=obj.etag)
        count += 1
    if count == 0:
        shutil.rmtree(partial, ignore_errors=True)
        raise FileNotFoundError(f"no objects under s3://{bucket}/{prefix}")
    (partial / COMPLETE_MARKER).write_text(f"{count} files\n")
    shutil.rmtree(target, ignore_errors=True)
    partial.rename(target)
    return target


def upload_folder(store: ObjectStore, folder: Path, bucket: str, prefix: str) -> list[str]:
    """Copy a model folder to the object store; returns the keys written."""
    keys = []
    for path in sorted(p for p in Path(folder).rglob("*") if p.is_file()):
        key = f"{prefix.rstrip('/')}/{path.relative_to(folder).as_posix()}"
        store.client.fput_object(bucket_name=bucket, object_name=key, file_path=str(path))
        keys.append(key)
    return keys


def _safe_name(name: str, source: str) -> str:
    digest = hashlib.sha256(source.encode()).hexdigest()[:12]
    return "".join(c if c.isalnum() or c in "._-" else "_" for c in name) + "-" + digest
