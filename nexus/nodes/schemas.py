"""Request shapes of the node routes, shared by the API (validation, OpenAPI) and the agent.

The static hardware description is checked again by `NodeHardware.from_dict`
(its own typed value); these models bound sizes and reject unknown fields.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, StrictInt, StringConstraints

NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,199}$"
JobId = Annotated[str, StringConstraints(max_length=64)]
ModelName = Annotated[str, StringConstraints(max_length=200)]
QueueName = Annotated[str, StringConstraints(min_length=1, max_length=200)]
MEGABYTES = Field(ge=0, le=100_000_000)  # no GPU or disk has more; keeps sums inside the database's integers
LabelKey = Annotated[str, StringConstraints(pattern=r"^[A-Za-z0-9][A-Za-z0-9._/-]{0,62}$")]
LabelValue = Annotated[str, StringConstraints(max_length=200)]
Labels = dict[LabelKey, LabelValue]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class RegisterRequest(_Strict):
    name: str = Field(pattern=NAME_PATTERN, description="unique among live nodes; workers write it into jobs.node")
    hardware: dict[str, Any] = Field(description="NodeHardware.to_dict() of the node")
    queues: list[QueueName] = Field(default_factory=list, max_length=256,
                                    description="queues the node's workers consume")
    agent_version: str = Field(max_length=64)
    labels: Labels = Field(default_factory=dict, max_length=64)


class GpuBeat(_Strict):
    index: StrictInt = Field(ge=0, le=1024)
    uuid: str = Field(max_length=128)
    memory_total_mb: StrictInt = MEGABYTES
    memory_free_mb: StrictInt = MEGABYTES
    utilization_percent: int | None = Field(None, ge=0, le=100)
    temperature_c: int | None = Field(None, ge=-50, le=200)
    power_draw_w: float | None = Field(None, ge=0)


class Resources(_Strict):
    gpus: list[GpuBeat] = Field(default_factory=list, max_length=64)
    ram_available_mb: int | None = Field(None, ge=0, le=1_000_000_000)
    disk_free_mb: int | None = Field(None, ge=0, le=1_000_000_000_000)
    cpu_percent: float | None = Field(None, ge=0, le=100)
    # Where the other nodes reach this one (a multi-node instance's Ray cluster forms on it).
    address: str | None = Field(None, max_length=253, pattern=r"^[A-Za-z0-9.:_-]+$")


class HeartbeatRequest(_Strict):
    # The agent's own view: "draining" while it shuts down, "stopped" as its last word
    # (the master then marks it offline and re-queues whatever it still held).
    state: Literal["ready", "draining", "stopped"] = "ready"
    resources: Resources = Field(default_factory=Resources)
    running_jobs: list[JobId] = Field(default_factory=list, max_length=4096)
    loaded_models: list[ModelName] = Field(default_factory=list, max_length=256)
    workers: list[dict[str, Any]] = Field(default_factory=list, max_length=64)
    agent_version: str = Field("", max_length=64)
    sent_at: float | None = None


class NodePatch(_Strict):
    labels: Labels | None = Field(None, max_length=64, description="replaces the node's labels")
    max_concurrent: int | None = Field(None, ge=1, le=1024, description="jobs the node runs at once; null: default")


class CanFitRequest(_Strict):
    required_mb: StrictInt = Field(ge=0, le=10_000_000, description="VRAM each GPU must have available")
    gpu_count: StrictInt = Field(1, ge=1, le=64)
    tier: Literal["ai_factory", "gpu_peer", "gpu_infra"] | None = Field(
        None, description="the least capable GPU tier acceptable; more capable ones also fit")


class ReservationRequest(_Strict):
    node_id: str = Field(min_length=1, max_length=64)
    gpu_index: StrictInt = Field(ge=0, le=1024)
    memory_mb: StrictInt = Field(ge=1, le=10_000_000)
    ttl_seconds: float = Field(300, gt=0, le=7 * 24 * 3600)
    note: str | None = Field(None, max_length=500)
