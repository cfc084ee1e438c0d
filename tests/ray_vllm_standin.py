"""Stands in for `vllm serve` where no GPU exists: the Ray half of vLLM's start, then /health.

vLLM cannot run here (no GPU, and its wheel needs CUDA torch), so the multi-node
test puts this in its place, through NEXUS_VLLM_EXECUTABLE. It takes the command
line Nexus builds (refusing any option it does not know) and does what vLLM 0.33's
`initialize_ray_cluster` does with `--distributed-executor-backend ray`:
ray.init(address=None), which reads RAY_ADDRESS; a placement group of
tensor x pipeline bundles of {"GPU": 1} with the PACK strategy, waited for; one
actor per bundle, as vLLM places its workers; the driver on the node named by
VLLM_HOST_IP. Then it answers /health and /v1/models like vLLM's server, and
writes what it found to $VLLM_STANDIN_REPORT_DIR/<port>.json (a VLLM_ name: `vllm serve` gets only
such variables from the worker, nexus.serving.backends.vllm_backend.vllm_env). It generates nothing:
the model's layers are what a GPU would run. SIGTERM ends it; the placement
group goes with its driver.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path


def parse(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="vllm", allow_abbrev=False)
    parser.add_argument("command", choices=["serve"])
    parser.add_argument("model")
    parser.add_argument("--served-model-name", required=True)
    parser.add_argument("--host", required=True)
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--tensor-parallel-size", type=int, required=True)
    parser.add_argument("--pipeline-parallel-size", type=int, required=True)
    parser.add_argument("--gpu-memory-utilization", type=float, required=True)
    parser.add_argument("--distributed-executor-backend", choices=["ray", "mp"], required=True)
    parser.add_argument("--max-model-len", type=int)
    parser.add_argument("--api-key")
    return parser.parse_args(argv)  # an option Nexus should not send exits 2


def form_placement_group(args: argparse.Namespace) -> dict:
    import ray
    from ray.util.placement_group import placement_group, placement_group_table
    from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

    ray.init(address=None, logging_level="ERROR", log_to_driver=False)  # as vLLM: RAY_ADDRESS names the cluster
    world_size = args.tensor_parallel_size * args.pipeline_parallel_size
    group = placement_group([{"GPU": 1.0} for _ in range(world_size)], strategy="PACK")
    ray.get(group.ready(), timeout=300)

    @ray.remote(num_gpus=1, num_cpus=0)
    class Worker:  # one per bundle, where vLLM puts a GPU worker
        def where(self) -> dict:
            return {"address": ray.util.get_node_ip_address(), "node_id": ray.get_runtime_context().get_node_id(),
                    "cuda_visible_devices": os.environ.get("CUDA_VISIBLE_DEVICES")}

    workers = [Worker.options(scheduling_strategy=PlacementGroupSchedulingStrategy(group, i)).remote()
               for i in range(world_size)]
    table = placement_group_table(group)
    driver_node = ray.get_runtime_context().get_node_id()
    nodes = {n["NodeID"]: n["NodeManagerAddress"] for n in ray.nodes() if n["Alive"]}
    return {"world_size": world_size, "placement_group": group.id.hex(), "state": table["state"],
            "bundles": [table["bundles"][i] for i in range(world_size)],
            "bundle_addresses": [nodes[table["bundles_to_node_id"][i]] for i in range(world_size)],
            "workers": ray.get([w.where.remote() for w in workers], timeout=300),
            "driver_address": nodes[driver_node], "vllm_host_ip": os.environ.get("VLLM_HOST_IP"),
            "_keep": (group, workers)}


def serve(args: argparse.Namespace, report: dict) -> None:
    models = {"object": "list", "data": [{"id": args.served_model_name, "object": "model"}]}

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # noqa: N802 (http.server's name)
            body = {"/health": {}, "/v1/models": models}.get(self.path)
            self.send_response(200 if body is not None else 404)
            self.send_header("Content-Type", "application/json")
            self.end_headers()
            self.wfile.write(json.dumps(body if body is not None else {"error": "not here"}).encode())

        def log_message(self, *args) -> None:
            pass

    server = ThreadingHTTPServer((args.host, args.port), Handler)
    signal.signal(signal.SIGTERM, lambda *_: threading.Thread(target=server.shutdown).start())
    folder = os.environ.get("VLLM_STANDIN_REPORT_DIR")
    if folder:
        public = {k: v for k, v in report.items() if not k.startswith("_")}
        staged = Path(folder, f".{args.port}.json")  # renamed into place: a reader never sees half a report
        staged.write_text(json.dumps({"argv": sys.argv[1:], **public}))
        staged.rename(Path(folder, f"{args.port}.json"))
    server.serve_forever()


def main() -> None:
    args = parse(sys.argv[1:])
    if args.distributed_executor_backend != "ray":
        sys.exit("this stand-in only plays vLLM's Ray start (plans across nodes)")
    report = form_placement_group(args)
    if report["driver_address"] != report["vllm_host_ip"]:
        sys.exit(f"the driver runs on {report['driver_address']}, VLLM_HOST_IP says {report['vllm_host_ip']}")
    serve(args, report)


if __name__ == "__main__":
    main()
