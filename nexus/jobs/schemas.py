"""The shapes of job requests and responses, shared by the API (validation, OpenAPI) and the client."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field, StrictInt

MAX_BULK_JOBS = 10_000


class JobRequest(BaseModel):
    """One job to submit. Payload checks specific to the job type happen after this shape check."""

    model_config = ConfigDict(extra="forbid")

    type: str = Field(min_length=1, max_length=64, description="a registered job type, e.g. noop, sleep")
    payload: Any = Field(None, description="JSON given to the job type's handler")
    input_key: str | None = Field(None, min_length=1, max_length=1024,
                                  description="key of an uploaded input object (POST /api/v1/inputs)")
    requirements: dict[str, Any] = Field(default_factory=dict,
                                         description="tier, gpu, min_vram_mb, model, labels, node")
    priority: StrictInt = Field(5, ge=0, le=9, description="0 lowest .. 9 most urgent")
    max_attempts: StrictInt | None = Field(None, ge=1, le=100)
    idempotency_key: str | None = Field(None, min_length=1, max_length=256,
                                        description="repeating a key returns the first job")
    tenant: str | None = Field(None, min_length=1, max_length=64, pattern=r"^[A-Za-z0-9._-]+$",
                               description="admins only: submit on behalf of a tenant")


class BulkJobRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    jobs: list[JobRequest] = Field(min_length=1, max_length=MAX_BULK_JOBS)


class TokenRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    # No control characters: PostgreSQL refuses a NUL in text (that was a 500), and a name is shown in logs.
    name: str = Field(min_length=1, max_length=200, pattern=r"^[^\x00-\x1f\x7f]+$")
    role: str = Field(pattern=r"^(admin|submitter|worker)$")
    tenant: str = Field("default", min_length=1, max_length=64, pattern=r"^[A-Za-z0-9._-]+$")
    expires_in_seconds: int | None = Field(None, ge=1, le=10 * 365 * 24 * 3600,
                                           description="the token stops working this long after creation; "
                                                       "omitted: never")
