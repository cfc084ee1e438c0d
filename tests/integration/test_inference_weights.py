"""Model weights from the object store through a node's local S3 mirror (two real S3 servers).

The master's S3 is the session's; the node's mirror is a second server. A file
is served from the mirror only when its copy has the ETag the master lists;
otherwise it comes from the master and fills the mirror.
"""

from __future__ import annotations

import uuid

import pytest

from nexus.models.catalog import ModelSpec
from nexus.serving.weights import local_model_path, upload_folder
from nexus.localservers import S3Server, free_port
from nexus.replicas import ReplicatedObjectStore, make_read_store
from nexus.storage import make_object_store
from tests.inference_support import tiny_model_dir  # noqa: F401
from tests.support import S3_ACCESS, S3_SECRET

pytestmark = pytest.mark.timeout(120)


@pytest.fixture(scope="module")
def mirror(tmp_path_factory):
    with S3Server(tmp_path_factory.mktemp("node-mirror"), access_key=S3_ACCESS, secret_key=S3_SECRET) as server:
        yield server


@pytest.fixture
def uploaded(settings, tiny_model_dir):
    """The tiny model under a fresh prefix of the master's models bucket: (spec, {relative path: bytes})."""
    master = make_object_store(settings)
    master.ensure_buckets([settings.bucket_models])
    prefix = f"weights-test/{uuid.uuid4().hex[:8]}"
    upload_folder(master, tiny_model_dir, settings.bucket_models, prefix)
    files = {p.relative_to(tiny_model_dir).as_posix(): p.read_bytes() for p in tiny_model_dir.rglob("*") if p.is_file()}
    return ModelSpec(name="tiny-mirrored", source=f"s3://{settings.bucket_models}/{prefix}"), files


def contents(folder) -> dict[str, bytes]:
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in folder.rglob("*")
            if p.is_file() and not p.name.startswith(".nexus")}


def test_weights_come_from_the_mirror_once_filled_and_never_stale(settings, mirror, uploaded, tmp_path):
    spec, files = uploaded
    store = make_read_store(settings.model_copy(update={"replica_s3_endpoint": mirror.endpoint}))
    assert isinstance(store, ReplicatedObjectStore)

    first = local_model_path(spec, store, tmp_path / "cache-1")  # the mirror is empty: master, then filled
    assert contents(first) == files
    assert store.stats.snapshot() == {"objects:absent": len(files), "objects:master": len(files),
                                      "objects:filled": len(files)}

    second = local_model_path(spec, store, tmp_path / "cache-2")  # another node's cache, same mirror
    assert contents(second) == files
    assert store.stats.snapshot()["objects:local"] == len(files)

    # The master's config changes: that one file is stale on the mirror, read from the master and refilled.
    bucket, prefix = spec.s3_location
    changed = files["config.json"].replace(b"{", b'{"nexus_note": "v2", ', 1)
    make_object_store(settings).put_bytes(bucket, f"{prefix}/config.json", changed)
    third = local_model_path(spec, store, tmp_path / "cache-3")
    assert contents(third) == {**files, "config.json": changed}
    counts = store.stats.snapshot()
    assert counts["objects:stale"] == 1 and counts["objects:master"] == len(files) + 1
    assert counts["objects:local"] == 2 * len(files) - 1 and counts["objects:filled"] == len(files) + 1


def test_weights_come_from_the_master_when_the_mirror_is_down(settings, uploaded, tmp_path):
    spec, files = uploaded
    dead = settings.model_copy(update={"replica_s3_endpoint": f"127.0.0.1:{free_port()}"})
    store = make_read_store(dead)
    assert contents(local_model_path(spec, store, tmp_path / "cache")) == files
    counts = store.stats.snapshot()
    assert counts["objects:master"] == len(files) and counts["objects:error"] >= 1  # then the cooldown skips it
