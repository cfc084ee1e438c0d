"""What every benchmark needs: real servers on 127.0.0.1, prepared settings, worker processes, percentiles."""

from __future__ import annotations

import contextlib
import statistics
import sys
import tempfile
import uuid
from pathlib import Path

from sqlalchemy import create_engine, text

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # `python bench/x.py` from the repository root
    sys.path.insert(0, str(ROOT))

from nexus.config import Settings  # noqa: E402
from nexus.localservers import PostgresServer, RedisServer, S3Server, free_port  # noqa: E402
from nexus.master import prepare_master  # noqa: E402
from tests.support import port_open  # noqa: E402

SYSTEM_PG = "postgresql+psycopg2://postgres@127.0.0.1:5432/postgres"


@contextlib.contextmanager
def bench_cluster(own_postgres: bool = False, **overrides):
    """Redis, S3 and a fresh PostgreSQL database for one benchmark run; yields (Settings, folder).
    `own_postgres`: a PostgreSQL server of the run's own, not the one on 5432 that others share."""
    with tempfile.TemporaryDirectory(prefix="nexus-bench-") as tmp, contextlib.ExitStack() as stack:
        folder = Path(tmp)
        admin_url = SYSTEM_PG
        if own_postgres or not port_open("127.0.0.1", 5432):
            admin_url = stack.enter_context(PostgresServer(folder / "pg")).url
        name = f"nexus_bench_{uuid.uuid4().hex[:8]}"
        admin = create_engine(admin_url, isolation_level="AUTOCOMMIT")
        with admin.connect() as conn:
            conn.execute(text(f'CREATE DATABASE "{name}"'))
        stack.callback(_drop_database, admin, name)
        redis_server = stack.enter_context(RedisServer(folder / "redis"))
        s3 = stack.enter_context(S3Server(folder / "s3", access_key="bench-access", secret_key="bench-secret-key"))
        from sqlalchemy.engine import make_url

        settings = Settings(
            database_url=make_url(admin_url).set(database=name).render_as_string(hide_password=False),
            redis_url=redis_server.url, s3_endpoint=s3.endpoint, s3_access_key="bench-access",
            s3_secret_key="bench-secret-key", admin_token="nx_bench-" + uuid.uuid4().hex, api_port=free_port(),
            node_api_port=free_port(),
            worker_send_events=False, data_dir=folder / "data", **overrides)
        prepare_master(settings)
        yield settings, folder


def _drop_database(admin, name: str) -> None:
    from nexus.db.engine import dispose_engines

    dispose_engines()
    with admin.connect() as conn:
        conn.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
    admin.dispose()


def percentile(values: list[float], p: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(p / 100 * (len(ordered) - 1))))]


def describe_ms(values: list[float]) -> str:
    ms = [v * 1000 for v in values]
    return f"p50 {percentile(ms, 50):7.2f} ms  p99 {percentile(ms, 99):7.2f} ms  mean {statistics.fmean(ms):7.2f} ms"
