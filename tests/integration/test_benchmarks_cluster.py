"""A benchmark on `nexus dev -n 2` with the tiny model: 8 cells through the CLI with progress, a real
plot, rows and measured capacity on the master, placement following the measurement, bad input as
400s naming the field, and cancel through the job API."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import requests

from nexus.localservers import free_port
from tests.support import wait_for

pytestmark = pytest.mark.timeout(420)

NODES = ["dev-worker-1", "dev-worker-2"]
PLOT_COPY = os.environ.get("NEXUS_TEST_BENCH_PLOT")  # where to keep the plot for a person to look at


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    from nexus.serving.tiny import make_tiny_model

    root = tmp_path_factory.mktemp("bench")
    model_dir = make_tiny_model(root / "tiny")
    data_dir = root / "cluster"
    env = {k: v for k, v in os.environ.items() if not k.startswith("NEXUS_")}
    env.update(NEXUS_API_PORT=str(free_port()), NEXUS_FLOWER_PORT=str(free_port()), NEXUS_HEARTBEAT_INTERVAL_SECONDS="1",
               NEXUS_CLUSTER_FILE=str(data_dir / "cluster.json"), NEXUS_INFERENCE_TORCH_THREADS="1",
               HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", COLUMNS="200")
    # --no-model: the test declares the tiny model itself, unplaced, so it measures temporary instances too
    launcher = subprocess.Popen([sys.executable, "-m", "nexus", "dev", "-n", "2", "--no-model", "--data-dir", str(data_dir)],
                                env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                start_new_session=True)
    try:
        wait_for((data_dir / "cluster.json").exists, timeout=150, interval=0.5, what="cluster.json")
        info = json.loads((data_dir / "cluster.json").read_text())
        api = requests.Session()
        api.headers["Authorization"] = f"Bearer {info['admin_token']}"
        url = info["api_url"]

        def ready():
            nodes = api.get(url + "/api/v1/nodes", timeout=10).json()["nodes"]
            return sorted(n["name"] for n in nodes if n["state"] == "ready")

        wait_for(lambda: ready() == NODES, timeout=120, interval=0.5, what="two ready nodes")
        created = api.post(url + "/api/v1/models", json={"name": "tiny", "source": str(model_dir),
                                                          "max_model_len": 512}, timeout=10)
        assert created.status_code == 201, created.text
        yield {"url": url, "api": api, "env": env, "root": root}
    finally:
        launcher.send_signal(signal.SIGTERM)
        output, _ = launcher.communicate(timeout=90)
    assert launcher.returncode == 0, output[-3000:]


def nexus_cli(env: dict, *args: str, timeout: float = 300) -> str:
    done = subprocess.run([sys.executable, "-m", "nexus", *args], env=env, text=True, capture_output=True,
                          timeout=timeout)
    assert done.returncode == 0, done.stdout + done.stderr
    return done.stdout + done.stderr


def test_bad_benchmarks_are_400s_naming_the_field(cluster):
    url, api = cluster["url"], cluster["api"]
    big = api.post(url + "/api/v1/models", json={"name": "big", "source": "/nowhere", "vram_mb": 8000,
                                                 "min_tier": "gpu_infra"}, timeout=10)
    assert big.status_code == 201, big.text
    good = {"model": "tiny", "batch_sizes": [1], "context_lengths": [32]}
    cases = [
        ({**good, "model": "nope"}, "model"),
        ({**good, "batch_sizes": []}, "batch_sizes"),
        ({**good, "context_lengths": []}, "context_lengths"),
        ({**good, "batch_sizes": list(range(1, 33)), "context_lengths": list(range(1, 33))}, "batch_sizes"),
        ({**good, "context_lengths": [600]}, "context_lengths"),  # past the model's 512 tokens
        ({**good, "nodes": ["no-such-node"]}, "nodes"),
        ({**good, "model": "big", "nodes": ["dev-worker-1"]}, "nodes"),  # a GPU model on a CPU node
        ({**good, "model": "big"}, "nodes"),  # and no node at all can serve it
    ]
    for body, field in cases:
        response = api.post(url + "/api/v1/benchmarks", json=body, timeout=10)
        assert response.status_code == 400, (body, response.text)
        error = response.json()["error"]
        assert error["details"].get("field") == field, (body, error)
    wrong_type = api.post(url + "/api/v1/benchmarks", json={**good, "batch_sizes": ["one"]}, timeout=10)
    assert wrong_type.status_code == 400 and "batch_sizes" in json.dumps(wrong_type.json()["error"]["details"])


def test_a_benchmark_over_two_nodes_measures_eight_cells_and_placement_uses_it(cluster):
    url, api, env, root = cluster["url"], cluster["api"], cluster["env"], cluster["root"]
    plot_path = root / "bench.png"
    out = nexus_cli(env, "bench", "run", "tiny", "-b", "1,4", "-c", "32,128", "--output-tokens", "16",
                    "--plot", str(plot_path))
    print(out)  # shown with -s: the progress lines and the table
    assert "8/8 cells" in out and "plot saved" in out, out  # progress, then the table
    assert "dev-worker-1" in out and "dev-worker-2" in out and "out tok/s" in out

    [listed, *_] = api.get(url + "/api/v1/benchmarks", timeout=10).json()["benchmarks"]
    benchmark = api.get(url + f"/api/v1/benchmarks/{listed['id']}", timeout=30).json()
    assert benchmark["state"] == "succeeded" and benchmark["progress"]["done"] == 8
    cells = benchmark["cells"]
    assert sorted((c["node"], c["batch_size"], c["context_length"]) for c in cells) == sorted(
        (n, b, c) for n in NODES for b in (1, 4) for c in (32, 128))
    for cell in cells:
        assert cell["output_tok_s"] > 0 and cell["errors"] == 0, cell
        assert cell["ttft_p50_ms"] > 0 and cell["ttft_p99_ms"] >= cell["ttft_p50_ms"], cell
        assert cell["prompt_tokens"] <= cell["context_length"] and cell["peak_memory_mb"] > 0, cell
    assert requests.get(benchmark["csv_url"], timeout=10).text.count("\n") == 9  # header + 8 cells
    assert len(requests.get(benchmark["json_url"], timeout=10).json()["cells"]) == 8

    png = plot_path.read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 10_000
    served = api.get(url + f"/api/v1/benchmarks/{benchmark['id']}/plot", timeout=30)
    assert served.headers["Content-Type"] == "image/png" and served.content[:8] == png[:8]
    if PLOT_COPY:
        Path(PLOT_COPY).write_bytes(png)

    # Each node's best cell is its measured capacity, shown on the node and by `nexus status`.
    nodes = {n["name"]: n for n in api.get(url + "/api/v1/nodes", timeout=10).json()["nodes"]}
    measured = {}
    for name in NODES:
        view = api.get(url + f"/api/v1/nodes/{nodes[name]['id']}", timeout=10).json()
        [entry] = view["measured"]
        best = max(c["output_tok_s"] for c in cells if c["node"] == name)
        assert entry["model"] == "tiny" and entry["output_tok_s"] == best
        measured[name] = best
    status = nexus_cli(env, "status")
    assert "measured tok/s" in status and status.count("tiny ") >= 2, status

    # Placement among both nodes takes the one measured faster.
    placed = api.post(url + "/api/v1/models/tiny/instances",
                      json={"nodes": [nodes[n]["id"] for n in NODES]}, timeout=10)
    assert placed.status_code == 201, placed.text
    fastest = max(measured, key=measured.get)
    instance = placed.json()
    assert instance["plan"]["stages"][0]["node_id"] == nodes[fastest]["id"]
    assert benchmark["instances"] == {name: "temporary" for name in NODES}

    # With the instance running there, that node's part measures it (its worker's queue for the model).
    def running():
        return api.get(url + "/api/v1/models/tiny/instances", timeout=10).json()["instances"][0]["live"]

    wait_for(running, timeout=120, interval=0.5, what="the placed instance serving")
    again = api.post(url + "/api/v1/benchmarks", json={"model": "tiny", "nodes": [fastest], "batch_sizes": [2],
                                                       "context_lengths": [16], "output_tokens": 8}, timeout=10)
    assert again.status_code == 201, again.text
    job = api.get(url + f"/api/v1/jobs/{again.json()['id']}", params={"wait": 30}, timeout=40).json()
    job = job if job["state"] == "succeeded" else \
        api.get(url + f"/api/v1/jobs/{again.json()['id']}", params={"wait": 30}, timeout=40).json()
    second = api.get(url + f"/api/v1/benchmarks/{job['id']}", timeout=30).json()
    assert second["state"] == "succeeded" and second["instances"] == {fastest: "serving"}, second
    [child] = api.get(url + "/api/v1/jobs", params={"parent_id": job["id"]}, timeout=10).json()["jobs"]
    assert child["queue"] == f"node.{fastest}.model.tiny" and child["node"] == fastest
    api.delete(url + f"/api/v1/models/tiny/instances/{instance['id']}", timeout=10)


def test_a_benchmark_is_cancelled_through_the_job_api(cluster):
    url, api = cluster["url"], cluster["api"]
    started = api.post(url + "/api/v1/benchmarks", json={"model": "tiny", "batch_sizes": [1, 2, 4, 8],
                                                         "context_lengths": [64, 256], "output_tokens": 64,
                                                         "repetitions": 5}, timeout=10)
    assert started.status_code == 201, started.text
    benchmark_id = started.json()["id"]
    assert started.json()["nodes"] == NODES
    cancelled = api.post(url + f"/api/v1/jobs/{benchmark_id}/cancel", timeout=10)
    assert cancelled.status_code == 200, cancelled.text

    def final():
        job = api.get(url + f"/api/v1/jobs/{benchmark_id}", timeout=10).json()
        children = api.get(url + "/api/v1/jobs", params={"parent_id": benchmark_id}, timeout=10).json()["jobs"]
        finished = ("succeeded", "failed", "cancelled")
        return job["state"] == "cancelled" and all(c["state"] in finished for c in children)

    try:
        wait_for(final, timeout=120, interval=0.5, what="the benchmark and its node jobs cancelled")
    except TimeoutError:
        job = api.get(url + f"/api/v1/jobs/{benchmark_id}", timeout=10).json()
        children = api.get(url + "/api/v1/jobs", params={"parent_id": benchmark_id}, timeout=10).json()["jobs"]
        raise AssertionError((job["state"], job["error"], [(c["state"], c["error"]) for c in children])) from None
