"""The agent's loop over model instances: one supervised serving worker per instance on this node.

The master answers every heartbeat with the instances placed on this node
(`HeartbeatReply.instances`); `follow` turns the difference with what runs
into starts and stops:

    runner = InstanceRunner(identity.node_id, identity.node_name, settings, os.environ, policy)
    runner.follow(reply, concurrency)    # every pass of the agent's main loop
    runner.poll()                        # reap and restart crashed workers (backoff)
    runner.stop(grace)                   # draining / SIGTERM: every instance worker stops

An instance whose plan spans nodes also has this node's Ray node as a child
(nexus.agent.ray_node): on every member, and on the head beside the serving
worker, which then runs `vllm serve` against that Ray cluster.

A worker's instance states (downloading, starting, running, error) are written
by the worker itself (nexus.serving.host); a deleted instance is already
`stopped` on the master, so the agent only has to stop its process. The
concurrency (the node's max_concurrent) is part of a worker's environment: when
an admin changes it, the workers restart with the new one.
"""

from __future__ import annotations

import logging
from typing import Callable, Mapping

from nexus.agent.master import HeartbeatReply
from nexus.supervisor import ChildSpec, RestartPolicy, Supervisor
from nexus.config import Settings
from nexus.agent.ray_node import ray_child, remove_temp_dir, serving_env
from nexus.models.instances import RAY_CHILD_PREFIX, ray_child_name, reconcile
from nexus.models.ray_clusters import RayOrder
from nexus.worker.processes import instance_child

log = logging.getLogger(__name__)

CONCURRENCY_VARIABLE = "NEXUS_INFERENCE_CONCURRENCY"


class InstanceRunner:
    def __init__(self, node_id: str, node_name: str, settings: Settings, base_env: Mapping[str, str],
                 policy: RestartPolicy, unhealthy: Callable[[int], bool] | None = None,
                 supervisor: Supervisor | None = None, address: str = "127.0.0.1") -> None:
        self.node_id, self.node_name = node_id, node_name
        self.address = address  # where the other members of a multi-node instance reach this node
        self.settings = settings
        self.base_env = dict(base_env)
        self.supervisor = supervisor or Supervisor([], policy, unhealthy=unhealthy)
        self._orders: dict[str, dict] = {}  # child name -> the instance it serves

    def follow(self, reply: HeartbeatReply | None, concurrency: int) -> None:
        """Run the instances the master's last answer names, while it says this node works."""
        if reply is None:
            return  # no answer yet: neither start nor stop
        if not reply.should_work:
            if self.supervisor.running and self.supervisor.children:
                log.info("node is %s: stopping its model instances", reply.state)
            self.supervisor.stop(self.settings.agent_drain_grace_seconds)
            return
        if not self.supervisor.running:
            self.supervisor.start()  # resumes after a drain; children added later start at once
        if reply.instances is None:
            return  # a master that does not send instances: leave them as they are
        children = self.supervisor.children
        stale = [name for name, spec in children.items()
                 if not name.startswith(RAY_CHILD_PREFIX) and _concurrency(spec) != str(concurrency)]
        start, gone = reconcile(reply.instances, [name for name in children if name not in stale])
        if gone or stale:
            log.info("stopping instance workers: %s", ", ".join([*gone, *(f"{n} (max_concurrent)" for n in stale)]))
            self.supervisor.remove([*gone, *stale], self.settings.agent_drain_grace_seconds)
            for name in gone:
                self._forget(name)
        for instance, name in start:
            spec = self._child(instance, name, concurrency)
            log.info("starting %s: model %s, %s requests in flight", spec.name, instance["model"], concurrency)
            self._orders[spec.name] = instance
            self.supervisor.add(spec)

    def _child(self, instance: dict, name: str, concurrency: int) -> ChildSpec:
        """The serving worker of an instance (on the head, with its Ray cluster's address), or this node's Ray node."""
        if name == ray_child_name(instance):
            return ray_child(instance, self.node_id, self.settings, self.base_env, self.address)
        env = self.base_env
        if instance.get("ray"):
            env = {**env, **serving_env(RayOrder.from_dict(instance["ray"]), self.address)}
        return instance_child(instance, self.node_id, self.node_name, self.settings, env, concurrency)

    def _forget(self, name: str) -> None:
        instance = self._orders.pop(name, None)
        if instance is not None and name == ray_child_name(instance):
            remove_temp_dir(self.settings, str(instance["id"]), self.node_id)

    def poll(self) -> None:
        self.supervisor.poll()

    def stop(self, grace_seconds: float) -> None:
        self.supervisor.stop(grace_seconds)
        for name, instance in self._orders.items():
            if name == ray_child_name(instance):
                remove_temp_dir(self.settings, str(instance["id"]), self.node_id)

    def status(self) -> list[dict]:
        """The supervisor's view of each worker, with the instance and model it serves (for heartbeats)."""
        statuses = []
        for entry in self.supervisor.status():
            instance = self._orders.get(entry["name"], {})
            statuses.append({**entry, "instance_id": instance.get("id"), "model": instance.get("model")})
        return statuses


def _concurrency(spec: ChildSpec) -> str | None:
    return (spec.env or {}).get(CONCURRENCY_VARIABLE)
