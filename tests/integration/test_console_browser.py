"""The web console in a real headless Chromium against a real local cluster: gunicorn API, PostgreSQL,
Redis, S3, a Celery worker and the tiny model behind /v1. Nodes register and beat through the API.

The cluster test saves the screenshot README shows (docs/images/console-cluster.png) when
NEXUS_UPDATE_SCREENSHOTS=1; otherwise it writes it to the test's temporary folder, so a run leaves
the tree clean.
"""

from __future__ import annotations

import dataclasses
import os
import time
import uuid
from pathlib import Path

import pytest
import requests
from selenium.common.exceptions import TimeoutException
from selenium.webdriver.common.by import By
from selenium.webdriver.support.ui import Select, WebDriverWait

from nexus import auth
from nexus.agent.heartbeat import heartbeat_body
from nexus.auth import Role
from nexus.jobs import lifecycle
from nexus.queueing.broker import priority_keys
from tests.agent_support import hardware, registered
from tests.browser_support import headless_chromium
from tests.conftest import auth as bearer
from tests.inference_support import model_worker, tiny_model_dir, tiny_served  # noqa: F401 (fixtures)
from tests.support import wait_for

pytestmark = pytest.mark.timeout(240)

SCREENSHOT = Path(__file__).resolve().parents[2] / "docs" / "images" / "console-cluster.png"
UPDATE_SCREENSHOTS = os.environ.get("NEXUS_UPDATE_SCREENSHOTS") == "1"
WAIT_SECONDS = 30  # generous: the machine is shared and the views refresh every few seconds
# What the nodes report in the cluster test (and so in the screenshot): (name, fixture, GPU load per GPU).
FLEET = [("dgx-h100-a", "h100x8", [(91, 71, 62_500), (88, 69, 61_000), (93, 72, 63_800), (90, 70, 62_200),
                                    (12, 41, 9_100), (0, 34, 0), (0, 33, 0), (0, 35, 0)]),
         ("peer-4090", "rtx4090", [(64, 58, 15_300)]),
         ("lab-3090", "rtx3090x2", [(97, 76, 21_900), (35, 52, 8_000)]),
         ("infra-3060", "rtx3060", [(0, 36, 300)]),
         ("cpu-batch-1", "cpu_only", [])]


@pytest.fixture
def browser():
    with headless_chromium(width=1440, height=960) as driver:
        yield driver


def wait(driver, condition, what: str, seconds: float = WAIT_SECONDS):
    try:
        return WebDriverWait(driver, seconds).until(lambda d: condition(d))
    except TimeoutException:
        shown = driver.execute_script("return document.body.innerText")
        raise AssertionError(f"{what} not seen within {seconds} s; the page shows:\n{shown[:3000]}") from None


def css(driver, selector: str):
    return driver.find_elements(By.CSS_SELECTOR, selector)


def open_console(driver, url: str, token: str | None = None, route: str = "") -> None:
    driver.get(f"{url}/ui/" + (f"?token={token}" if token else "") + (f"#/{route}" if route else ""))


def signed_in(driver, view: str | None = None) -> None:
    wait(driver, lambda d: css(d, "#nav a") and (view is None or d.execute_script("return document.body.dataset.view") == view),
         f"the console's {view or 'first'} view")


def sign_in_by_typing(driver, url: str, token: str) -> None:
    open_console(driver, url)
    field = wait(driver, lambda d: css(d, "#token"), "the sign-in form")[0]
    field.send_keys(token)
    css(driver, "#sign-in button[type=submit]")[0].click()
    signed_in(driver)


def beat_with_load(api, node: dict, fixture: str, load: list[tuple[int, int, int]], running_jobs=()) -> None:
    """A heartbeat as the agent sends it, with the GPUs busy as given: (utilisation %, °C, MB used)."""
    hw = hardware(fixture)
    gpus = [dataclasses.replace(g, utilization_percent=u, temperature_c=t, memory_free_mb=g.memory_total_mb - used)
            for g, (u, t, used) in zip(hw.gpus, load)]
    body = heartbeat_body(dataclasses.replace(hw, gpus=tuple(gpus)), state="ready", running_jobs=list(running_jobs),
                          loaded_models=[], workers=[], cpu_percent=40.0, sent_at=time.time())
    response = api.post(f"/api/v1/nodes/{node['node_id']}/heartbeat", json=body, headers=bearer(node["node_token"]))
    assert response.status_code == 200, response.json


def run_on(services, job: dict, node: str) -> str:
    with services.engine.begin() as conn:
        assert lifecycle.claim(conn, job["id"], job["attempt"] + 1, node, lease_seconds=900) is not None
    return job["id"]


def make_token(services, role: Role, tenant: str) -> str:
    with services.engine.begin() as conn:
        return auth.create_token(conn, f"console-{role.value}-{uuid.uuid4().hex[:6]}", role, tenant)[0]


def submit(url: str, token: str, job: dict, wait_seconds: float = 0) -> dict:
    response = requests.post(f"{url}/api/v1/jobs", params={"wait": wait_seconds} if wait_seconds else None, json=job,
                             headers=bearer(token), timeout=wait_seconds + 30)
    assert response.status_code == 201, response.text
    return response.json()


def job_state(url: str, token: str, job_id: str) -> str:
    return requests.get(f"{url}/api/v1/jobs/{job_id}", headers=bearer(token), timeout=10).json()["state"]


def test_without_a_valid_token_there_is_only_the_sign_in(browser, live_api, api, services):
    url, admin = live_api
    registered(api, "secret-node", "rtx4090")
    open_console(browser, url, route="nodes")
    wait(browser, lambda d: css(d, "#sign-in"), "the sign-in form")
    assert not css(browser, "#nav") and not css(browser, "#content")
    assert "secret-node" not in browser.page_source

    open_console(browser, url, token="nx_" + "not-a-token" * 3, route="jobs")  # a bad ?token= is refused and forgotten
    wait(browser, lambda d: css(d, "#sign-in-status [role=alert]"), "the refusal")
    assert "not valid" in css(browser, "#sign-in-status")[0].text
    assert "token" not in browser.current_url
    assert browser.execute_script("return sessionStorage.length") == 0
    assert not css(browser, "#nav") and "secret-node" not in browser.page_source

    sign_in_by_typing(browser, url, admin)
    assert "secret-node" in wait(browser, lambda d: css(d, "#nodes table"), "the node list")[0].text
    css(browser, "#sign-out")[0].click()
    wait(browser, lambda d: css(d, "#sign-in"), "the sign-in form after signing out")
    assert browser.execute_script("return sessionStorage.length") == 0 and "secret-node" not in browser.page_source


def test_a_token_in_the_address_is_kept_in_the_tab_and_removed_from_the_address(browser, live_api, services,
                                                                                session_dir):
    url, admin = live_api
    open_console(browser, url, token=admin, route="jobs")
    signed_in(browser, "jobs")
    assert "token" not in browser.current_url and browser.current_url.endswith("#/jobs")
    api_log = (session_dir / "api.log").read_text(errors="replace")
    assert "GET /ui/?token=*** " in api_log and admin not in api_log  # the access log redacts it
    browser.refresh()  # the tab keeps it: still signed in after a reload
    signed_in(browser, "jobs")
    assert "admin · tenant default" in css(browser, "#who")[0].text


def test_the_cluster_view_shows_tiers_and_nodes_and_an_admin_drains_one(browser, live_api, api, services, tmp_path):
    url, admin = live_api
    nodes = {}
    for name, fixture, load in FLEET:
        nodes[name] = registered(api, name, fixture)
        # Jobs that run there: claimed for the node as its worker would (no worker consumes these tiers).
        running = [run_on(services, submit(url, admin, {"type": "sleep", "payload": {"seconds": 600},
                                                          "requirements": {"tier": "gpu_infra"}}), name)
                   for _ in range(sum(1 for u, _t, _m in load if u > 50))]
        beat_with_load(api, nodes[name], fixture, load, running)
    services.redis.delete(*priority_keys("gpu_infra"))  # their messages, as the node's workers would have taken them
    for _ in range(3):  # and some waiting
        submit(url, admin, {"type": "sleep", "payload": {"seconds": 600}, "requirements": {"tier": "ai_factory"}})
    sign_in_by_typing(browser, url, admin)
    rows = wait(browser, lambda d: len(css(d, "#nodes tr[data-node]")) == len(FLEET) and css(d, "#nodes tr[data-node]"),
                "every node in the list")
    shown = {row.get_attribute("data-node"): row.text for row in rows}
    assert set(shown) == {name for name, _f, _l in FLEET}
    assert "H100" in shown["dgx-h100-a"] and "RTX 4090" in shown["peer-4090"] and "no GPU" in shown["cpu-batch-1"]
    assert "91% util" in shown["dgx-h100-a"] and "71 °C" in shown["dgx-h100-a"]
    tier_nodes = {row.get_attribute("data-tier"): row.find_element(By.CSS_SELECTOR, "[data-field=nodes]").text
                  for row in css(browser, "#tiers tr[data-tier]")}
    cluster = requests.get(f"{url}/api/v1/cluster", headers=bearer(admin), timeout=10).json()
    assert tier_nodes == {tier: str(t["nodes"]) for tier, t in cluster["tiers"].items()}
    assert sum(int(n) for n in tier_nodes.values()) == len(FLEET)
    browser.set_window_size(1440, 1240)  # every node in the picture
    wait(browser, lambda d: d.execute_script("return window.innerHeight") > 1000, "the taller window")
    picture = SCREENSHOT if UPDATE_SCREENSHOTS else tmp_path / SCREENSHOT.name
    picture.parent.mkdir(parents=True, exist_ok=True)
    browser.save_screenshot(str(picture))
    assert picture.stat().st_size > 10_000  # a rendered page, not an empty one

    row = css(browser, "#nodes tr[data-node=peer-4090]")[0]
    row.find_element(By.CSS_SELECTOR, "button[data-action=drain]").click()
    wait(browser, lambda d: css(d, "#nodes tr[data-node=peer-4090] button[data-action=resume]"), "the node drained")
    node = requests.get(f"{url}/api/v1/nodes/{nodes['peer-4090']['node_id']}", headers=bearer(admin), timeout=10).json()
    assert node["drain_requested"] is True
    css(browser, "#nodes tr[data-node=cpu-batch-1] button[data-action=remove]")[0].click()
    browser.switch_to.alert.accept()  # "Remove cpu-batch-1? ..."
    wait(browser, lambda d: not css(d, "#nodes tr[data-node=cpu-batch-1]"), "the removed node gone from the list")
    node = requests.get(f"{url}/api/v1/nodes/{nodes['cpu-batch-1']['node_id']}", headers=bearer(admin), timeout=10).json()
    assert node["state"] == "removed"

    browser.get(f"{url}/ui/#/nodes/{nodes['dgx-h100-a']['node_id']}")  # a node's own page, by its link
    wait(browser, lambda d: css(d, "h1") and css(d, "h1")[0].text == "dgx-h100-a", "the node's page")
    assert len(css(browser, ".gpu")) == 8


def test_a_job_run_through_the_api_is_in_the_list_with_its_timeline(browser, live_api, services, worker):
    url, admin = live_api
    job = submit(url, admin, {"type": "noop", "payload": {"echo": "console"}}, wait_seconds=20)
    assert job["state"] == "succeeded"
    sign_in_by_typing(browser, url, admin)
    browser.get(f"{url}/ui/#/jobs?type=noop&state=succeeded")
    link = wait(browser, lambda d: css(d, f"tr[data-job='{job['id']}'] a"), "the job in the filtered list")[0]
    link.click()
    wait(browser, lambda d: css(d, "#timeline li[data-to=succeeded]"), "the job's timeline")
    states = [li.get_attribute("data-to") for li in css(browser, "#timeline li")]
    assert states[0] == "queued" and states[-1] == "succeeded" and "running" in states
    assert "console" in css(browser, "#job-result")[0].text or "echo" in browser.page_source
    assert browser.current_url.endswith(f"#/jobs/{job['id']}")

    browser.get(f"{url}/ui/#/jobs?type=sleep")  # a filter that excludes it
    wait(browser, lambda d: css(d, "#jobs .empty"), "an empty filtered list")


def test_the_job_list_pages_by_cursor(browser, live_api, services):
    url, admin = live_api
    bulk = requests.post(f"{url}/api/v1/jobs/bulk", json={"jobs": [
        {"type": "noop", "requirements": {"tier": "gpu_peer"}} for _ in range(30)]}, headers=bearer(admin), timeout=30)
    assert bulk.status_code == 201
    made = {j["id"] for j in bulk.json()["jobs"]}
    open_console(browser, url, token=admin, route="jobs")
    signed_in(browser, "jobs")
    first = {r.get_attribute("data-job") for r in wait(browser, lambda d: len(css(d, "tr[data-job]")) == 25 and
                                                                     css(d, "tr[data-job]"), "a full first page")}
    css(browser, "#older")[0].click()
    wait(browser, lambda d: len(css(d, "tr[data-job]")) == 5, "the second page")
    second = {r.get_attribute("data-job") for r in css(browser, "tr[data-job]")}
    assert first | second == made and not first & second


def test_a_sleeping_job_is_cancelled_from_the_console(browser, live_api, services, worker):
    url, admin = live_api
    job = submit(url, admin, {"type": "sleep", "payload": {"seconds": 120}})
    wait_for(lambda: job_state(url, admin, job["id"]) == "running", timeout=WAIT_SECONDS, what="the job running")
    open_console(browser, url, token=admin, route=f"jobs/{job['id']}")
    button = wait(browser, lambda d: css(d, "button[data-action=cancel]"), "the cancel button")[0]
    button.click()
    wait_for(lambda: job_state(url, admin, job["id"]) == "cancelled", timeout=WAIT_SECONDS, what="the job cancelled")
    wait(browser, lambda d: css(d, "#job-state [data-state=cancelled]"), "the console showing it cancelled")
    css(browser, "button[data-action=retry]")[0].click()  # a cancelled job may be retried
    wait_for(lambda: job_state(url, admin, job["id"]) != "cancelled", timeout=WAIT_SECONDS, what="the retry")
    requests.post(f"{url}/api/v1/jobs/{job['id']}/cancel", headers=bearer(admin), timeout=10)  # free the worker
    wait_for(lambda: job_state(url, admin, job["id"]) == "cancelled", timeout=WAIT_SECONDS, what="cancelled again")


def test_a_chat_reply_streams_from_the_tiny_model(browser, live_api, tiny_served):
    url, admin = live_api
    open_console(browser, url, token=admin, route="playground")
    signed_in(browser, "playground")
    wait(browser, lambda d: css(d, "#chat-model option[value=tiny]"), "the tiny model offered")
    Select(css(browser, "#chat-model")[0]).select_by_value("tiny")
    tokens = css(browser, "#chat-max-tokens")[0]
    tokens.clear()
    tokens.send_keys("24")
    temperature = css(browser, "#chat-temperature")[0]
    temperature.clear()
    temperature.send_keys("0")
    # Counts the reply's text changes as they happen: more than one means it streamed in pieces.
    browser.execute_script("""
        window.updates = 0;
        new MutationObserver(() => { window.updates += 1; })
          .observe(document.getElementById('chat-log'), {subtree: true, childList: true, characterData: true});""")
    css(browser, "#chat-input")[0].send_keys("hello there")
    css(browser, "#chat-send")[0].click()
    shown = wait(browser, lambda d: css(d, ".bubble.assistant.done .text"), "the reply finished", 90)[0]
    reply = browser.execute_script("return arguments[0].textContent", shown)
    assert reply and not css(browser, ".bubble.assistant [role=alert]")
    expected = requests.post(f"{url}/v1/chat/completions", headers=bearer(admin), timeout=60, json={
        "model": "tiny", "messages": [{"role": "user", "content": "hello there"}], "max_tokens": 24, "temperature": 0,
    }).json()["choices"][0]["message"]["content"]
    assert reply == expected  # greedy: the streamed pieces add up to the whole answer
    assert browser.execute_script("return window.updates") >= 2  # the user's bubble, then the reply's text


def test_a_submitter_sees_its_tenant_and_no_node_details(browser, live_api, api, services, worker):
    url, admin = live_api
    registered(api, "hidden-node", "rtx4090")
    submitter = make_token(services, Role.SUBMITTER, "tenant-console")
    own = submit(url, submitter, {"type": "noop"}, wait_seconds=20)
    other = submit(url, admin, {"type": "noop"}, wait_seconds=20)
    open_console(browser, url, token=submitter)
    signed_in(browser, "cluster")
    wait(browser, lambda d: css(d, "#tiers tr[data-tier]"), "the tiers")
    assert "admin tokens" in css(browser, "#nodes")[0].text
    assert not css(browser, "#nodes tr[data-node]") and not css(browser, "button[data-action=drain]")
    assert "hidden-node" not in browser.page_source
    browser.get(f"{url}/ui/#/jobs")
    wait(browser, lambda d: css(d, f"tr[data-job='{own['id']}']"), "its own job")
    assert not css(browser, f"tr[data-job='{other['id']}']") and not css(browser, "#job-filters input[name=tenant]")
    browser.get(f"{url}/ui/#/nodes/{uuid.uuid4()}")  # an admin's page: the console falls back to what it may see
    signed_in(browser, "cluster")
    for section, title in (("models", "Models"), ("proofs", "Proofs"), ("playground", "Playground")):
        browser.get(f"{url}/ui/#/{section}")
        wait(browser, lambda d: css(d, "#content h1") and css(d, "#content h1")[0].text == title, f"the {title} view")
        assert not css(browser, "#content [role=alert]"), title


@pytest.mark.timeout(420)
def test_a_proof_is_verified_from_the_console_and_its_weight_shown(browser, live_api, services, worker, reconciler,
                                                                  verifier):
    url, admin = live_api
    response = requests.post(f"{url}/api/v1/proofs", headers=bearer(admin), timeout=30, json={
        "seed": "console", "nonce_end": 256, "segment_size": 128, "allow_cpu": True, "options": {"preset": "tiny"}})
    assert response.status_code == 201, response.text
    proof_id = response.json()["id"]
    wait_for(lambda: job_state(url, admin, proof_id) == "succeeded", timeout=120, what="the proof finished")
    open_console(browser, url, token=admin, route="proofs")
    wait(browser, lambda d: css(d, f"tr[data-proof='{proof_id}'] a"), "the proof in the list")[0].click()
    wait(browser, lambda d: css(d, "#verify button"), "the verify form")[0].click()
    wait(browser, lambda d: css(d, "[data-state=accepted]"), "the accepting verdict", 120)
    proof = requests.get(f"{url}/api/v1/proofs/{proof_id}", headers=bearer(admin), timeout=30).json()
    assert proof["verified"] is True and proof["proven_weight"]
    browser.get(f"{url}/ui/#/proofs")
    rows = wait(browser, lambda d: css(d, "#weights tr[data-node]"), "the proven weight per node")
    assert {r.get_attribute("data-node"): r.find_element(By.CSS_SELECTOR, "td.num").text.replace(",", "")
            for r in rows} == {node: str(n) for node, n in proof["proven_weight"].items()}


def test_the_models_view_shows_the_served_model_and_an_admin_deploys_and_stops_an_instance(browser, live_api, tiny_served):
    url, admin = live_api
    open_console(browser, url, token=admin, route="models")
    panel = wait(browser, lambda d: css(d, "section[data-model=tiny] tr[data-instance]"), "the tiny model's instance")
    assert "running" in panel[0].text or "live" in panel[0].text
    before = {row.get_attribute("data-instance") for row in panel}

    css(browser, "section[data-model=tiny] form button[type=submit]")[0].click()  # deploy, placement choosing
    rows = wait(browser, lambda d: len(css(d, "section[data-model=tiny] tr[data-instance]")) > len(before) and
                css(d, "section[data-model=tiny] tr[data-instance]"), "the deployed instance")
    [new] = {row.get_attribute("data-instance") for row in rows} - before
    css(browser, f"tr[data-instance='{new}'] button[data-action=stop]")[0].click()
    wait(browser, lambda d: not css(d, f"tr[data-instance='{new}']"), "the stopped instance gone")
    instances = requests.get(f"{url}/api/v1/models/tiny/instances", headers=bearer(admin), timeout=10).json()["instances"]
    assert {i["id"]: i["state"] for i in instances}[new] == "stopped"


def test_a_token_revoked_while_signed_in_brings_back_the_sign_in(browser, live_api, services):
    url, admin = live_api
    created = requests.post(f"{url}/api/v1/tokens", json={"name": "console-revoked", "role": "submitter"},
                            headers=bearer(admin), timeout=10).json()
    open_console(browser, url, token=created["token"], route="cluster")
    signed_in(browser, "cluster")
    assert requests.delete(f"{url}/api/v1/tokens/{created['id']}", headers=bearer(admin), timeout=10).status_code == 200
    wait(browser, lambda d: css(d, "#sign-in"), "the sign-in after the next refresh")  # the view refreshes every 5 s
    assert "revoked" in css(browser, "#sign-in-status")[0].text
    assert not css(browser, "#nav") and browser.execute_script("return sessionStorage.length") == 0
