"""NexusClient and the `nexus` CLI against a real API process and a real worker."""

from __future__ import annotations

import json

import pytest
from click.testing import CliRunner

from nexus.cli import main
from nexus.client import NexusClient, NexusError

pytestmark = pytest.mark.timeout(120)


@pytest.fixture
def client(live_api, services):
    url, token = live_api
    return NexusClient(url, token)


def test_submit_wait_list_and_events(client, worker):
    job = client.submit("noop", {"echo": "from the client"}, priority=8)
    done = client.wait(job["id"], timeout=30)
    assert done["state"] == "succeeded" and done["result"] == {"echo": "from the client"}
    assert [e["to_state"] for e in client.events(job["id"])][-1] == "succeeded"
    created = client.submit_many([{"type": "noop", "payload": {"echo": i}} for i in range(30)])
    assert len(created) == 30 and all(c["created"] for c in created)
    assert len(list(client.list(type="noop"))) == 31
    ran = client.run("noop", {"echo": "in one request"}, wait=30)
    assert (ran["state"], ran["result"]) == ("succeeded", {"echo": "in one request"})


def test_errors_come_back_as_nexus_errors(client):
    with pytest.raises(NexusError) as info:
        client.submit("no-such-type")
    assert info.value.status == 400 and info.value.code == "invalid_job"
    assert "noop" in info.value.details["known_types"]
    with pytest.raises(NexusError) as info:
        NexusClient(client.url, "wrong-token").submit("noop")
    assert info.value.status == 401


def test_cancel_retry_and_timeouts(client):
    job = client.submit("sleep", {"seconds": 1}, requirements={"tier": "gpu_peer"})  # nobody consumes gpu_peer
    with pytest.raises(TimeoutError):
        client.wait(job["id"], timeout=1)
    assert client.cancel(job["id"])["state"] == "cancelled"
    assert client.retry(job["id"])["state"] == "retrying"


def test_uploaded_inputs_are_usable_as_input_keys(client, services):
    key = client.upload(b"some input", name="input.bin")
    assert services.store.get_bytes(services.settings.bucket_inputs, key) == b"some input"


def test_cli_submit_wait_and_show(live_api, worker, services, monkeypatch):
    url, token = live_api
    monkeypatch.setenv("NEXUS_URL", url)
    monkeypatch.setenv("NEXUS_TOKEN", token)
    runner = CliRunner()
    result = runner.invoke(main, ["submit", "noop", "-p", '{"echo": "cli"}', "--wait", "--timeout", "30"])
    assert result.exit_code == 0, result.output
    job = json.loads(result.output[result.output.index("{"):])
    assert job["state"] == "succeeded" and job["result"] == {"echo": "cli"}
    shown = runner.invoke(main, ["job", job["id"], "--events"])
    assert shown.exit_code == 0 and "succeeded" in shown.output
    listed = runner.invoke(main, ["jobs", "--state", "succeeded"])
    assert listed.exit_code == 0 and job["id"][:8] in listed.output
    bad = runner.invoke(main, ["submit", "noop", "-p", "{not json"])
    assert bad.exit_code != 0 and "not JSON" in bad.output
