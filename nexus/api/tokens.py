"""API tokens (admin only): create (the secret is shown once), list, revoke."""

from __future__ import annotations

import uuid

from apiflask import APIBlueprint

from nexus import auth
from nexus.api.errors import ApiError
from nexus.api.security import require, services
from nexus.api.views import row_view
from nexus.auth import Role
from nexus.jobs.schemas import TokenRequest

bp = APIBlueprint("tokens", __name__, url_prefix="/api/v1/tokens", tag="Tokens")


@bp.post("")
@bp.input(TokenRequest, arg_name="body")
@bp.doc(security="bearer")
@require()
def create(body: TokenRequest):
    with services().engine.begin() as conn:
        token, row = auth.create_token(conn, body.name, Role(body.role), body.tenant)
    return {**row_view(row), "token": token}, 201


@bp.get("")
@bp.doc(security="bearer")
@require()
def list_tokens():
    with services().statements.connect() as conn:
        return {"tokens": [row_view(r) for r in auth.list_tokens(conn)]}


@bp.delete("/<uuid:token_id>")
@bp.doc(security="bearer")
@require()
def revoke(token_id: uuid.UUID):
    with services().engine.begin() as conn:
        if not auth.revoke_token(conn, token_id):
            raise ApiError(404, f"no active token {token_id}")
    return {"revoked": str(token_id)}
