"""The local servers are real: started, used with the real clients, stopped, restarted on the same data."""

from __future__ import annotations

import io
import os
import signal
import socket

import psycopg2
import pytest
import redis
from minio import Minio
from minio.error import S3Error

from nexus.localservers import PostgresServer, RedisServer, S3Server, ServerStartError, free_port

pytestmark = pytest.mark.timeout(90)

ACCESS_KEY, SECRET_KEY = "nexus-test-access", "nexus-test-secret-key"


def refuses_connections(port: int) -> bool:
    with socket.socket() as sock:
        return sock.connect_ex(("127.0.0.1", port)) != 0


# --- Redis ---------------------------------------------------------------------------------------

def test_redis_serves_with_password_and_stops(tmp_path):
    server = RedisServer(tmp_path / "redis", password="test-redis-password")
    with server:
        client = server.client()
        client.set("greeting", "hello")
        assert client.get("greeting") == b"hello"
        with pytest.raises(redis.AuthenticationError):
            redis.Redis(port=server.port, password="wrong-password").ping()
        assert redis.Redis.from_url(server.url).get("greeting") == b"hello"
    assert not server.is_running()
    assert refuses_connections(server.port)


def test_redis_keeps_data_across_restarts(tmp_path):
    with RedisServer(tmp_path / "redis") as server:
        server.client().set("durable", "yes")
    with RedisServer(tmp_path / "redis") as again:  # another port, same folder
        assert again.client().get("durable") == b"yes"


def test_redis_replica_follows_its_master_and_refuses_writes(tmp_path):
    with RedisServer(tmp_path / "master", password="master-password") as master, \
            RedisServer(tmp_path / "replica", replica_of=master, password="replica-password") as replica:
        replica.wait_for_sync()
        master.client().set("flag", "on")
        replica_client = replica.client()
        for _ in range(100):
            if replica_client.get("flag") == b"on":
                break
        assert replica_client.get("flag") == b"on"
        with pytest.raises(redis.ReadOnlyError):
            replica_client.set("flag", "off")


def test_start_failure_names_the_cause_with_the_log_tail(tmp_path):
    with socket.socket() as occupier:
        occupier.bind(("127.0.0.1", 0))
        occupier.listen()
        port = occupier.getsockname()[1]
        server = RedisServer(tmp_path / "redis", port=port, start_timeout=5)
        with pytest.raises(ServerStartError, match="(?s)exited with code.*Address already in use"):
            server.start()
    assert not server.is_running()


def test_stop_kills_a_server_that_does_not_stop(tmp_path):
    server = RedisServer(tmp_path / "redis").start()
    pid = server.pid
    os.kill(pid, signal.SIGSTOP)  # frozen: it cannot honour SIGTERM
    server.stop(timeout=0.5)
    assert not server.is_running()
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)


def test_start_is_idempotent(tmp_path):
    with RedisServer(tmp_path / "redis") as server:
        pid = server.pid
        assert server.start().pid == pid


def test_free_port_is_bindable():
    port = free_port()
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", port))


# --- PostgreSQL -------------------------------------------------------------------------------------

def test_postgres_primary_serves_tcp_and_keeps_data(tmp_path):
    with PostgresServer(tmp_path / "pg") as server:
        url = server.create_database("nexus_localservers")
        assert url.endswith(f"127.0.0.1:{server.port}/nexus_localservers")
        assert server.create_database("nexus_localservers") == url  # idempotent
        server.execute("CREATE TABLE kept (value text)", database="nexus_localservers")
        server.execute("INSERT INTO kept VALUES ('across restarts')", database="nexus_localservers")
        assert server.execute("SHOW wal_level") == [("replica",)]
    assert refuses_connections(server.port)
    with PostgresServer(tmp_path / "pg") as again:
        assert again.execute("SELECT value FROM kept", database="nexus_localservers") == [("across restarts",)]


def test_postgres_with_password_refuses_a_wrong_one(tmp_path):
    with PostgresServer(tmp_path / "pg", password="test-pg-password") as server:
        assert server.execute("SELECT current_user") == [("postgres",)]
        with pytest.raises(psycopg2.OperationalError, match="password authentication failed"):
            psycopg2.connect(host="127.0.0.1", port=server.port, user="postgres", password="wrong", dbname="postgres")


def test_postgres_hot_standby_replays_the_primary_and_is_read_only(tmp_path):
    with PostgresServer(tmp_path / "primary", password="test-pg-password") as primary:
        primary.execute("CREATE TABLE specs (id int primary key, body text)")
        with PostgresServer.standby_of(primary, tmp_path / "standby") as standby:
            assert standby.is_standby
            assert standby.execute("SELECT pg_is_in_recovery()") == [(True,)]
            primary.execute("INSERT INTO specs VALUES (1, 'after the base backup')")
            lsn = primary.execute("SELECT pg_current_wal_insert_lsn()::text")[0][0]
            for _ in range(200):
                caught_up = standby.execute("SELECT pg_last_wal_replay_lsn() >= %s::pg_lsn", (lsn,))[0][0]
                if caught_up:
                    break
            assert standby.execute("SELECT body FROM specs WHERE id = 1") == [("after the base backup",)]
            with pytest.raises(psycopg2.errors.ReadOnlySqlTransaction):
                standby.execute("INSERT INTO specs VALUES (2, 'never')")


# --- S3 -------------------------------------------------------------------------------------------------

def test_s3_serves_the_minio_sdk_with_real_keys(tmp_path):
    with S3Server(tmp_path / "s3", access_key=ACCESS_KEY, secret_key=SECRET_KEY) as server:
        client = server.client()
        client.make_bucket("nexus-inputs")
        client.put_object("nexus-inputs", "job/1/input.json", io.BytesIO(b'{"n": 1}'), 8)
        assert client.get_object("nexus-inputs", "job/1/input.json").read() == b'{"n": 1}'
        stranger = Minio(server.endpoint, access_key=ACCESS_KEY, secret_key="not-the-secret-key", secure=False)
        with pytest.raises(S3Error):
            stranger.get_object("nexus-inputs", "job/1/input.json")


def test_two_s3_servers_coexist_and_data_survives_a_restart(tmp_path):
    first = S3Server(tmp_path / "one", access_key=ACCESS_KEY, secret_key=SECRET_KEY)
    second = S3Server(tmp_path / "two", access_key=ACCESS_KEY, secret_key=SECRET_KEY)
    with first, second:
        assert not set(first.internal_ports.values()) & set(second.internal_ports.values())
        first.ensure_buckets("nexus-models")
        first.client().put_object("nexus-models", "tiny/config.json", io.BytesIO(b"{}"), 2)
        assert not second.client().bucket_exists("nexus-models")
    with S3Server(tmp_path / "one", access_key=ACCESS_KEY, secret_key=SECRET_KEY) as again:
        assert again.client().get_object("nexus-models", "tiny/config.json").read() == b"{}"
