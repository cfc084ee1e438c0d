"""Nodes: agents register (join token) and heartbeat (node token); admins list, drain, resume, patch, remove."""

from __future__ import annotations

import secrets
import uuid
from datetime import datetime, timezone
from typing import Literal

from apiflask import APIBlueprint
from pydantic import BaseModel, ConfigDict, Field

from nexus import auth
from nexus.nodes import store
from nexus.nodes.hardware import NodeHardware
from nexus.nodes.schemas import HeartbeatRequest, NodePatch, RegisterRequest
from nexus.nodes.states import NodeState
from nexus.nodes.tiers import TierThresholds
from nexus.api.errors import ApiError
from nexus.api.answers import HeartbeatAnswer, NodeList, NodeView, Registered
from nexus.api.security import bearer_token, public, require, services
from nexus.api.views import row_view
from nexus.models.instances import instance_orders

bp = APIBlueprint("nodes", __name__, url_prefix="/api/v1/nodes", tag="Nodes")

NODE_TOKEN_PREFIX = "nxn_"


class NodeListQuery(BaseModel):
    model_config = ConfigDict(extra="forbid")

    tier: Literal["ai_factory", "gpu_peer", "gpu_infra", "cpu_only"] | None = None
    state: NodeState | None = None
    has_gpu: bool | None = None
    model: str | None = Field(None, max_length=200, description="nodes that have this model loaded")


def _required_token(purpose: str) -> str:
    token = bearer_token()
    if token is None:
        raise ApiError(401, f"missing bearer token: send 'Authorization: Bearer <{purpose}>'",
                       headers={"WWW-Authenticate": 'Bearer realm="nexus"'})
    return token


@bp.post("/register")
@public  # outermost: the join token is checked here, not by the API-token check of every route
@bp.input(RegisterRequest, arg_name="body")
@bp.output(Registered, status_code=201)
@bp.doc(security="bearer", description="Authorization: Bearer <join token>. Answers the node token, once.")
def register(body: RegisterRequest):
    token = _required_token("join token")
    hardware = _hardware(body.hardware)
    node_token = NODE_TOKEN_PREFIX + secrets.token_urlsafe(32)
    thresholds = TierThresholds.from_settings(services().settings)
    with services().engine.begin() as conn:
        # The cluster's join token (NEXUS_JOIN_TOKEN or one rotated in live) or a worker-role API token,
        # checked in the transaction that inserts the node, so a revocation cannot slip in between.
        join_token_id = auth.authenticate_join(conn, token)
        if join_token_id is None:
            raise ApiError(401, "invalid, expired or revoked join token",
                           headers={"WWW-Authenticate": 'Bearer error="invalid_token"'})
        try:
            row = store.register(conn, body, hardware, thresholds, node_token, join_token_id)
        except store.NodeNameTaken:
            raise ApiError(409, f"a live node is already named {body.name!r}: remove it first, or give this node "
                                "another name (NEXUS_NODE_NAME)", {"field": "name"}, code="name_taken") from None
    return {"node_id": str(row["id"]), "name": row["name"], "node_token": node_token, "state": row["state"],
            "tier": row["tier"], "gpu_tiers": row["gpu_tiers"]}, 201


MAX_GPUS, MAX_GPU_MB = 64, 100_000_000


def _hardware(description: dict) -> NodeHardware:
    try:
        hardware = NodeHardware.from_dict(description)
    except (ValueError, TypeError) as error:
        raise ApiError(400, f"invalid hardware description: {error}", {"field": "hardware"}) from None
    if len(hardware.gpus) > MAX_GPUS or any(not 0 <= g.memory_free_mb <= g.memory_total_mb <= MAX_GPU_MB
                                            for g in hardware.gpus):
        raise ApiError(400, f"invalid hardware description: at most {MAX_GPUS} GPUs, each with "
                            f"0 <= memory_free_mb <= memory_total_mb <= {MAX_GPU_MB}", {"field": "hardware"})
    return hardware


@bp.post("/<uuid:node_id>/heartbeat")
@public  # the node token is checked by the heartbeat's own UPDATE, in one round trip
@bp.input(HeartbeatRequest, arg_name="beat")
@bp.output(HeartbeatAnswer)
@bp.doc(security="bearer", description="Authorization: Bearer <node token>. Answers the node's state on the master "
                                       "and the model instances it should run.")
def heartbeat(node_id: uuid.UUID, beat: HeartbeatRequest):
    token = _required_token("node token")
    # A beat is one statement (its own transaction: one round trip, not four); a goodbye also
    # forfeits the node's leases, and does both in one transaction.
    stopping = beat.state == "stopped"
    with (services().engine.begin() if stopping else services().statements.connect()) as conn:
        answer = store.heartbeat(conn, node_id, token, beat)
        # The agent reconciles its instance workers against this list at every beat :
        # no route of its own to poll, and no database connection on the agent.
        orders = instance_orders(conn, str(node_id)) if answer is not None and not stopping else []
    if answer is None:  # one answer for a wrong token, another node's token and a removed node: nothing leaks
        raise ApiError(401, "invalid node token, or the node was removed",
                       headers={"WWW-Authenticate": 'Bearer error="invalid_token"'})
    return {**answer.to_dict(), "instances": orders}


@bp.get("")
@bp.input(NodeListQuery, location="query", arg_name="query")
@bp.output(NodeList)
@bp.doc(security="bearer")
@require()
def list_nodes(query: NodeListQuery):
    with services().statements.connect() as conn:
        rows = store.list_nodes(conn, tier=query.tier, state=query.state.value if query.state else None,
                                has_gpu=query.has_gpu, model=query.model)
    measured = _measured()
    return {"nodes": [{**node_view(row), "measured": measured.get(row["name"], [])} for row in rows]}


@bp.get("/<uuid:node_id>")
@bp.output(NodeView)
@bp.doc(security="bearer")
@require()
def get_node(node_id: uuid.UUID):
    with services().statements.connect() as conn:
        row = _found(store.get_node(conn, node_id), node_id)
    return {**node_view(row), "measured": _measured().get(row["name"], [])}


def _measured() -> dict[str, list[dict]]:
    """Node name -> its benchmarks' latest output tok/s per model (what placement prefers)."""
    from nexus.benchmarks import records

    with services().engine.begin() as conn:
        records.record_finished(conn)
        return records.capacity_all(conn)


def _admin_action(action, node_id: uuid.UUID, *args) -> dict:
    with services().engine.begin() as conn:
        try:
            row = action(conn, node_id, *args)
        except store.NodeRemoved:
            raise ApiError(409, f"node {node_id} was removed; a removed node never changes again",
                           {"state": "removed"}) from None
    return node_view(_found(row, node_id))


@bp.post("/<uuid:node_id>/drain")
@bp.output(NodeView)
@bp.doc(security="bearer", description="Stop giving the node work; running jobs finish. Resume undoes it.")
@require()
def drain(node_id: uuid.UUID):
    return _admin_action(store.request_drain, node_id)


@bp.post("/<uuid:node_id>/resume")
@bp.output(NodeView)
@bp.doc(security="bearer", description="Undo a drain, or clear a quarantine.")
@require()
def resume(node_id: uuid.UUID):
    return _admin_action(store.resume, node_id)


@bp.patch("/<uuid:node_id>")
@bp.input(NodePatch, arg_name="changes")
@bp.output(NodeView)
@bp.doc(security="bearer")
@require()
def patch(node_id: uuid.UUID, changes: NodePatch):
    return _admin_action(store.patch, node_id, changes)


@bp.delete("/<uuid:node_id>")
@bp.output(NodeView)
@bp.doc(security="bearer", description="Final: the node token stops working and its running jobs are re-queued.")
@require()
def remove(node_id: uuid.UUID):
    with services().engine.begin() as conn:
        return node_view(_found(store.remove(conn, node_id), node_id))


def _found(row: dict | None, node_id: uuid.UUID) -> dict:
    if row is None:
        raise ApiError(404, f"node {node_id} not found")
    return row


def node_view(row: dict) -> dict:
    view = row_view(row)
    view["heartbeat_age_seconds"] = _age(row)
    return view


def _age(row: dict) -> float | None:
    at = row.get("last_heartbeat_at")
    return None if at is None else round((datetime.now(timezone.utc) - at).total_seconds(), 1)
