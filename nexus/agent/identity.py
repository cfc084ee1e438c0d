"""The node's identity: the id and token the master gave it, kept in the data directory.

A restart re-uses the stored token instead of registering a second node.
When the master revokes the token (the admin removed the node) the file is
kept: re-joining is an operator's decision, made by deleting it.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path

IDENTITY_FILE = "agent/node.json"


@dataclass(frozen=True)
class NodeIdentity:
    node_id: str
    node_name: str
    node_token: str
    api_url: str  # the master it registered with; another master means another identity


def identity_path(data_dir: Path) -> Path:
    return Path(data_dir).expanduser() / IDENTITY_FILE


def load_identity(data_dir: Path, api_url: str) -> NodeIdentity | None:
    """The stored identity for this master, or None (never registered, or registered elsewhere)."""
    path = identity_path(data_dir)
    try:
        data = json.loads(path.read_text())
        identity = NodeIdentity(**{key: str(data[key]) for key in NodeIdentity.__dataclass_fields__})
    except FileNotFoundError:
        return None
    except (json.JSONDecodeError, KeyError, TypeError) as error:
        raise ValueError(f"{path} is corrupt ({error!r}); delete it to register again") from None
    return identity if identity.api_url.rstrip("/") == api_url.rstrip("/") else None


def save_identity(data_dir: Path, identity: NodeIdentity) -> Path:
    """Write atomically and readable by the owner only: the token is a credential."""
    path = identity_path(data_dir)
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_suffix(".tmp")
    descriptor = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(descriptor, "w") as handle:
        json.dump(asdict(identity), handle, indent=2)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(temporary, path)
    return path
