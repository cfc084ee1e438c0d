// Cluster: tiers with their node counts, every node with its GPUs, and the admin's node actions.

import { call, session } from "../api.js";
import { ago, badge, clear, field, gib, h, json, meter, notice, section, shortId, table, when } from "../dom.js";

const REFRESH_MS = 5000;
// Most capable first, as the master orders them (nexus.queueing.tiers.TIER_ORDER).
const TIER_NAMES = { ai_factory: "AI factory", gpu_peer: "GPU peer", gpu_infra: "GPU infra", cpu_only: "CPU only" };

export async function overview(content, _params, context) {
  const summary = h("div", { class: "cards", id: "summary" });
  const tiers = h("div", { id: "tiers" });
  const nodes = h("div", { id: "nodes" });
  const queues = h("div", { id: "queues" });
  const stamp = h("span", { class: "muted stamp", id: "updated" });
  clear(content,
        h("header", { class: "page-head" }, h("h1", {}, "Cluster"), stamp),
        summary,
        h("div", { class: "grid-2" }, section("Tiers", tiers), section("Queues", queues)),
        section("Nodes", nodes));

  async function refresh() {
    const [state, list] = await Promise.all([
      call("/api/v1/cluster"),
      session.isAdmin ? call("/api/v1/nodes") : Promise.resolve(null),
    ]);
    if (!context.alive) return;
    clear(summary, cards(state));
    clear(tiers, tierTable(state.tiers));
    clear(queues, queueTable(state.queues));
    clear(nodes, list ? nodeTable(list.nodes, refresh)
                      : h("p", { class: "muted" }, "Each node's details are for admin tokens."));
    stamp.textContent = `updated ${new Date().toLocaleTimeString()} · every ${REFRESH_MS / 1000} s`;
  }

  await refresh();
  context.every(REFRESH_MS, () => refresh().catch((error) => { stamp.textContent = `refresh failed: ${error.message}`; }));
}

function cards(state) {
  const t = state.totals;
  const used = t.vram_total_mb - t.vram_free_mb;
  const card = (label, value, sub) => h("div", { class: "card" }, h("div", { class: "card-label" }, label),
                                          h("div", { class: "card-value" }, value), h("div", { class: "muted" }, sub));
  return [
    card("Nodes", t.nodes, `${Object.values(state.tiers).reduce((n, tier) => n + (tier.nodes_by_state.ready || 0), 0)} ready`),
    card("GPUs", t.gpus, `${gib(t.vram_total_mb)} VRAM`),
    card("VRAM in use", t.vram_total_mb ? `${Math.round((100 * used) / t.vram_total_mb)}%` : "–",
         `${gib(t.vram_free_mb)} free · ${gib(t.vram_reserved_mb)} reserved`),
    card("Jobs running", state.jobs.running, `${state.jobs.queued + state.jobs.retrying} waiting`),
  ];
}

function tierRank(name) {
  const rank = Object.keys(TIER_NAMES).indexOf(name);
  return rank < 0 ? Object.keys(TIER_NAMES).length : rank;
}

function tierTable(tiers) {
  const rows = Object.entries(tiers).sort(([a], [b]) => tierRank(a) - tierRank(b)).map(([name, tier]) => h("tr", { "data-tier": name },
    h("td", {}, h("strong", {}, TIER_NAMES[name] || name)),
    h("td", { class: "num", "data-field": "nodes" }, tier.nodes),
    h("td", {}, Object.entries(tier.nodes_by_state).map(([state, n]) => badge(state, `${n} ${state}`))),
    h("td", { class: "num" }, tier.gpus),
    h("td", {}, tier.vram_total_mb ? `${gib(tier.vram_free_mb)} free of ${gib(tier.vram_total_mb)}` : "–")));
  return table(["Tier", "Nodes", "States", "GPUs", "VRAM"], rows);
}

function queueTable(queues) {
  const rows = Object.entries(queues).map(([name, depth]) =>
    h("tr", {}, h("td", {}, h("code", {}, name)), h("td", { class: "num" }, depth)));
  return table(["Queue", "Messages"], rows);
}

function gpuCells(node) {
  const names = Object.fromEntries((node.hardware?.gpus || []).map((g) => [g.index, g.name]));
  const live = node.resources?.gpus?.length ? node.resources.gpus : node.hardware?.gpus || [];
  if (!live.length) return h("span", { class: "muted" }, "no GPU");
  return h("div", { class: "gpus" }, live.map((gpu) => {
    const used = gpu.memory_total_mb - gpu.memory_free_mb;
    const facts = [gpu.utilization_percent ?? null, gpu.temperature_c ?? null];
    return h("div", { class: "gpu" },
             h("span", { class: "gpu-name" }, `${gpu.index}: ${(names[gpu.index] || "GPU").replace(/^NVIDIA (GeForce )?/, "")}`),
             meter(used / gpu.memory_total_mb, `${gib(used)} of ${gib(gpu.memory_total_mb)} VRAM used`),
             h("span", { class: "muted small" }, `${used ? (used / 1024).toFixed(used >= 10240 ? 0 : 1) : 0}/${gib(gpu.memory_total_mb)}`,
               facts[0] !== null ? ` · ${facts[0]}% util` : "", facts[1] !== null ? ` · ${facts[1]} °C` : ""));
  }));
}

function nodeState(node) {
  return [badge(node.state), node.drain_requested && node.state !== "draining" ? badge("draining", "drain requested") : null];
}

function actions(node, after) {
  if (node.state === "removed") return null;
  const act = (label, method, path, confirmText, tone = "") => h("button", {
    class: `small ${tone}`, "data-action": label.toLowerCase(),
    onclick: async (event) => {
      if (confirmText && !confirm(confirmText)) return;
      event.target.disabled = true;
      try {
        await call(`/api/v1/nodes/${node.id}${path}`, { method });
        await after();
      } catch (error) {
        alert(`${label} failed: ${error.message}`);
        event.target.disabled = false;
      }
    },
  }, label);
  const paused = node.drain_requested || node.state === "draining" || node.state === "quarantined";
  return h("div", { class: "actions" },
           paused ? act("Resume", "POST", "/resume") : act("Drain", "POST", "/drain"),
           act("Remove", "DELETE", "", `Remove ${node.name}? Its token stops working and its running jobs are re-queued.`,
               "danger"));
}

function machineLine(hw) {
  if (!hw?.cpu) return "";
  return `${hw.cpu.logical_cores} threads${hw.ram_total_mb ? ` · ${gib(hw.ram_total_mb)} RAM` : ""}`;
}

function nodeTable(nodes, after) {
  const sorted = [...nodes].sort((a, b) => tierRank(a.tier) - tierRank(b.tier) || a.name.localeCompare(b.name));
  const rows = sorted.map((node) => h("tr", { "data-node": node.name, "data-id": node.id },
    h("td", { class: "nowrap" }, h("a", { href: `#/nodes/${node.id}` }, h("strong", {}, node.name)),
      h("div", { class: "muted small" }, machineLine(node.hardware))),
    h("td", { "data-field": "state" }, nodeState(node)),
    h("td", { class: "nowrap" }, TIER_NAMES[node.tier] || node.tier),
    h("td", {}, gpuCells(node)),
    h("td", { class: "num", "data-field": "running" }, (node.running_jobs || []).length),
    h("td", {}, ago(node.heartbeat_age_seconds)),
    h("td", { class: "num" }, node.consecutive_failures || 0),
    h("td", {}, actions(node, after))));
  return table(["Node", "State", "Tier", "GPUs (VRAM used)", "Running", "Heartbeat", "Failures", ""], rows,
               "No nodes yet: start one with `nexus agent` (see DEPLOYMENT.md).");
}

export async function node(content, params, context) {
  async function refresh() {
    const n = await call(`/api/v1/nodes/${encodeURIComponent(params.id)}`);
    if (!context.alive) return;
    const hw = n.hardware || {};
    clear(content,
          h("header", { class: "page-head" }, h("a", { href: "#/cluster", class: "back" }, "← Cluster"),
            h("h1", {}, n.name), nodeState(n), actions(n, refresh)),
          h("div", { class: "grid-2" },
            section("Node", h("dl", {},
              field("Id", h("code", {}, n.id)), field("Tier", TIER_NAMES[n.tier] || n.tier),
              field("GPU tiers", [...new Set(Object.values(n.gpu_tiers || {}))].map((t) => TIER_NAMES[t] || t).join(", ")), field("Queues", (n.queues || []).join(", ")),
              field("Last heartbeat", ago(n.heartbeat_age_seconds)), field("Registered", when(n.registered_at)),
              field("Failures in a row", n.consecutive_failures), field("Max concurrent", n.max_concurrent ?? "default"),
              field("Agent", n.agent_version), field("Labels", Object.entries(n.labels || {}).map(([k, v]) => `${k}=${v}`).join(", ")))),
            section("Hardware", h("dl", {},
              field("CPU", hw.cpu ? `${hw.cpu.model} (${hw.cpu.logical_cores} threads)` : null),
              field("RAM", hw.ram_total_mb ? gib(hw.ram_total_mb) : null), field("Driver", hw.driver_version),
              field("CUDA", hw.cuda_version), field("OS", hw.os)))),
          section("GPUs", gpuCells(n)),
          section("Running jobs", table(["Job"], (n.running_jobs || []).map((id) =>
            h("tr", {}, h("td", {}, h("a", { href: `#/jobs/${id}` }, h("code", {}, shortId(id)), " ", id)))), "Idle.")),
          section("Loaded models", (n.loaded_models || []).length ? h("p", {}, n.loaded_models.join(", ")) : h("p", { class: "empty" }, "None.")),
          section("Workers", json(n.workers)));
  }
  try {
    await refresh();
  } catch (error) {
    clear(content, h("a", { href: "#/cluster", class: "back" }, "← Cluster"), notice(error.message));
    return;
  }
  context.every(REFRESH_MS, () => refresh().catch(() => {}));
}
