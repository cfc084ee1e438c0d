"""Node states, their allowed transitions, and the pure rules that move them.

The master owns a node's state; the agent learns it from heartbeat replies.

    registering ──► ready ◄──────────────► draining
                     │  ▲                    │
       no heartbeat  │  │ heartbeat          │ no heartbeat
                     ▼  │                    ▼
                    stale ──────────────► offline   (no new work; its jobs run on while their leases are renewed)
    ready/draining ──► quarantined ──► ready          (K failures in a row; an admin clears it)
    any state but removed ──► removed                 (node token revoked; terminal)

A draining node that goes silent becomes stale/offline like any other; when it
comes back, `state_on_heartbeat` returns it to draining if the drain is still
requested (the master keeps that wish in a separate `drain_requested` flag so
that liveness and the admin's intent do not overwrite each other).
A quarantined node keeps its state while silent: only an admin clears it.
"""

from __future__ import annotations

from enum import Enum


class NodeState(str, Enum):
    REGISTERING = "registering"  # row created, no heartbeat yet
    READY = "ready"  # heartbeating, takes work
    DRAINING = "draining"  # heartbeating, finishes running jobs, takes no new work
    STALE = "stale"  # missed heartbeats for node_stale_after_seconds; may come back
    OFFLINE = "offline"  # silent for node_offline_after_seconds; its jobs end only when their leases do
    QUARANTINED = "quarantined"  # too many consecutive failures; no work until an admin resumes it
    REMOVED = "removed"  # deleted by an admin; its token is revoked. Terminal.

    @property
    def takes_work(self) -> bool:
        return self is NodeState.READY


ALLOWED_TRANSITIONS: dict[NodeState, frozenset[NodeState]] = {
    NodeState.REGISTERING: frozenset(
        {NodeState.READY, NodeState.DRAINING, NodeState.STALE, NodeState.OFFLINE, NodeState.REMOVED}
    ),
    NodeState.READY: frozenset(
        {NodeState.DRAINING, NodeState.STALE, NodeState.OFFLINE, NodeState.QUARANTINED, NodeState.REMOVED}
    ),
    NodeState.DRAINING: frozenset(
        {NodeState.READY, NodeState.STALE, NodeState.OFFLINE, NodeState.QUARANTINED, NodeState.REMOVED}
    ),
    NodeState.STALE: frozenset({NodeState.READY, NodeState.DRAINING, NodeState.OFFLINE, NodeState.REMOVED}),
    NodeState.OFFLINE: frozenset({NodeState.READY, NodeState.DRAINING, NodeState.REMOVED}),
    NodeState.QUARANTINED: frozenset({NodeState.READY, NodeState.REMOVED}),
    NodeState.REMOVED: frozenset(),
}

# States whose nodes are heartbeating and reachable; the liveness rule only demotes these.
LIVE_STATES = frozenset({NodeState.REGISTERING, NodeState.READY, NodeState.DRAINING})


class InvalidNodeTransition(ValueError):
    def __init__(self, current: NodeState, target: NodeState) -> None:
        allowed = sorted(state.value for state in ALLOWED_TRANSITIONS[current])
        super().__init__(f"node cannot go from {current.value} to {target.value}; allowed: {allowed}")
        self.current = current
        self.target = target


def can_transition(current: NodeState, target: NodeState) -> bool:
    return target in ALLOWED_TRANSITIONS[current]


def transition(current: NodeState, target: NodeState) -> NodeState:
    """`target` if the move is allowed, else InvalidNodeTransition. Staying put is always allowed
    except for removed nodes, which never change again."""
    if current is target and current is not NodeState.REMOVED:
        return target
    if not can_transition(current, target):
        raise InvalidNodeTransition(current, target)
    return target


def liveness_state(
    current: NodeState,
    seconds_since_heartbeat: float,
    stale_after: float,
    offline_after: float,
) -> NodeState | None:
    """The state the reconciler should move a node to given its heartbeat age, or None to leave it.

    Offline wins over stale when both thresholds have passed (a reconciler that
    was itself down must not stop at stale). Quarantined and removed nodes keep
    their state; registering nodes that never heartbeat age out like the rest.
    """
    if current in (NodeState.QUARANTINED, NodeState.REMOVED, NodeState.OFFLINE):
        return None
    if seconds_since_heartbeat >= offline_after:
        return NodeState.OFFLINE
    if seconds_since_heartbeat >= stale_after and current in LIVE_STATES:
        return NodeState.STALE
    return None


def state_on_heartbeat(current: NodeState, drain_requested: bool, agent_draining: bool = False) -> NodeState:
    """The state a node takes when its heartbeat arrives: draining when the admin asked for it or the
    agent itself is shutting down. Removed nodes are refused before this (401)."""
    if current is NodeState.REMOVED:
        raise InvalidNodeTransition(current, NodeState.READY)
    if current is NodeState.QUARANTINED:
        return current
    return NodeState.DRAINING if drain_requested or agent_draining else NodeState.READY
