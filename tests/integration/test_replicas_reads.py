"""Replica-aware reads against real processes: a PostgreSQL primary and its pg_basebackup standby,
a Redis master and replica, a master and a local S3 server, and real `nexus worker` processes."""

from __future__ import annotations

import hashlib
import uuid

import pytest
import redis
from sqlalchemy import text

from nexus.db.engine import get_engine
from nexus.jobs.queries import get_job
from nexus.jobs.records import Job
from nexus.jobs.submit import Submitter
from nexus.localservers import free_port
from nexus.queueing.celery_app import make_celery
from nexus.replicas import make_node_reads, master_commit_lsn
from nexus.storage import make_object_store
from tests.replicas_support import start_replica_cluster
from tests.support import start_api, start_worker, wait_for

pytestmark = pytest.mark.timeout(180)


@pytest.fixture(scope="module")
def cluster(tmp_path_factory, settings, redis_server):
    base = tmp_path_factory.mktemp("replicas")
    cluster = start_replica_cluster(base, settings, redis_server)
    api, _url = start_api(cluster.master_only_settings, base)  # the workers' way to their jobs' objects
    # The API's first reads set hint bits, whose WAL no commit flushes (see start_replica_cluster):
    # set them now, so the position the standby is waited for below is one it can reach.
    cluster.primary.execute("VACUUM", database="nexus")
    with get_engine(cluster.settings).begin() as conn:
        conn.execute(text("CREATE TABLE IF NOT EXISTS replica_probe (id int PRIMARY KEY, body text)"))
    cluster.wait_for_standby(master_commit_lsn(get_engine(cluster.settings)))
    yield cluster
    api.stop()
    cluster.stop()


@pytest.fixture
def reads(cluster):
    master_redis = redis.Redis.from_url(cluster.settings.redis_url)
    return make_node_reads(cluster.settings, get_engine(cluster.settings), master_redis)


def _insert(cluster, body: str, async_commit: bool = False) -> tuple[int, str]:
    """A committed row on the master and the master's WAL position after the commit."""
    engine = get_engine(cluster.settings)
    row_id = uuid.uuid4().int % 2_000_000_000
    with engine.begin() as conn:
        if async_commit:  # as claims and heartbeats commit: the WAL may not be written yet
            conn.execute(text("SET LOCAL synchronous_commit = off"))
        conn.execute(text("INSERT INTO replica_probe VALUES (:id, :body)"), {"id": row_id, "body": body})
    return row_id, master_commit_lsn(engine)


def _read(reads, row_id: int, lsn: str | None):
    rows, source = reads.rows("SELECT body FROM replica_probe WHERE id = :id", {"id": row_id}, after_lsn=lsn)
    return [r["body"] for r in rows], source


def test_rows_come_from_the_standby_once_it_replayed_past_the_lsn(cluster, reads):
    row_id, lsn = _insert(cluster, "spec v1")
    assert _read(reads, row_id, lsn) == (["spec v1"], "replica")
    assert reads.stats.snapshot().get("rows:replica") == 1


def test_rows_come_from_the_master_while_the_standby_is_behind(cluster, reads):
    cluster.standby.execute("SELECT pg_wal_replay_pause()")
    try:
        row_id, lsn = _insert(cluster, "written while replay is paused")
        reads.standby.wait_seconds = 0.3
        # The standby has not replayed the row: the master answers, with the row.
        assert _read(reads, row_id, lsn) == (["written while replay is paused"], "master")
        assert reads.stats.snapshot().get("rows:behind") == 1
        assert cluster.standby.execute("SELECT count(*) FROM replica_probe WHERE id = %s", (row_id,),
                                       database="nexus") == [(0,)]
    finally:
        cluster.standby.execute("SELECT pg_wal_replay_resume()")
    reads.standby.wait_seconds = 5.0
    assert _read(reads, row_id, lsn) == (["written while replay is paused"], "replica")


def test_reads_are_never_older_than_the_lsn_under_a_write_load(cluster, reads):
    sources = []
    for i in range(60):
        row_id, lsn = _insert(cluster, f"row {i}", async_commit=i % 2 == 1)
        bodies, source = _read(reads, row_id, lsn)
        assert bodies == [f"row {i}"], f"read {i} from {source} missed a row committed before its LSN"
        sources.append(source)
    assert "replica" in sources  # a loopback standby keeps up most of the time


def test_without_an_lsn_the_master_answers(cluster, reads):
    row_id, _lsn = _insert(cluster, "no lsn")
    assert _read(reads, row_id, None) == (["no lsn"], "master")
    assert _read(reads, row_id, "not-an-lsn") == (["no lsn"], "master")


def test_objects_local_when_the_etag_matches_else_master_filling_the_local_copy(cluster, reads):
    bucket, key = cluster.settings.bucket_inputs, f"replica-test/{uuid.uuid4()}"
    master = make_object_store(cluster.settings)
    first_etag = master.put_bytes(bucket, key, b"model weights v1")
    assert reads.object_with_source(bucket, key) == (b"model weights v1", "master")  # miss: fills the local copy
    assert reads.object_with_source(bucket, key, first_etag) == (b"model weights v1", "local")
    master.put_bytes(bucket, key, b"model weights v2, replaced on the master")
    # The local copy's ETag no longer matches the master's: never served stale.
    assert reads.object_with_source(bucket, key) == (b"model weights v2, replaced on the master", "master")
    assert reads.object_with_source(bucket, key) == (b"model weights v2, replaced on the master", "local")
    assert reads.stats.snapshot()["objects:filled"] == 2


def test_flags_from_the_redis_replica_while_its_link_is_up(cluster, reads):
    master_redis = redis.Redis.from_url(cluster.settings.redis_url)
    key = f"nexus:test:flag:{uuid.uuid4()}"
    master_redis.set(key, "drain")
    wait_for(lambda: cluster.redis_replica.client(db=7).get(key) == b"drain", timeout=5, what="replica sync")
    assert reads.flags.get(key) == (b"drain", "replica")
    with pytest.raises(redis.ReadOnlyError):
        cluster.redis_replica.client(db=7).set(key, "a write to a replica")


def test_a_dead_replica_costs_one_failure_then_the_master_answers(cluster):
    dead = cluster.settings.model_copy(update={
        "replica_retry_after_seconds": 120.0,  # the whole test runs inside one cooldown, however slow the machine
        "replica_database_url": f"postgresql+psycopg2://postgres@127.0.0.1:{free_port()}/nexus",
        "replica_redis_url": f"redis://127.0.0.1:{free_port()}/7",
        "replica_s3_endpoint": f"127.0.0.1:{free_port()}",
    })
    reads = make_node_reads(dead, get_engine(dead), redis.Redis.from_url(dead.redis_url))
    row_id, lsn = _insert(cluster, "replica down")
    for _ in range(3):
        assert _read(reads, row_id, lsn) == (["replica down"], "master")
    bucket, key = dead.bucket_inputs, f"replica-test/{uuid.uuid4()}"
    make_object_store(dead).put_bytes(bucket, key, b"bytes")
    assert reads.object_with_source(bucket, key) == (b"bytes", "master")
    assert reads.flags.get("nexus:test:absent") == (None, "master")
    counts = reads.stats.snapshot()
    assert counts["rows:error"] == 1 and counts["rows:master"] == 3  # then skipped for the cooldown
    assert counts["objects:error"] == 1 and counts["flags:error"] == 1


def _submit_digest(settings, data: bytes) -> str:
    store = make_object_store(settings)
    key = f"replica-test/{uuid.uuid4()}"
    store.put_bytes(settings.bucket_inputs, key, data)
    submitter = Submitter(settings, get_engine(settings), make_celery(settings))
    [(job, _created)] = submitter.submit_many([{"type": "digest", "input_key": key}], tenant="default")
    return job.id


def _finished(settings, job_id) -> Job:
    return wait_for(lambda: (j := get_job(get_engine(settings), job_id)) and j.state in
                    ("succeeded", "failed") and j, timeout=60, what=f"job {job_id} finished")


def test_a_worker_reads_its_job_spec_and_input_through_its_replicas(cluster, tmp_path):
    worker = start_worker(cluster.settings, tmp_path, name="replica-worker")
    try:
        data = b"an input object " * 1000
        jobs = [_submit_digest(cluster.settings, data) for _ in range(2)]
        results = [_finished(cluster.settings, job_id) for job_id in jobs]
    finally:
        worker.stop()
    for job in results:
        assert job.state == "succeeded", job.error
        assert job.result["sha256"] == hashlib.sha256(data).hexdigest()
        assert job.result["spec_source"] == "replica"  # the message carried the commit LSN
    assert [j.result["object_source"] for j in results] == ["master", "master"]  # two keys: both fills
    # Each input is now local: reading it again on this node needs only the master's ETag.
    reads = make_node_reads(cluster.settings, get_engine(cluster.settings))
    assert reads.object_with_source(cluster.settings.bucket_inputs, results[0].input_key)[1] == "local"


def test_a_job_completes_when_every_replica_is_down(cluster, tmp_path):
    down = cluster.settings.model_copy(update={
        "replica_database_url": f"postgresql+psycopg2://postgres@127.0.0.1:{free_port()}/nexus",
        "replica_redis_url": f"redis://127.0.0.1:{free_port()}/7",
        "replica_s3_endpoint": f"127.0.0.1:{free_port()}",
    })
    worker = start_worker(down, tmp_path, name="replica-down-worker")
    try:
        job = _finished(down, _submit_digest(down, b"still served"))
    finally:
        worker.stop()
    assert job.state == "succeeded", job.error
    assert job.result["sha256"] == hashlib.sha256(b"still served").hexdigest()
    assert (job.result["spec_source"], job.result["object_source"]) == ("master", "master")
