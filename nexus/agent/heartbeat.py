"""Registration and heartbeat bodies (pure), and the periodic heartbeat loop.

The loop knows nothing of HTTP: it calls an injected `send(body) -> HeartbeatReply`
(in production `MasterClient.heartbeat`) every `interval` seconds, hands each
reply to `on_reply`, survives an unreachable master, and ends when the node
is revoked or when asked to stop.
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass
from typing import Callable, Mapping, Sequence

from nexus import __version__
from nexus.nodes.hardware import NodeHardware
from nexus.agent.master import BadRequest, HeartbeatReply, MasterUnavailable, NodeRevoked

log = logging.getLogger(__name__)

AGENT_VERSION = __version__


def registration_body(hardware: NodeHardware, node_name: str, queues: Sequence[str],
                      labels: Mapping[str, str] | None = None) -> dict:
    """What the agent says once: its name, its hardware and the queues its workers consume.
    The master classifies the hardware into tiers itself, with its own thresholds."""
    return {
        "name": node_name,
        "hardware": hardware.to_dict(),
        "queues": list(queues),
        "agent_version": AGENT_VERSION,
        "labels": dict(labels or {}),
    }


def heartbeat_body(
    hardware: NodeHardware,
    *,
    state: str,
    running_jobs: Sequence[str],
    loaded_models: Sequence[str],
    workers: Sequence[Mapping],
    cpu_percent: float | None,
    sent_at: float,
    address: str | None = None,
) -> dict:
    """What the master stores from each beat: the changing resources, not the static description."""
    return {
        "state": state,  # the agent's own view: "ready", "draining" or "stopping"
        "resources": {
            "gpus": [
                {
                    "index": gpu.index,
                    "uuid": gpu.uuid,
                    "memory_total_mb": gpu.memory_total_mb,
                    "memory_free_mb": gpu.memory_free_mb,
                    "utilization_percent": gpu.utilization_percent,
                    "temperature_c": gpu.temperature_c,
                    "power_draw_w": gpu.power_draw_w,
                }
                for gpu in hardware.gpus
            ],
            "ram_available_mb": hardware.ram_available_mb,
            "disk_free_mb": hardware.disk_free_mb,
            "cpu_percent": cpu_percent,
            "address": address,  # where the other members of a multi-node instance reach this node
        },
        "running_jobs": list(running_jobs),
        "loaded_models": list(loaded_models),
        "workers": [dict(worker) for worker in workers],
        "agent_version": AGENT_VERSION,
        "sent_at": sent_at,
    }


@dataclass
class HeartbeatLoop:
    build_body: Callable[[], dict]
    send: Callable[[dict], HeartbeatReply]
    interval_seconds: float
    on_reply: Callable[[HeartbeatReply], None] = lambda reply: None
    clock: Callable[[], float] = time.monotonic

    def __post_init__(self) -> None:
        self.sent = 0
        self.failed = 0
        self.last_reply: HeartbeatReply | None = None

    def run(self, stop: threading.Event) -> str:
        """Beat until `stop` is set ("stopped") or the master revokes the node ("revoked")."""
        while not stop.is_set():
            started = self.clock()
            try:
                self.beat_once()
            except NodeRevoked as error:
                log.error("the master revoked this node (%s): stopping", error)
                return "revoked"
            # Keep the rhythm: a slow beat shortens the wait before the next one.
            stop.wait(max(0.0, self.interval_seconds - (self.clock() - started)))
        return "stopped"

    def beat_once(self) -> HeartbeatReply | None:
        """One beat. None when the master could not be reached or refused the body; NodeRevoked propagates."""
        try:
            reply = self.send(self.build_body())
        except MasterUnavailable as error:
            self.failed += 1
            log.warning("heartbeat failed (%s); retrying in %.1fs", error, self.interval_seconds)
            return None
        except BadRequest as error:
            self.failed += 1
            log.error("the master refused the heartbeat body: %s", error)
            return None
        self.sent += 1
        self.last_reply = reply
        self.on_reply(reply)
        return reply
