"""A worker's own credentials, read from a running worker's environment as an intruder would, reach only the
worker's operations (docs/ARCHITECTURE.md, "Roles hold only what they need").

Each refusal here succeeded before workers had a role of their own: their NEXUS_DATABASE_URL named a
superuser and their environment carried the admin token and the Flower password.
"""

from __future__ import annotations

import dataclasses
import io
import uuid
from pathlib import Path

import pytest
from sqlalchemy import create_engine, text
from sqlalchemy.exc import DBAPIError, ProgrammingError

from nexus.auth import hash_token
from nexus.credentials import MASTER_ONLY_SECRETS
from nexus.jobs import children, lifecycle, queries
from nexus.jobs.records import Lease
from tests.support import wait_for

pytestmark = pytest.mark.timeout(180)


def process_environment(pid: int) -> dict[str, str]:
    raw = Path(f"/proc/{pid}/environ").read_bytes()
    return dict(item.split("=", 1) for item in raw.decode(errors="replace").split("\0") if "=" in item)


@pytest.fixture(scope="module")
def stolen(worker):
    """The session worker's environment, as read by someone who got into its process."""
    return process_environment(worker.process.pid)


@pytest.fixture
def intruder(stolen, services):
    """A database engine on the worker's own credentials (autocommit: each attempt stands alone)."""
    engine = create_engine(stolen["NEXUS_DATABASE_URL"], isolation_level="AUTOCOMMIT")
    yield engine
    engine.dispose()


def refused(engine, sql: str, params: dict | None = None) -> bool:
    try:
        with engine.connect() as conn:
            conn.execute(text(sql), params or {})
    except (ProgrammingError, DBAPIError) as exc:
        if "permission denied" in str(exc) or "must be owner" in str(exc):
            return True
        raise  # any other failure (the server full, a typo) says nothing about privileges
    return False


def submit(services, raw: dict, tenant: str = "default") -> uuid.UUID:
    [(job, _)] = services.submitter.submit_many([raw], tenant=tenant)
    return job.id


def test_the_worker_holds_no_master_secret(stolen, settings):
    for name in MASTER_ONLY_SECRETS:
        assert f"NEXUS_{name.upper()}" not in stolen
    assert settings.admin_token not in "\0".join(stolen.values())
    assert settings.flower_password not in "\0".join(stolen.values())
    assert stolen["NEXUS_DATABASE_URL"] != settings.database_url


def test_the_worker_role_is_no_superuser_and_owns_nothing(intruder):
    with intruder.connect() as conn:
        role = conn.execute(text("SELECT rolsuper, rolcreaterole, rolcreatedb, rolbypassrls FROM pg_roles "
                                 "WHERE rolname = current_user")).one()
        owned = conn.execute(text("SELECT count(*) FROM pg_class c JOIN pg_roles r ON r.oid = c.relowner "
                                  "WHERE r.rolname = current_user")).scalar_one()
    assert tuple(role) == (False, False, False, False)
    assert owned == 0


def test_a_worker_cannot_forge_or_read_api_tokens(intruder):
    forged = "nx_forged-" + uuid.uuid4().hex
    assert refused(intruder, "INSERT INTO api_tokens (id, name, token_hash, role, tenant) "
                             "VALUES (:id, 'forged', :h, 'admin', 'default')", {"id": uuid.uuid4(), "h": hash_token(forged)})
    assert refused(intruder, "SELECT token_hash FROM api_tokens")
    assert refused(intruder, "UPDATE api_tokens SET role = 'admin'")


def test_a_worker_cannot_run_ddl(intruder):
    assert refused(intruder, "CREATE TABLE stolen (x int)")
    assert refused(intruder, "ALTER TABLE jobs ADD COLUMN x int")
    assert refused(intruder, "DROP TABLE job_events")
    assert refused(intruder, "CREATE FUNCTION nexus_w_claim() RETURNS int LANGUAGE sql AS 'SELECT 1'")


def test_a_worker_reaches_no_table_directly(intruder, services):
    job_id = submit(services, {"type": "noop", "requirements": {"tier": "gpu_peer"}})
    assert refused(intruder, "SELECT payload FROM jobs")
    assert refused(intruder, "UPDATE jobs SET result = '{\"forged\": true}'::jsonb WHERE id = :id", {"id": job_id})
    assert refused(intruder, "DELETE FROM job_events")
    assert refused(intruder, "SELECT * FROM nodes")


def test_a_worker_cannot_rewrite_another_attempts_result_or_a_finished_one(intruder, services):
    """Through the worker's own functions: the attempt number is easy to guess, the lease token is not."""
    other = submit(services, {"type": "noop", "requirements": {"tier": "gpu_peer"}})
    with services.engine.begin() as conn:  # another worker's running attempt
        assert lifecycle.claim(conn, other, 1, "honest-node", 60) is not None
    with intruder.connect() as conn:
        assert lifecycle.complete(conn, other, 1, "intruder", {"forged": True}, None) is None
        assert lifecycle.complete(conn, other, 1, "intruder", {"forged": True}, None, uuid.uuid4()) is None
        assert lifecycle.fail(conn, other, 1, "intruder", "forged", False, 0) is None
        lifecycle.set_progress(conn, other, 1, {"forged": True})
        assert queries.own_job(conn, Lease(other, 1, None)) is None  # nor read it
    # Its own claim is a real lease: it may finish that attempt, once, and never after.
    mine = submit(services, {"type": "noop", "requirements": {"tier": "gpu_peer"}})
    with intruder.connect() as conn:
        claimed = lifecycle.claim(conn, mine, 1, "intruder", 60)
        assert claimed is not None and claimed.lease_token is not None
        assert lifecycle.complete(conn, mine, 1, "intruder", {"mine": 1}, None, claimed.lease_token) is not None
        assert lifecycle.complete(conn, mine, 1, "intruder", {"rewritten": 1}, None, claimed.lease_token) is None
        assert lifecycle.fail(conn, mine, 1, "intruder", "late", True, 0, lease_token=claimed.lease_token) is None
    with services.engine.connect() as conn:
        rows = dict(conn.execute(text("SELECT id, result FROM jobs WHERE id IN (:a, :b)"),
                                 {"a": other, "b": mine}).all())
        assert conn.execute(text("SELECT progress FROM jobs WHERE id = :id"), {"id": other}).scalar() is None
    assert rows == {other: None, mine: {"mine": 1}}


def test_children_belong_to_the_parents_tenant_and_lease(intruder, services):
    """A worker submits children only for an attempt it holds, and in that job's tenant."""
    parent = submit(services, {"type": "noop", "requirements": {"tier": "gpu_peer"}}, tenant="victim")
    from nexus.jobs.submit import build_spec

    spec = build_spec({"type": "noop"}, services.settings, tenant="intruder-tenant", parent_id=parent)
    with services.engine.begin() as conn:
        assert lifecycle.claim(conn, parent, 1, "honest-node", 60) is not None
    with intruder.connect() as conn:
        assert children.insert_children(conn, Lease(parent, 1, uuid.uuid4()), [spec]) == {}
    mine = submit(services, {"type": "noop", "requirements": {"tier": "gpu_peer"}}, tenant="victim")
    with intruder.connect() as conn:
        claimed = lifecycle.claim(conn, mine, 1, "intruder", 60)
        [row] = children.insert_children(conn, Lease(mine, 1, claimed.lease_token), [spec]).values()
    with services.engine.connect() as conn:
        child = conn.execute(text("SELECT tenant, parent_id FROM jobs WHERE id = :id"), {"id": row.id}).one()
    assert tuple(child) == ("victim", mine)  # the tenant the caller named is not the one it got
    # Nor may it hand the master's verifier a job of its choosing.
    to_master = build_spec({"type": "noop"}, services.settings, tenant="victim", parent_id=mine)
    to_master = dataclasses.replace(to_master, queue="master.proof_verify")
    with intruder.connect() as conn:
        assert children.insert_children(conn, Lease(mine, 1, claimed.lease_token), [to_master]) == {}


def test_a_worker_cannot_take_or_record_a_proofs_verification(intruder, services):
    """A proof's verdict (and with it the proven weight) is the master's: its provers are nodes, and the
    worker role can neither claim a verification nor write one by any other way."""
    from nexus.jobs.submit import build_spec

    spec = build_spec({"type": "proof_verify", "payload": {"proof_id": str(uuid.uuid4())}}, services.settings,
                      tenant="default", allow_internal=True)
    assert spec.queue == "master.proof_verify"
    # On a master queue of its own, so that the session's verifier (if one runs) leaves it alone.
    [(verify, _)] = services.submitter.submit_specs([dataclasses.replace(spec, queue=f"master.test-{uuid.uuid4()}")])
    with intruder.connect() as conn:
        assert lifecycle.claim(conn, verify.id, 1, "a-prover", 60) is None
        assert lifecycle.complete(conn, verify.id, 1, "a-prover", {"verdict": {"accepted": True}}, None) is None
    assert refused(intruder, "UPDATE jobs SET result = '{\"verdict\": {\"accepted\": true}}'::jsonb "
                             "WHERE id = :id", {"id": verify.id})
    assert job_state(services, verify.id) == "queued"
    with services.engine.begin() as conn:  # the master's own verifier may
        assert lifecycle.claim(conn, verify.id, 1, "master", 60) is not None


def test_a_workers_redis_user_may_not_administer_the_broker(stolen, services):
    """The broker's queues and streams, yes; CONFIG, ACL, FLUSHALL, KEYS, DEBUG, SHUTDOWN, no."""
    import redis

    assert stolen["NEXUS_REDIS_URL"].startswith("redis://nexus-worker:")
    broker = redis.Redis.from_url(stolen["NEXUS_REDIS_URL"], socket_timeout=5)
    broker.lpush("cpu_only-probe", "x") and broker.delete("cpu_only-probe")  # queues: allowed
    for command in (("CONFIG", "SET", "appendonly", "no"), ("CONFIG", "GET", "requirepass"), ("ACL", "LIST"),
                    ("ACL", "SETUSER", "nexus-worker", "+@all"), ("FLUSHALL",), ("FLUSHDB",), ("KEYS", "*"),
                    ("DEBUG", "SLEEP", "0"), ("SHUTDOWN", "NOSAVE"), ("REPLICAOF", "127.0.0.1", "1")):
        with pytest.raises(redis.exceptions.NoPermissionError):
            broker.execute_command(*command)
    assert services.redis.ping()  # the broker is still up


def _intruder_store(stolen):
    from minio import Minio

    return Minio(stolen["NEXUS_S3_ENDPOINT"], access_key=stolen["NEXUS_S3_ACCESS_KEY"],
                 secret_key=stolen["NEXUS_S3_SECRET_KEY"], secure=False)


def test_a_workers_object_store_key_reads_only_model_files(stolen, settings, services):
    """The workers' scoped key, not the root keys: model files, read-only; no bucket made or removed."""
    from minio.error import S3Error

    assert stolen["NEXUS_S3_ACCESS_KEY"] != settings.s3_access_key
    assert settings.s3_secret_key not in "\0".join(stolen.values())
    services.store.put_bytes(settings.bucket_models, "model/weights.bin", b"weights")
    intruder = _intruder_store(stolen)
    assert intruder.get_object(settings.bucket_models, "model/weights.bin").read() == b"weights"
    with pytest.raises(S3Error, match="AccessDenied"):
        intruder.put_object(settings.bucket_models, "model/weights.bin", io.BytesIO(b"poisoned"), 8)
    with pytest.raises(S3Error, match="AccessDenied"):
        intruder.remove_object(settings.bucket_models, "model/weights.bin")
    with pytest.raises(S3Error, match="AccessDenied"):
        intruder.make_bucket("stolen-bucket")
    assert services.store.get_bytes(settings.bucket_models, "model/weights.bin") == b"weights"


def test_a_worker_cannot_read_another_tenants_input(stolen, settings, services):
    """Before, the workers' key read every tenant's inputs; now it reaches none of them."""
    from minio.error import S3Error

    services.store.put_bytes(settings.bucket_inputs, "victim/secret/input", b"someone else's input")
    intruder = _intruder_store(stolen)
    for attempt in (lambda: intruder.get_object(settings.bucket_inputs, "victim/secret/input").read(),
                    lambda: list(intruder.list_objects(settings.bucket_inputs, recursive=True)),
                    lambda: intruder.put_object(settings.bucket_inputs, "victim/x", io.BytesIO(b"x"), 1)):
        with pytest.raises(S3Error, match="AccessDenied"):
            attempt()


def test_a_worker_cannot_delete_or_replace_a_receipt(stolen, settings, services):
    """Receipts and finished outputs: before, the workers' key could delete or overwrite them."""
    from minio.error import S3Error

    services.store.put_json(settings.bucket_receipts, "proofs/p/receipt.json", {"receipt_digest": "d"})
    services.store.put_bytes(settings.bucket_outputs, "jobs/j/output", b"a finished output")
    intruder = _intruder_store(stolen)
    for bucket, key in ((settings.bucket_receipts, "proofs/p/receipt.json"), (settings.bucket_outputs, "jobs/j/output")):
        with pytest.raises(S3Error, match="AccessDenied"):
            intruder.remove_object(bucket, key)
        with pytest.raises(S3Error, match="AccessDenied"):
            intruder.put_object(bucket, key, io.BytesIO(b"forged"), 6)
        with pytest.raises(S3Error, match="AccessDenied"):
            intruder.get_object(bucket, key)
    assert services.store.get_json(settings.bucket_receipts, "proofs/p/receipt.json") == {"receipt_digest": "d"}


def _lease_url(settings, job_id, attempt, bucket, key) -> str:
    return f"{settings.public_api_url}/api/v1/leases/{job_id}/{attempt}/objects/{bucket}/{key}"


def test_through_its_lease_a_worker_reaches_its_own_jobs_objects_only(intruder, settings, services, live_api):
    """The master's lease routes, as a worker uses them: the claim's lease token opens this job's input
    and outputs; another tenant's input, another job's outputs, a guessed token or a finished job, never."""
    import requests

    services.store.put_bytes(settings.bucket_inputs, "mine/in", b"my input")
    services.store.put_bytes(settings.bucket_inputs, "victim/in", b"their input")
    mine = services.submitter.submit_many([{"type": "digest", "input_key": "mine/in",
                                            "requirements": {"tier": "gpu_peer"}}], tenant="mine")[0][0].id
    other = submit(services, {"type": "noop", "requirements": {"tier": "gpu_peer"}}, tenant="victim")
    with intruder.connect() as conn:
        lease = lifecycle.claim(conn, mine, 1, "intruder", 60)
    bearer = {"Authorization": f"Bearer {lease.lease_token}"}

    def get(job_id, bucket, key, headers=bearer):
        return requests.get(_lease_url(settings, job_id, 1, bucket, key), headers=headers, timeout=10)

    answer = get(mine, "inputs", "mine/in")
    assert (answer.status_code, answer.content) == (200, b"my input")
    assert get(mine, "inputs", "victim/in").status_code == 403  # another tenant's input
    assert get(other, "inputs", "victim/in").status_code == 403  # another job, with this lease's token
    assert get(mine, "inputs", "victim/in", {"Authorization": f"Bearer {uuid.uuid4()}"}).status_code == 403
    # A dot segment never reaches past its prefix (the client resolves it, else the master refuses it).
    assert get(mine, "outputs", f"jobs/{mine}/../{other}/output").status_code in (400, 403)
    assert get(mine, "outputs", f"jobs/{mine}/%2E%2E/{other}/output").status_code in (400, 403)
    put = requests.put(_lease_url(settings, mine, 1, "outputs", f"jobs/{mine}/output"), data=b"out",
                       headers=bearer, timeout=10)
    assert put.status_code == 201
    assert requests.put(_lease_url(settings, mine, 1, "outputs", f"jobs/{other}/output"), data=b"x",
                        headers=bearer, timeout=10).status_code == 403
    with intruder.connect() as conn:
        assert lifecycle.complete(conn, mine, 1, "intruder", {}, None, lease.lease_token) is not None
    # Finished: the lease is gone, and with it every way to its objects.
    assert requests.put(_lease_url(settings, mine, 1, "outputs", f"jobs/{mine}/output"), data=b"rewritten",
                        headers=bearer, timeout=10).status_code == 403
    assert get(mine, "inputs", "mine/in").status_code == 403
    assert services.store.get_bytes(settings.bucket_outputs, f"jobs/{mine}/output") == b"out"


def test_a_receipt_is_written_once_and_only_by_its_proof(intruder, settings, services, live_api):
    import requests

    from nexus.proofs.objects import receipt_key

    proof = submit(services, {"type": "proof", "payload": {"kind": "poc", "nonce_end": 16, "segment_size": 16,
                                                           "options": {"preset": "tiny"}},
                              "requirements": {"tier": "gpu_peer"}})
    with intruder.connect() as conn:
        lease = lifecycle.claim(conn, proof, 1, "intruder", 60)
    bearer = {"Authorization": f"Bearer {lease.lease_token}"}
    url = _lease_url(settings, proof, 1, "receipts", receipt_key(proof))
    assert requests.put(url, data=b'{"receipt": 1}', headers=bearer, timeout=10).status_code == 201
    again = requests.put(url, data=b'{"receipt": "forged"}', headers=bearer, timeout=10)
    assert again.status_code == 409 and again.json()["error"]["code"] == "receipt_exists"
    other_key = receipt_key(uuid.uuid4())  # another proof's receipt
    assert requests.put(_lease_url(settings, proof, 1, "receipts", other_key), data=b"{}", headers=bearer,
                        timeout=10).status_code == 403
    assert requests.delete(url, headers=bearer, timeout=10).status_code == 405
    assert services.store.get_bytes(settings.bucket_receipts, receipt_key(proof)) == b'{"receipt": 1}'


def job_state(services, job_id) -> str:
    with services.engine.connect() as conn:
        return conn.execute(text("SELECT state FROM jobs WHERE id = :id"), {"id": job_id}).scalar_one()


def test_the_worker_still_runs_jobs(services, worker):
    """The positive control: the same credentials run a job end to end (the whole suite does, too)."""
    job_id = submit(services, {"type": "noop", "payload": {"echo": "restricted"}})
    wait_for(lambda: job_state(services, job_id) in ("succeeded", "failed"), timeout=60, what="noop finished")
    with services.engine.connect() as conn:
        row = conn.execute(text("SELECT state, result FROM jobs WHERE id = :id"), {"id": job_id}).one()
    assert tuple(row) == ("succeeded", {"echo": "restricted"})


def test_a_worker_writes_only_the_model_instance_it_holds(intruder, services):
    """Instance rows only through the worker's functions, each fenced by the token its taker drew: no
    table write, no other node's instance, no instance another worker holds."""
    from nexus.models import catalog
    from nexus.models.catalog import InstanceState, ModelSpec
    from nexus.models.placement import ParallelismPlan

    with services.engine.begin() as conn:
        catalog.insert_model(conn, ModelSpec(name="held", source="/models/held", max_model_len=64), replace=True)
        theirs = catalog.create_instance(conn, "held", ParallelismPlan.from_dict({}))
        conn.execute(text("UPDATE model_instances SET node_id = 'their-node' WHERE id = :id"), {"id": theirs["id"]})
    assert refused(intruder, "UPDATE model_instances SET state = 'error', error = 'forged' WHERE id = :id",
                   {"id": theirs["id"]})
    assert refused(intruder, "INSERT INTO model_instances (id, model) VALUES (:id, 'held')", {"id": uuid.uuid4()})
    with intruder.connect() as conn:
        # Another node's pending instance: neither adopted nor taken by id.
        assert catalog.adopt_held_instance(conn, "held", "intruder-node", "intruder@x") is None
        assert catalog.take_held_instance(conn, theirs["id"], "held", "intruder-node", "intruder@x") is None
        mine = catalog.start_held_instance(conn, "held", "intruder-node", "intruder@x")
        assert mine is not None and mine["worker_token"] is not None
        # Its own, with its token: yes; anyone else's, or its own with a guessed token: no.
        assert catalog.set_held_instance_state(conn, mine["id"], mine["worker_token"], InstanceState.RUNNING)
        assert catalog.set_held_instance_state(conn, theirs["id"], mine["worker_token"], InstanceState.ERROR) is None
        assert catalog.set_held_instance_state(conn, mine["id"], uuid.uuid4(), InstanceState.ERROR) is None
        assert catalog.held_instance_heartbeat(conn, theirs["id"], uuid.uuid4(), "held", "n", "w") is None
        assert catalog.held_instance_heartbeat(conn, mine["id"], mine["worker_token"], "held", "n", "w") == "running"
    with services.engine.connect() as conn:
        states = dict(conn.execute(text("SELECT id, state FROM model_instances")).all())
    assert states == {theirs["id"]: "pending", mine["id"]: "running"}


def test_a_worker_cannot_pass_the_child_limit_through_its_own_lease(intruder, services, settings):
    """The fan-out limit is the database function's, not only the worker's Python: a worker calling the
    function itself with more children than NEXUS_MAX_CHILDREN_PER_JOB gets none of them."""
    from nexus.jobs.fanout import TooManyChildren
    from nexus.jobs.submit import build_spec

    parent = submit(services, {"type": "noop", "requirements": {"tier": "gpu_peer"}})
    with intruder.connect() as conn:
        lease = lifecycle.claim(conn, parent, 1, "intruder", 60)
    limit = settings.max_children_per_job
    specs = [build_spec({"type": "noop", "requirements": {"tier": "gpu_peer"}}, settings, tenant="default",
                        parent_id=parent) for _ in range(limit + 1)]
    with intruder.connect() as conn:
        with pytest.raises(TooManyChildren):
            children.insert_children(conn, Lease(parent, 1, lease.lease_token), specs)
    with intruder.connect() as conn:  # up to the limit, in two calls: the second sees the first's
        assert len(children.insert_children(conn, Lease(parent, 1, lease.lease_token), specs[:limit - 1])) == limit - 1
        with pytest.raises(TooManyChildren):
            children.insert_children(conn, Lease(parent, 1, lease.lease_token), specs[limit - 1:])
    with services.engine.connect() as conn:
        count = conn.execute(text("SELECT count(*) FROM jobs WHERE parent_id = :id"), {"id": parent}).scalar_one()
    assert count == limit - 1
