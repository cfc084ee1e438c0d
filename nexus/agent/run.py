"""The node agent process (`nexus agent`): register once, then small periodic loops.

    detect hardware -> register with the join token (or reuse the stored node token)
    -> start one Celery worker per usable GPU (or one CPU worker)
    -> heartbeat every few seconds on a thread; the main loop supervises the workers
       and follows the master's answer: ready runs them, draining/quarantined stops them
    -> one serving worker per model instance the master's answer places on this node
       (nexus.agent.instance_runner), started and stopped as instances come and go
    SIGTERM/SIGINT: tell the master "draining", stop the workers within the grace period
    (Celery's warm shutdown finishes running jobs), then "stopped": the master re-queues
    whatever was still held. A revoked node token stops the agent with exit status 3.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from dataclasses import dataclass

import psutil

from nexus.activity import ActivityBoard
from nexus.agent.detect import Detector, make_detector
from nexus.agent.heartbeat import HeartbeatLoop, heartbeat_body, registration_body
from nexus.agent.identity import NodeIdentity, load_identity, save_identity
from nexus.agent.instance_runner import InstanceRunner
from nexus.agent.ray_node import advertised_address
from nexus.agent.master import (BadRequest, HeartbeatReply, MasterClient, MasterUnavailable, NodeRevoked,
                                RegistrationRefused)
from nexus.supervisor import RestartPolicy, Supervisor
from nexus.worker.processes import worker_specs
from nexus.nodes.tiers import TierThresholds, WorkerPlan, plan_workers
from nexus.config import Settings
from nexus.queueing.health import StuckWorkers
from nexus.queueing.routing import node_queue

log = logging.getLogger(__name__)

EXIT_OK, EXIT_REFUSED, EXIT_REVOKED = 0, 2, 3
POLL_SECONDS = 0.5


class AgentRefused(Exception):
    """The master will not have this node (bad join token, name taken, bad body): retrying will not help."""


@dataclass
class AgentParts:
    """What the agent talks to; tests and `nexus dev` build their own."""

    detector: Detector
    client: MasterClient
    board: ActivityBoard


def node_name(settings: Settings, hardware_hostname: str) -> str:
    return settings.node_name or hardware_hostname


class Agent:
    def __init__(self, settings: Settings, parts: AgentParts | None = None) -> None:
        self.settings = settings
        self.parts = parts or AgentParts(make_detector(settings),
                                         MasterClient.for_settings(settings),
                                         ActivityBoard.for_settings(settings))
        self.thresholds = TierThresholds.from_settings(settings)
        self.stop_requested = threading.Event()
        self._reply: HeartbeatReply | None = None
        self._revoked = threading.Event()
        self._draining = False
        self._worker_status: list[dict] = []
        self.address = advertised_address(settings)

    # --- the whole life ------------------------------------------------------------------------
    def run(self) -> int:
        hardware = self.parts.detector.detect()
        # Every worker also consumes the node's own queue: jobs pinned to this node (benchmarks).
        plans = plan_workers(hardware, self.thresholds, self.settings.worker_take_lower_tiers,
                             extra_queues=[node_queue(node_name(self.settings, hardware.hostname))])
        try:
            identity = self._identity(hardware, plans)
        except AgentRefused as refused:
            log.error("the master refused this node: %s", refused)
            return EXIT_REFUSED
        if identity is None:
            return EXIT_OK  # stopped while the master was unreachable
        log.info("node %s (%s) registered as %s; workers: %s", identity.node_name, hardware.hostname,
                 identity.node_id, ", ".join(f"{p.name}->{'+'.join(p.queues)}" for p in plans))
        beats = HeartbeatLoop(lambda: self._beat_body(identity), lambda body: self.parts.client.heartbeat(identity, body),
                              self.settings.heartbeat_interval_seconds, on_reply=self._on_reply)
        beat_stop = threading.Event()
        beater = threading.Thread(target=self._beat, args=(beats, beat_stop), name="heartbeat", daemon=True)
        beater.start()
        try:
            self._supervise(identity, plans)
        finally:
            beat_stop.set()
            beater.join(timeout=self.settings.agent_request_timeout_seconds + 1)
        if self._revoked.is_set():
            return EXIT_REVOKED
        self._say_goodbye(identity)
        return EXIT_OK

    def request_stop(self, *_signal_args) -> None:
        self.stop_requested.set()

    # --- registration ----------------------------------------------------------------------------
    def _identity(self, hardware, plans: list[WorkerPlan]) -> NodeIdentity | None:
        """The stored identity for this master, or a new one; retries while the master is unreachable."""
        api_url = self.parts.client.api_url
        identity = load_identity(self.settings.data_dir, api_url)
        if identity is not None:
            log.info("re-using the node token stored in %s", self.settings.data_dir)
            return identity
        queues = list(dict.fromkeys(q for plan in plans for q in plan.queues))
        body = registration_body(hardware, node_name(self.settings, hardware.hostname), queues)
        delay = 0.5
        while not self.stop_requested.is_set():
            try:
                identity = self.parts.client.register(self.settings.join_token, body)
            except MasterUnavailable as error:
                log.warning("cannot register yet (%s); retrying in %.1fs", error, delay)
                self.stop_requested.wait(delay)
                delay = min(delay * 2, 30.0)
                continue
            except (RegistrationRefused, BadRequest) as error:
                raise AgentRefused(str(error)) from None
            save_identity(self.settings.data_dir, identity)
            return identity
        return None

    # --- heartbeats --------------------------------------------------------------------------------
    def _beat(self, beats: HeartbeatLoop, stop: threading.Event) -> None:
        if beats.run(stop) == "revoked":
            self._revoked.set()
            self.stop_requested.set()

    def _beat_body(self, identity: NodeIdentity, state: str | None = None) -> dict:
        return heartbeat_body(self.parts.detector.detect(), state=state or ("draining" if self._draining else "ready"),
                              running_jobs=self.parts.board.running_jobs(),
                              loaded_models=self.parts.board.loaded_models(),
                              workers=self._worker_status, cpu_percent=psutil.cpu_percent(None),
                              sent_at=time.time(), address=self.address)

    def _on_reply(self, reply: HeartbeatReply) -> None:
        if self._reply is None or reply.state != self._reply.state:
            log.info("the master says this node is %s%s", reply.state,
                     " (drain requested)" if reply.drain_requested else "")
        self._reply = reply

    def _say_goodbye(self, identity: NodeIdentity) -> None:
        """Last word: stopped, so the master re-queues now whatever a killed worker still held."""
        try:
            self.parts.client.heartbeat(identity, self._beat_body(identity, state="stopped"))
        except (MasterUnavailable, NodeRevoked, BadRequest) as error:
            log.warning("could not tell the master this node stopped (%s); it will notice from the silence", error)

    # --- supervision ------------------------------------------------------------------------------
    def _supervise(self, identity: NodeIdentity, plans: list[WorkerPlan]) -> None:
        concurrency = self.settings.worker_concurrency
        supervisor = self._supervisor(identity, plans, concurrency)
        instances = InstanceRunner(identity.node_id, identity.node_name, self.settings, os.environ,
                                   RestartPolicy.from_settings(self.settings),
                                   unhealthy=StuckWorkers.for_settings(self.settings), address=self.address)
        try:
            while not self.stop_requested.wait(POLL_SECONDS):
                reply = self._reply
                wanted = self._wanted_concurrency(reply, plans, concurrency)
                if wanted != concurrency and supervisor.running:
                    log.info("max_concurrent is now %s: restarting the workers", wanted)
                    supervisor.stop(self.settings.agent_drain_grace_seconds)
                    concurrency, supervisor = wanted, self._supervisor(identity, plans, wanted)
                self._follow(reply, supervisor)
                instances.follow(reply, self._inference_concurrency(reply))
                supervisor.poll()
                instances.poll()
                self._worker_status = supervisor.status() + instances.status()
        finally:
            self._draining = True
            if supervisor.running:
                log.info("draining: workers finish their jobs (up to %.0fs)", self.settings.agent_drain_grace_seconds)
            # Both sets drain at once: the grace period is the node's, not each set's.
            grace = self.settings.agent_drain_grace_seconds
            instances_stopping = threading.Thread(target=instances.stop, args=(grace,), name="instances-stop")
            instances_stopping.start()
            supervisor.stop(grace)
            instances_stopping.join()

    def _inference_concurrency(self, reply: HeartbeatReply | None) -> int:
        """Requests in flight per serving worker: the admin's max_concurrent, else the configured default."""
        return (reply.max_concurrent if reply is not None else None) or self.settings.inference_concurrency

    def _wanted_concurrency(self, reply: HeartbeatReply | None, plans: list[WorkerPlan], current: int) -> int:
        """The admin's max_concurrent (else the configured default) for the CPU worker; GPU workers
        always run one job at a time (solo pool), so a GPU-only node never restarts for it."""
        if reply is None or not any(plan.gpu_index is None for plan in plans):
            return current
        return reply.max_concurrent or self.settings.worker_concurrency

    def _follow(self, reply: HeartbeatReply | None, supervisor: Supervisor) -> None:
        """Run the workers while the master says ready; drain them when it says otherwise."""
        if reply is None:
            return  # no answer yet: neither start nor stop
        if reply.should_work and not supervisor.running:
            supervisor.start()
        elif not reply.should_work and supervisor.running:
            log.info("node is %s: draining its workers", reply.state)
            supervisor.stop(self.settings.agent_drain_grace_seconds)

    def _supervisor(self, identity: NodeIdentity, plans: list[WorkerPlan], concurrency: int) -> Supervisor:
        settings = self.settings.model_copy(update={"worker_concurrency": concurrency})
        specs = worker_specs(plans, identity.node_id, identity.node_name, settings, os.environ)
        # Restart a worker that is alive but does not consume (celery#8030): nexus.queueing.health.
        return Supervisor(specs, RestartPolicy.from_settings(self.settings),
                          unhealthy=StuckWorkers.for_settings(self.settings))
