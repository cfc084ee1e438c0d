"""Real Redis, PostgreSQL and S3 servers from the package registries, as child processes.

Used by the Docker-free local cluster (`nexus dev`) and by tests:

    with RedisServer(tmp / "redis") as redis_server, S3Server(tmp / "s3", access_key=..., secret_key=...) as s3:
        ...

Each server binds 127.0.0.1 only, keeps its data under the folder it is given
(reused on re-runs), waits until it really answers when started, and stops
cleanly (then is killed) when stopped.
"""

from nexus.localservers.base import LocalServer, ServerStartError, free_port
from nexus.localservers.binaries import BinaryNotFound
from nexus.localservers.postgres import PostgresServer
from nexus.localservers.redis import RedisServer
from nexus.localservers.s3 import S3Server

__all__ = ["BinaryNotFound", "LocalServer", "PostgresServer", "RedisServer", "S3Server", "ServerStartError",
           "free_port"]
