"""The agent's HTTP client for the master: register with the join token, heartbeat with the node token.

The meaning of each answer is decided by `interpret` (pure, tested on its
own); the HTTP calls are the thin edge around it. They go to the master's node
API (NEXUS_NODE_API_URL) when one is configured, so user traffic cannot starve them.

    POST {api}/api/v1/nodes/register          Authorization: Bearer <join token>
        {name, hardware, queues, agent_version, labels}
        201 -> {node_id, node_token, name, state, tier, gpu_tiers}
    POST {api}/api/v1/nodes/<id>/heartbeat    Authorization: Bearer <node token>
        {state, resources, running_jobs, loaded_models, agent_version, workers, sent_at}
        200 -> {state, drain_requested, max_concurrent, labels, instances}
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import requests

from nexus.agent.identity import NodeIdentity
from nexus.config import Settings


class MasterError(Exception):
    """Base of what the master can answer that is not success."""


class MasterUnavailable(MasterError):
    """Network error or 5xx: try again later."""


class RegistrationRefused(MasterError):
    """The join token is missing, wrong or revoked."""


class NodeRevoked(MasterError):
    """The node token no longer works (the node was removed): the agent must stop."""


class BadRequest(MasterError):
    """The master rejected the body: a bug on one side; retrying will not help."""


@dataclass(frozen=True)
class HeartbeatReply:
    state: str  # the node's state on the master: ready, draining, quarantined …
    drain_requested: bool = False
    max_concurrent: int | None = None  # set by an admin (PATCH /nodes/<id>); None: the agent's default
    # The model instances this node should run ({id, model, plan, gpus} each); None: the master
    # did not say (an older master), so the agent leaves its instance workers as they are.
    instances: tuple[dict, ...] | None = None

    @property
    def should_work(self) -> bool:
        return self.state == "ready" and not self.drain_requested


def interpret(status: int, body: Any, during: str) -> dict:
    """The JSON body of a successful answer, or the MasterError that `status` means.

    `during` is "register" or "heartbeat": a 401/403/404 means a bad join token at
    registration, and a revoked or removed node afterwards.
    """
    if 200 <= status < 300:
        if not isinstance(body, dict):
            raise BadRequest(f"{during}: expected a JSON object, got {type(body).__name__}")
        return body
    message = _error_message(body) or f"HTTP {status}"
    if status in (401, 403) or (status == 404 and during == "heartbeat"):
        raise (RegistrationRefused if during == "register" else NodeRevoked)(f"{during}: {message}")
    if status >= 500 or status in (408, 429):
        raise MasterUnavailable(f"{during}: {message}")
    raise BadRequest(f"{during}: {message}")


def registration_identity(body: dict, api_url: str) -> NodeIdentity:
    try:
        return NodeIdentity(node_id=str(body["node_id"]), node_name=str(body["name"]),
                            node_token=str(body["node_token"]), api_url=api_url)
    except KeyError as missing:
        raise BadRequest(f"register: the answer lacks {missing}") from None


def heartbeat_reply(body: dict) -> HeartbeatReply:
    if "state" not in body:
        raise BadRequest("heartbeat: the answer lacks 'state'")
    limit = body.get("max_concurrent")
    return HeartbeatReply(state=str(body["state"]), drain_requested=bool(body.get("drain_requested", False)),
                          max_concurrent=None if limit is None else int(limit),
                          instances=_instance_orders(body.get("instances")))


def _instance_orders(orders: Any) -> tuple[dict, ...] | None:
    if orders is None:
        return None
    if not isinstance(orders, list) or not all(isinstance(o, dict) and {"id", "model"} <= o.keys() for o in orders):
        raise BadRequest("heartbeat: 'instances' must be a list of objects with an id and a model")
    return tuple(orders)


class MasterClient:
    """`api_url` names the master (the stored identity belongs to it); `node_api_url`, when given, is
    where the requests go: the master's node API, whose threads user traffic cannot hold."""

    def __init__(self, api_url: str, timeout_seconds: float = 10.0, session: requests.Session | None = None,
                 node_api_url: str = "") -> None:
        self.api_url = api_url.rstrip("/")
        self.send_to = (node_api_url or api_url).rstrip("/")
        self._timeout = timeout_seconds
        self._session = session or requests.Session()

    @classmethod
    def for_settings(cls, settings: Settings) -> "MasterClient":
        return cls(settings.public_api_url, settings.agent_request_timeout_seconds,
                   node_api_url=settings.agent_api_url)

    def register(self, join_token: str, body: dict) -> NodeIdentity:
        answer = self._post("/api/v1/nodes/register", join_token, body, "register")
        return registration_identity(answer, self.api_url)

    def heartbeat(self, identity: NodeIdentity, body: dict) -> HeartbeatReply:
        answer = self._post(f"/api/v1/nodes/{identity.node_id}/heartbeat", identity.node_token, body, "heartbeat")
        return heartbeat_reply(answer)

    def close(self) -> None:
        self._session.close()

    def _post(self, path: str, token: str, body: dict, during: str) -> dict:
        try:
            response = self._session.post(self.send_to + path, json=body, timeout=self._timeout,
                                          headers={"Authorization": f"Bearer {token}"})
        except requests.RequestException as error:
            raise MasterUnavailable(f"{during}: {error}") from error
        return interpret(response.status_code, _json_or_none(response), during)


def _json_or_none(response: requests.Response) -> Any:
    try:
        return response.json()
    except ValueError:
        return None


def _error_message(body: Any) -> str:
    # The API's one error shape: {"error": {"code", "message", "details"}}.
    if isinstance(body, dict) and isinstance(body.get("error"), dict):
        return str(body["error"].get("message") or body["error"].get("code") or "")
    return ""
