"""GPU placement: can-fit (which nodes and GPUs could take a job) and VRAM reservations that placement honours."""

from __future__ import annotations

import uuid
from datetime import datetime, timezone

from apiflask import APIBlueprint

from nexus.nodes import reservations
from nexus.nodes.fit import can_fit as fit_nodes
from nexus.nodes.schemas import CanFitRequest, ReservationRequest
from nexus.api.errors import ApiError
from nexus.api.answers import CanFit, Released, Reservation, ReservationList
from nexus.api.security import caller, require, services
from nexus.api.views import row_view
from nexus.auth import Role
from nexus.queueing.tiers import Tier

bp = APIBlueprint("gpu", __name__, url_prefix="/api/v1/gpu", tag="GPU placement")


@bp.post("/can-fit")
@bp.input(CanFitRequest, arg_name="body")
@bp.output(CanFit)
@bp.doc(security="bearer", description="Ready nodes with `gpu_count` GPUs of the tier (or better) that each have "
                                       "`required_mb` available after reservations; least capable tier first.")
@require(Role.SUBMITTER)
def can_fit(body: CanFitRequest):
    with services().statements.connect() as conn:
        fleet = reservations.fleet(conn)
        held = reservations.live_reservations(conn)
    fits = fit_nodes(fleet, body.required_mb, body.gpu_count, Tier(body.tier) if body.tier else None, held,
                     datetime.now(timezone.utc))
    return {"fits": bool(fits), "nodes": [fit.to_dict() for fit in fits]}


@bp.post("/reservations")
@bp.input(ReservationRequest, arg_name="body")
@bp.output(Reservation, status_code=201, description="reserved")
@bp.doc(security="bearer", responses={409: "not enough VRAM available, or the node is not ready"})
@require()
def reserve(body: ReservationRequest):
    with services().engine.begin() as conn:
        try:
            row = reservations.reserve(conn, body, owner=caller().name)
        except reservations.ReservationRefused as refused:
            raise ApiError(refused.status, str(refused), refused.details) from None
    return row_view(row), 201


@bp.get("/reservations")
@bp.output(ReservationList)
@bp.doc(security="bearer")
@require()
def list_reservations():
    with services().statements.connect() as conn:
        return {"reservations": [row_view(row) for row in reservations.list_reservations(conn)]}


@bp.delete("/reservations/<uuid:reservation_id>")
@bp.output(Released)
@bp.doc(security="bearer")
@require()
def release(reservation_id: uuid.UUID):
    with services().engine.begin() as conn:
        if not reservations.release(conn, reservation_id):
            raise ApiError(404, f"reservation {reservation_id} not found")
    return {"released": str(reservation_id)}
