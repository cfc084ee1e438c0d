"""API tokens (admin only): create (the secret is shown once, optionally expiring), list, revoke,
rotate the join token live; and, for any token, what it is (its name, role and tenant).
Revoking a worker or join token removes the nodes that registered with it."""

from __future__ import annotations

import uuid

from apiflask import APIBlueprint

from nexus import auth
from nexus.api.errors import ApiError
from nexus.api.answers import Caller, CreatedToken, Revoked, TokenList
from nexus.api.security import caller, require, services, token_cache
from nexus.api.views import row_view
from nexus.auth import Role
from nexus.jobs.schemas import TokenRequest
from nexus.nodes import store

bp = APIBlueprint("tokens", __name__, url_prefix="/api/v1/tokens", tag="Tokens")


@bp.post("")
@bp.input(TokenRequest, arg_name="body")
@bp.output(CreatedToken, status_code=201)
@bp.doc(security="bearer")
@require()
def create(body: TokenRequest):
    with services().engine.begin() as conn:
        token, row = auth.create_token(conn, body.name, Role(body.role), body.tenant,
                                       expires_in_seconds=body.expires_in_seconds)
    return {**row_view(row), "token": token}, 201


@bp.post("/join/rotate")
@bp.output(CreatedToken, status_code=201)
@bp.doc(security="bearer", description="A new join token (shown once); the previous one stops admitting nodes. "
                                       "Nodes that joined with it keep working: revoke it to remove them too.")
@require()
def rotate_join():
    with services().engine.begin() as conn:
        token, row = auth.rotate_join_token(conn)
    return {**row_view(row), "token": token}, 201


@bp.get("/self")
@bp.output(Caller)
@bp.doc(security="bearer", description="The calling token's name, role and tenant: what a client (the console) "
                                       "may show and do with it. Never the secret.")
def whoami():
    principal = caller()
    return {"id": str(principal.token_id), "name": principal.name, "role": principal.role.value,
            "tenant": principal.tenant}


@bp.get("")
@bp.output(TokenList)
@bp.doc(security="bearer")
@require()
def list_tokens():
    with services().statements.connect() as conn:
        return {"tokens": [row_view(r) for r in auth.list_tokens(conn)]}


@bp.delete("/<uuid:token_id>")
@bp.output(Revoked)
@bp.doc(security="bearer")
@require()
def revoke(token_id: uuid.UUID):
    with services().engine.begin() as conn:
        if not auth.revoke_token(conn, token_id):
            raise ApiError(404, f"no active token {token_id}")
        removed = store.remove_registered_with(conn, token_id)  # its nodes stop with it
    token_cache().forget(token_id)  # other API processes refuse it within Settings.auth_cache_seconds
    return {"revoked": str(token_id), "nodes_removed": removed}
