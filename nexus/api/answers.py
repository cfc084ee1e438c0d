"""The answers of the node, token, GPU, cluster, proof and input routes, as pydantic models.

As the job routes' (`api/views.py`): each view's answer passes through its model on the way out
(APIFlask's `output`) and the OpenAPI document shows the same model. Views that answer a whole row
(a node, a token, a reservation) allow fields beyond those declared, so a column added to the row
still reaches clients; the declared ones are those clients rely on.
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field
from pydantic.config import JsonDict

from nexus.api.views import JobView

_UUID: JsonDict = {"format": "uuid"}
_TIME: JsonDict = {"format": "date-time"}


class _Row(BaseModel):
    model_config = ConfigDict(extra="allow")


# --- nodes ------------------------------------------------------------------------------------
class Registered(BaseModel):
    node_id: str = Field(json_schema_extra=_UUID)
    name: str
    node_token: str = Field(description="shown once: the node's own token for its heartbeats")
    state: str
    tier: str
    gpu_tiers: dict[str, str] = Field(description="GPU index -> its tier")


class HeartbeatAnswer(BaseModel):
    state: str = Field(description="the node's state after this beat")
    drain_requested: bool
    max_concurrent: int | None
    labels: dict[str, Any]
    instances: list[dict[str, Any]] = Field(description="the model instances this node should run")


class NodeView(_Row):
    id: str = Field(json_schema_extra=_UUID)
    name: str
    state: str
    drain_requested: bool
    tier: str
    gpu_tiers: dict[str, str] = Field(description="GPU index -> its tier")
    queues: list[str]
    gpu_count: int
    vram_total_mb: int
    hardware: Any
    resources: Any
    running_jobs: Any
    loaded_models: Any
    labels: Any
    max_concurrent: int | None
    consecutive_failures: int
    registered_at: str | None = Field(json_schema_extra=_TIME)
    last_heartbeat_at: str | None = Field(json_schema_extra=_TIME)
    heartbeat_age_seconds: float | None
    measured: list[dict[str, Any]] | None = Field(None, description="its benchmarks' latest tok/s per model")


class NodeList(BaseModel):
    nodes: list[NodeView]


# --- tokens -----------------------------------------------------------------------------------
class TokenView(_Row):
    id: str = Field(json_schema_extra=_UUID)
    name: str
    prefix: str | None
    role: str
    tenant: str
    kind: str
    created_at: str = Field(json_schema_extra=_TIME)
    expires_at: str | None = Field(json_schema_extra=_TIME)
    revoked_at: str | None = Field(json_schema_extra=_TIME)


class CreatedToken(TokenView):
    token: str = Field(description="the secret, shown this once")


class TokenList(BaseModel):
    tokens: list[TokenView]


class Caller(BaseModel):
    id: str = Field(json_schema_extra=_UUID)
    name: str
    role: str
    tenant: str


class Revoked(BaseModel):
    revoked: str = Field(json_schema_extra=_UUID)
    nodes_removed: int = Field(description="nodes that had registered with it")


# --- GPU placement ----------------------------------------------------------------------------
class FitGpu(BaseModel):
    index: int
    tier: str
    available_mb: int


class FitNode(BaseModel):
    node_id: str = Field(json_schema_extra=_UUID)
    tier: str
    gpus: list[FitGpu]
    chosen: list[int]


class CanFit(BaseModel):
    fits: bool
    nodes: list[FitNode]


class Reservation(_Row):
    id: str = Field(json_schema_extra=_UUID)
    node_id: str = Field(json_schema_extra=_UUID)
    gpu_index: int
    memory_mb: int
    owner: str
    note: str | None
    created_at: str = Field(json_schema_extra=_TIME)
    expires_at: str = Field(json_schema_extra=_TIME)


class ReservationList(BaseModel):
    reservations: list[Reservation]


class Released(BaseModel):
    released: str = Field(json_schema_extra=_UUID)


# --- the cluster ------------------------------------------------------------------------------
class TierTotals(BaseModel):
    nodes: int
    nodes_by_state: dict[str, int]
    gpus: int
    vram_total_mb: int
    vram_free_mb: int
    vram_reserved_mb: int


class Totals(BaseModel):
    nodes: int
    gpus: int
    vram_total_mb: int
    vram_free_mb: int
    vram_reserved_mb: int


class ClusterView(BaseModel):
    tiers: dict[str, TierTotals]
    totals: Totals
    queues: dict[str, int] = Field(description="messages in the broker per queue (tenants' shares, not backlogs)")
    jobs: dict[str, int] = Field(description="jobs per active state")


# --- proofs -----------------------------------------------------------------------------------
class ProofView(BaseModel):
    id: str = Field(json_schema_extra=_UUID)
    state: str
    tenant: str
    attempt: int
    progress: Any = Field(description='{"done": segments proven, "total": segments}')
    error: str | None
    node: str | None
    created_at: str = Field(json_schema_extra=_TIME)
    started_at: str | None = Field(json_schema_extra=_TIME)
    finished_at: str | None = Field(json_schema_extra=_TIME)
    request: Any
    summary: Any
    segments: dict[str, int] = Field(description="segment jobs per state")
    verdicts: list[dict[str, Any]]
    verified: bool | None = Field(description="the latest verification's verdict; null before any")
    proven_weight: dict[str, int] = Field(description="valid nonces per node, once verified")
    receipt: Any = Field(description="the receipt inline, when small enough")
    receipt_url: str | None = Field(description="a short-lived presigned GET of the receipt")


class VerifyStarted(BaseModel):
    proof_id: str = Field(json_schema_extra=_UUID)
    verify_job: JobView


class Weights(BaseModel):
    weights: dict[str, int] = Field(description="node name -> accepted valid nonces over verified proofs")


# --- inputs -----------------------------------------------------------------------------------
class Uploaded(BaseModel):
    key: str = Field(description="reference it as a job's input_key")
    size: int
    etag: str
