"""This node's Ray node for a multi-node instance: the `ray start` child the agent supervises.

The master's answer says, per instance that spans nodes, whether this node is
the head (it runs `vllm serve`) or a member, the head's address, the port block
and the token (nexus.models.ray_clusters). The agent then runs

    head:    ray start --head --block --port GCS --node-ip-address ME --num-gpus N …
    member:  ray start --block --address HEAD:GCS --node-ip-address ME --num-gpus N …

under the orphan guard, in a session of its own, with only the plan's GPUs of this
node visible (Ray counts CUDA_VISIBLE_DEVICES) and the token in its environment,
never on its command line. `--block` keeps `ray start` in the foreground: the
supervisor restarts it when it exits, and SIGTERM makes it stop this node's Ray
processes (raylet, GCS on the head, agents, workers). What is left after the
grace period is killed with its process group, and its temporary folder removed.
`ray stop` is not used: it stops every Ray process of the machine, other
instances' included.
"""

from __future__ import annotations

import shutil
import socket
import sys
from pathlib import Path
from typing import Mapping
from urllib.parse import urlsplit

from nexus.config import Settings
from nexus.models.instances import ray_child_name
from nexus.models.ray_clusters import RayOrder
from nexus.supervisor import ChildSpec


def advertised_address(settings: Settings) -> str:
    """Where the other nodes reach this one: NEXUS_NODE_ADDRESS, else the address of the interface
    that routes towards the master (a UDP socket's connect sends nothing)."""
    if settings.node_address:
        return settings.node_address
    target = urlsplit(settings.agent_api_url or settings.public_api_url).hostname or "127.0.0.1"
    try:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
            probe.connect((target, 9))
            return probe.getsockname()[0]
    except OSError:
        return socket.gethostname()


def temp_dir(settings: Settings, instance_id: str, node_id: str) -> Path:
    """Short: Ray puts Unix sockets under it, and their paths must stay under 108 bytes."""
    return settings.ray_temp_root / f"{instance_id[:8]}-{node_id[:6]}"


def ray_env(base_env: Mapping[str, str], order: RayOrder, address: str) -> dict[str, str]:
    """What every process of the instance's Ray cluster on this node needs: the token, this node's address
    and GPUs. The serving worker on the head gets it too, and passes it on to `vllm serve`."""
    env = dict(base_env)
    env.update(
        RAY_AUTH_MODE="token",  # only holders of this instance's token join or connect
        RAY_AUTH_TOKEN=order.token,
        RAY_USAGE_STATS_ENABLED="0",
        VLLM_HOST_IP=address,  # vLLM checks its workers' addresses against Ray's node addresses
        CUDA_DEVICE_ORDER="PCI_BUS_ID",
        CUDA_VISIBLE_DEVICES=",".join(str(g) for g in order.gpus),
    )
    return env


def serving_env(order: RayOrder, address: str) -> dict[str, str]:
    """The head's serving worker: where `vllm serve` finds the cluster (vLLM calls ray.init(address=None))."""
    return {**ray_env({}, order, address), "RAY_ADDRESS": f"{address}:{order.ports.gcs}"}


def ray_start_command(order: RayOrder, address: str, temp: Path, executable: str = "ray") -> list[str]:
    ports = order.ports
    argv = [executable, "start", "--block", "--disable-usage-stats",
            "--node-ip-address", address,
            "--num-gpus", str(len(order.gpus)),
            "--temp-dir", str(temp),
            "--node-manager-port", str(ports.node_manager),
            "--object-manager-port", str(ports.object_manager),
            "--runtime-env-agent-port", str(ports.runtime_env_agent),
            "--dashboard-agent-grpc-port", str(ports.dashboard_agent_grpc),
            "--dashboard-agent-listen-port", str(ports.dashboard_agent_http),
            "--metrics-export-port", str(ports.metrics_export),
            "--min-worker-port", str(ports.min_worker),
            "--max-worker-port", str(ports.max_worker)]
    if order.head:
        return argv + ["--head", "--port", str(ports.gcs), "--include-dashboard=false"]
    return argv + ["--address", order.gcs_address]


def ray_child(instance: dict, node_id: str, settings: Settings, base_env: Mapping[str, str],
              address: str) -> ChildSpec:
    order = RayOrder.from_dict(instance["ray"])
    temp = temp_dir(settings, str(instance["id"]), node_id)
    temp.mkdir(parents=True, exist_ok=True)
    argv = [sys.executable, "-m", "nexus.agent.orphan_guard",
            *ray_start_command(order, address, temp, settings.ray_executable)]
    return ChildSpec(name=ray_child_name(instance), argv=tuple(argv), env=ray_env(base_env, order, address),
                     kill_group=True)


def remove_temp_dir(settings: Settings, instance_id: str, node_id: str) -> None:
    shutil.rmtree(temp_dir(settings, instance_id, node_id), ignore_errors=True)
