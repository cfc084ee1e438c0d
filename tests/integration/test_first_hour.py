"""A newcomer's first hour: `nexus dev -n 2` and nothing else, then chat, script the CLI, join a worker.

Run from a fresh folder as README's first screen says: the cluster serves the tiny model it made,
the OpenAI SDK and `nexus chat` talk to it, `--json` output parses, a deploy names its node, and a
server command started by hand (`nexus worker`) finds the running cluster through .nexus/cluster.json.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys

import pytest

from nexus.localservers import free_port
from tests.support import wait_for

pytestmark = pytest.mark.timeout(420)


def _cli(cwd, env, *args, stdin: str | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "nexus", *args], cwd=cwd, env=env, input=stdin, text=True,
                          capture_output=True, timeout=120)


def test_nexus_dev_serves_a_model_and_the_cli_is_scriptable(tmp_path):
    env = {k: v for k, v in os.environ.items() if not k.startswith("NEXUS_")}
    env.update(NEXUS_API_PORT=str(free_port()), NEXUS_FLOWER_PORT=str(free_port()), COLUMNS="200")
    launcher = subprocess.Popen([sys.executable, "-m", "nexus", "dev", "-n", "2"], cwd=tmp_path, env=env,
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    worker = None
    try:
        cluster_file = tmp_path / ".nexus" / "cluster.json"
        wait_for(cluster_file.exists, timeout=300, interval=0.5, what="cluster.json (written once the model serves)")
        cluster = json.loads(cluster_file.read_text())
        assert (tmp_path / ".nexus" / "models" / "tiny" / "config.json").exists()  # made on first start, cached

        from openai import OpenAI

        client = OpenAI(base_url=cluster["api_url"] + "/v1", api_key=cluster["admin_token"])
        answer = client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "hi"}],
                                                max_tokens=8)
        assert answer.choices[0].message.content

        chat = _cli(tmp_path, env, "chat", "--max-tokens", "8", stdin="hello\nquit\n")
        assert chat.returncode == 0 and "chatting with tiny" in chat.stdout, chat.stdout + chat.stderr

        submitted = _cli(tmp_path, env, "submit", "noop", "-p", '{"echo": 7}', "--wait", "--json")
        job = json.loads(submitted.stdout)  # one document on stdout; "submitted ..." went to stderr
        assert job["state"] == "succeeded" and job["result"] == {"echo": 7} and "submitted" in submitted.stderr
        listed = json.loads(_cli(tmp_path, env, "jobs", "--json").stdout)
        assert job["id"] in [j["id"] for j in listed["jobs"]]
        nodes = {n["name"]: n["id"] for n in json.loads(_cli(tmp_path, env, "nodes", "--json").stdout)["nodes"]}
        assert set(nodes) == {"dev-worker-1", "dev-worker-2"}
        assert json.loads(_cli(tmp_path, env, "models", "list", "--json").stdout)["models"][0]["name"] == "tiny"
        refused = _cli(tmp_path, env, "jobs", "--state", "done")
        assert refused.returncode == 2 and "is not one of" in refused.stderr

        # Followed until it serves: the steps on stderr, the running instance as one document on stdout.
        deployed = _cli(tmp_path, env, "models", "deploy", "tiny", "--node", "dev-worker-2", "--wait", "100")
        assert deployed.returncode == 0, deployed.stderr
        instance = json.loads(deployed.stdout)
        assert instance["node_id"] == nodes["dev-worker-2"] and instance["state"] == "running"
        assert "tiny running" in deployed.stderr

        proved = _cli(tmp_path, env, "prove", "--nonces", "0:256", "--segment-size", "128", "--allow-cpu", "--json",
                      "-o", str(tmp_path / "receipt.json"))
        assert proved.returncode == 0, proved.stderr
        assert json.loads(proved.stdout)["valid_count"] >= 0 and "2/2 segments" in proved.stderr

        # A worker started by hand, with no NEXUS_* set, joins the running cluster through cluster.json.
        with open(tmp_path / "hand-worker.log", "wb") as log:
            worker = subprocess.Popen([sys.executable, "-m", "nexus", "worker", "--name", "hand-worker", "-Q",
                                       "hand_queue"], cwd=tmp_path, env=env, stdout=log, stderr=subprocess.STDOUT,
                                      start_new_session=True)
        wait_for(lambda: "ready." in (tmp_path / "hand-worker.log").read_text(errors="replace"), timeout=90,
                 interval=0.5, what="the hand-started worker connected to the cluster's broker")
        assert cluster["redis_url"].rsplit("@", 1)[-1] in (tmp_path / "hand-worker.log").read_text(errors="replace")
    finally:
        if worker is not None:
            worker.send_signal(signal.SIGTERM)
            worker.wait(30)
        launcher.send_signal(signal.SIGTERM)
        output, _ = launcher.communicate(timeout=90)
    assert launcher.returncode == 0, output[-3000:]
