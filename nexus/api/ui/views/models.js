// Models: the catalog and each model's instances (plan, state); deploy and stop for admins.

import { call, session } from "../api.js";
import { badge, clear, h, notice, shortId, sinceIso, table } from "../dom.js";

const REFRESH_MS = 5000;

function planText(plan) {
  if (!plan) return "–";
  const parts = [plan.strategy];
  if (plan.tensor_parallel_size > 1) parts.push(`TP ${plan.tensor_parallel_size}`);
  if (plan.pipeline_parallel_size > 1) parts.push(`PP ${plan.pipeline_parallel_size}`);
  return parts.filter(Boolean).join(" · ");
}

export async function overview(content, _params, context) {
  const body = h("div", { id: "models" });
  const status = h("div");
  clear(content, h("header", { class: "page-head" }, h("h1", {}, "Models")), status, body);
  let nodes = [];

  async function refresh() {
    const [{ models }, nodeList] = await Promise.all([
      call("/api/v1/models"), session.isAdmin ? call("/api/v1/nodes") : Promise.resolve({ nodes: [] })]);
    if (!context.alive) return;
    nodes = nodeList.nodes.filter((n) => n.state === "ready");
    clear(body, models.length ? models.map((m) => modelPanel(m)) :
      h("p", { class: "empty" }, "No models declared: POST /api/v1/models (see README, Inference)."));
  }

  function modelPanel(model) {
    const instances = model.instances.filter((i) => i.state !== "stopped");
    return h("section", { class: "panel", "data-model": model.name }, h("h3", { class: "model-name" }, model.name),
      h("p", { class: "muted" }, `${model.backend} · ${model.vram_mb ? `${model.vram_mb} MB VRAM` : "no VRAM"} · from tier ${model.min_tier}`,
        model.source ? [" · ", h("code", {}, model.source)] : null, ` · ${model.live_instances} live`),
      table(["Instance", "State", "Node", "GPUs", "Plan", "Worker", "Heartbeat", ""], instances.map((i) =>
        h("tr", { "data-instance": i.id },
          h("td", {}, h("code", {}, shortId(i.id))),
          h("td", {}, badge(i.state), i.live ? [" ", badge("live")] : null, i.error ? h("div", { class: "small error" }, i.error) : null),
          h("td", {}, i.node_id ? shortId(i.node_id) : "any worker"), h("td", {}, i.gpus.join(", ") || "–"),
          h("td", {}, planText(i.plan)), h("td", {}, i.worker || "–"), h("td", {}, sinceIso(i.heartbeat_at)),
          h("td", {}, session.isAdmin ? stopButton(model, i) : null))), "No instances."),
      session.isAdmin ? deployForm(model) : null);
  }

  function stopButton(model, instance) {
    return h("button", { class: "small danger", "data-action": "stop", onclick: async () => {
      try {
        await call(`/api/v1/models/${encodeURIComponent(model.name)}/instances/${instance.id}`, { method: "DELETE" });
        await refresh();
      } catch (error) {
        clear(status, notice(`Stop failed: ${error.message}`));
      }
    } }, "Stop");
  }

  function deployForm(model) {
    const node = h("select", { name: "node" }, h("option", { value: "" }, "placement chooses"),
                   nodes.map((n) => h("option", { value: n.id }, `${n.name} (${n.tier}, ${n.gpu_count} GPU)`)));
    const tp = h("select", { name: "tp" }, ["", "1", "2", "4", "8"].map((v) => h("option", { value: v }, v ? `TP ${v}` : "TP auto")));
    return h("form", { class: "inline-form", onsubmit: async (event) => {
      event.preventDefault();
      const body = { nodes: node.value ? [node.value] : [] };
      if (tp.value) body.tensor_parallel_size = Number(tp.value);
      try {
        await call(`/api/v1/models/${encodeURIComponent(model.name)}/instances`, { method: "POST", body });
        clear(status);
        await refresh();
      } catch (error) {
        clear(status, notice(`Deploy of ${model.name} failed: ${error.message}`));
      }
    } }, h("span", { class: "muted" }, "Deploy on "), node, tp, h("button", { type: "submit", class: "small primary" }, "Deploy"));
  }

  await refresh();
  // Not while the admin is choosing in a deploy form: a redraw would reset it.
  context.every(REFRESH_MS, () => body.contains(document.activeElement) || refresh().catch(() => {}));
}
