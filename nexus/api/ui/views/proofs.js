// Proofs: proofs with their verdicts and per-node counts, a verification to start, proven weight per node.

import { call, session } from "../api.js";
import { badge, clear, field, h, json, meter, notice, section, shortId, table, when } from "../dom.js";

const REFRESH_MS = 5000;

function verdictBadge(verified) {
  if (verified === null || verified === undefined) return badge("pending", "not verified");
  return verified ? badge("accepted", "verified") : badge("rejected", "rejected");
}

function weightChart(weights) {
  const entries = Object.entries(weights);
  if (!entries.length) return h("p", { class: "empty" }, "No verified proofs yet.");
  const top = Math.max(...entries.map(([, n]) => n));
  return table(["Node", "Proven weight (valid nonces)", ""], entries.map(([node, n]) =>
    h("tr", { "data-node": node }, h("td", {}, node), h("td", { class: "num" }, n.toLocaleString()),
      h("td", { class: "wide" }, meter(n / top)))));
}

export async function overview(content, _params, context) {
  const weights = h("div", { id: "weights" });
  const proofs = h("div", { id: "proofs" });
  clear(content, h("header", { class: "page-head" }, h("h1", {}, "Proofs")),
        section("Proven weight per node", weights), section("Proofs", proofs));

  async function refresh() {
    // Three reads, whatever the number of proofs: a proof job's result is its summary, and its
    // verifications are jobs too (the newest finished one decides, as on the master).
    const [w, page, checks] = await Promise.all([
      call("/api/v1/proofs/weights"), call("/api/v1/jobs", { query: { type: "proof", limit: 50 } }),
      call("/api/v1/jobs", { query: { type: "proof_verify", state: "succeeded", limit: 500 } })]);
    if (!context.alive) return;
    const verdicts = {};
    for (const check of [...checks.jobs].reverse()) verdicts[check.parent_id] = check.result?.verdict?.accepted;
    clear(weights, weightChart(w.weights));
    clear(proofs, table(["Proof", "State", "Nonces", "Valid", "Per node", "Verdict", "Created"], page.jobs.map((p) =>
      h("tr", { "data-proof": p.id },
        h("td", {}, h("a", { href: `#/proofs/${p.id}` }, h("code", {}, shortId(p.id)))), h("td", {}, badge(p.state)),
        h("td", {}, `${p.payload?.nonce_start ?? 0}–${p.payload?.nonce_end ?? "?"}`),
        h("td", { class: "num" }, p.result?.valid_count ?? "–"),
        h("td", {}, Object.entries(p.result?.node_counts || {}).map(([node, n]) => `${node}: ${n}`).join(", ") || "–"),
        h("td", {}, verdictBadge(verdicts[p.id])), h("td", {}, when(p.created_at)))),
      "No proofs yet: POST /api/v1/proofs, or `nexus prove`."));
  }

  await refresh();
  context.every(REFRESH_MS, () => refresh().catch(() => {}));
}

export async function detail(content, params, context) {
  const status = h("div");
  async function refresh() {
    const p = await call(`/api/v1/proofs/${params.id}`);
    if (!context.alive) return;
    clear(content,
          h("header", { class: "page-head" }, h("a", { href: "#/proofs", class: "back" }, "← Proofs"),
            h("h1", {}, "Proof ", h("code", { class: "title-id" }, shortId(p.id))), badge(p.state), verdictBadge(p.verified),
            h("a", { href: `#/jobs/${p.id}`, class: "small" }, "as a job")),
          status,
          h("div", { class: "grid-2" },
            section("Request", json(p.request)),
            section("Summary", h("dl", {},
              field("Valid nonces", p.summary?.valid_count), field("Merkle root", p.summary?.merkle_root ? h("code", {}, p.summary.merkle_root) : null),
              field("Segments", Object.entries(p.segments || {}).map(([s, n]) => `${n} ${s}`).join(", ")),
              field("Finished", when(p.finished_at)), field("Error", p.error)),
              p.receipt_url ? h("p", {}, h("a", { href: p.receipt_url }, "Download the receipt")) : null)),
          section("Per node", weightChart(p.summary?.node_counts || {})),
          section("Verifications", table(["Verification", "State", "Verdict", "Sampled", "Failures", "p-value", "Salt", "Finished"],
            p.verdicts.map((v) => h("tr", {},
              h("td", {}, h("a", { href: `#/jobs/${v.id}` }, h("code", {}, shortId(v.id)))), h("td", {}, badge(v.state)),
              h("td", {}, v.verdict ? badge(v.verdict.accepted ? "accepted" : "rejected") : "–",
                v.verdict?.reasons?.length ? h("div", { class: "small" }, v.verdict.reasons.join("; ")) : null),
              h("td", { class: "num" }, v.verdict?.sampled ?? "–"), h("td", { class: "num" }, v.verdict?.failures ?? "–"),
              h("td", { class: "num" }, v.verdict?.p_value?.toPrecision(3) ?? "–"), h("td", {}, v.salt || "–"),
              h("td", {}, when(v.finished_at)))), "Not verified yet."),
            p.state === "succeeded" && session.canSubmit ? verifyForm(p.id, refresh) : null));
  }

  function verifyForm(id, after) {
    const salt = h("input", { name: "salt", placeholder: "salt (optional)", size: 20 });
    return h("form", { class: "inline-form", id: "verify", onsubmit: async (event) => {
      event.preventDefault();
      try {
        await call(`/api/v1/proofs/${id}/verify`, { method: "POST", body: { salt: salt.value } });
        await after();
      } catch (error) {
        clear(status, notice(`Verification not started: ${error.message}`));
      }
    } }, salt, h("button", { type: "submit", class: "small primary" }, "Verify"));
  }

  try {
    await refresh();
  } catch (error) {
    clear(content, h("a", { href: "#/proofs", class: "back" }, "← Proofs"), notice(error.message));
    return;
  }
  context.every(REFRESH_MS, () => content.contains(document.activeElement) || refresh().catch(() => {}));
}
