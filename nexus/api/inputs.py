"""Input objects: upload bytes once, then reference them from jobs by key."""

from __future__ import annotations

import uuid

from apiflask import APIBlueprint
from flask import request

from nexus.api.errors import ApiError
from nexus.api.answers import Uploaded
from nexus.api.security import caller, require, services
from nexus.auth import Role

bp = APIBlueprint("inputs", __name__, url_prefix="/api/v1/inputs", tag="Inputs")


def tenant_prefix(tenant: str) -> str:
    """Every tenant's inputs live under its own prefix; jobs may only reference their tenant's."""
    return f"{tenant}/"


@bp.post("")
@bp.output(Uploaded, status_code=201)
@bp.doc(security="bearer", description="Body: the raw bytes (any content type); `?name=` names the object. "
                                       "Answer: the key to use as input_key.",
        responses={400: "an empty body or a bad name", 413: "over NEXUS_MAX_INPUT_BYTES"})
@require(Role.SUBMITTER)
def upload():
    request.max_content_length = services().settings.max_input_bytes  # larger than a JSON body's
    data = request.get_data(cache=False)
    if not data:
        raise ApiError(400, "empty body: send the input bytes as the request body")
    name = request.args.get("name", "input")
    if not name.replace("-", "").replace("_", "").replace(".", "").isalnum() or len(name) > 100:
        raise ApiError(400, "name may hold letters, digits, '-', '_' and '.' only", {"field": "name"})
    key = f"{tenant_prefix(caller().tenant)}{uuid.uuid4()}/{name}"
    s = services()
    etag = s.store.put_bytes(s.settings.bucket_inputs, key, data, request.content_type or "application/octet-stream")
    return {"key": key, "size": len(data), "etag": etag}, 201
