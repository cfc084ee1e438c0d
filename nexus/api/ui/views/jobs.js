// Jobs: a filterable, cursor-paged list; a job's detail with payload, result, progress and timeline.

import { call, session } from "../api.js";
import { badge, clear, field, h, json, meter, notice, section, shortId, table, when } from "../dom.js";

const STATES = ["", "queued", "running", "retrying", "succeeded", "failed", "cancelled"];
const FINAL = new Set(["succeeded", "failed", "cancelled"]);
const PAGE_SIZE = 25;
const REFRESH_MS = 3000;

function progressOf(job) {
  const p = job.progress;
  if (!p || typeof p !== "object" || !p.total) return null;
  return h("span", { class: "progress" }, meter(p.done / p.total), ` ${p.done}/${p.total}${p.message ? ` · ${p.message}` : ""}`);
}

export async function list(content, params, context) {
  const query = params.query;
  const filters = { state: query.get("state") || "", type: query.get("type") || "", tenant: query.get("tenant") || "" };
  const cursors = [null]; // the cursor of each page seen, to go back
  const body = h("div", { id: "jobs" });
  const pager = h("div", { class: "pager" });
  const form = h("form", {
    class: "filters", id: "job-filters",
    onsubmit: (event) => {
      event.preventDefault();
      const data = new FormData(event.target);
      const next = new URLSearchParams([...data].filter(([, v]) => v));
      location.hash = `#/jobs${next.toString() ? `?${next}` : ""}`;
    },
  },
  h("label", {}, "State ", h("select", { name: "state" }, STATES.map((s) =>
    h("option", { value: s, selected: s === filters.state }, s || "any")))),
  h("label", {}, "Type ", h("input", { name: "type", value: filters.type, placeholder: "any", size: 12 })),
  session.isAdmin ? h("label", {}, "Tenant ", h("input", { name: "tenant", value: filters.tenant, placeholder: "any", size: 12 })) : null,
  h("button", { type: "submit" }, "Filter"));
  clear(content, h("header", { class: "page-head" }, h("h1", {}, "Jobs")), form, section("", body, pager));

  async function load() {
    const page = await call("/api/v1/jobs", { query: { ...filters, limit: PAGE_SIZE, cursor: cursors.at(-1) } });
    if (!context.alive) return;
    clear(body, table(["Job", "Type", "State", "Tenant", "Node", "Attempt", "Progress", "Created"],
      page.jobs.map((job) => h("tr", { "data-job": job.id },
        h("td", {}, h("a", { href: `#/jobs/${job.id}` }, h("code", {}, shortId(job.id)))),
        h("td", {}, job.type), h("td", {}, badge(job.state)), h("td", {}, job.tenant), h("td", {}, job.node || "–"),
        h("td", { class: "num" }, `${job.attempt}/${job.max_attempts}`), h("td", {}, progressOf(job) || "–"),
        h("td", {}, when(job.created_at)))), "No jobs match."));
    clear(pager,
          h("button", { class: "small", disabled: cursors.length === 1, onclick: () => { cursors.pop(); load(); } }, "← Newer"),
          h("span", { class: "muted" }, ` page ${cursors.length} `),
          h("button", { class: "small", id: "older", disabled: !page.next_cursor,
                        onclick: () => { cursors.push(page.next_cursor); load(); } }, "Older →"));
  }

  await load();
  context.every(REFRESH_MS, () => load().catch(() => {}));
}

export async function detail(content, params, context) {
  const id = params.id;
  async function refresh() {
    const [job, { events }] = await Promise.all([call(`/api/v1/jobs/${id}`), call(`/api/v1/jobs/${id}/events`)]);
    if (!context.alive) return job;
    clear(content,
          h("header", { class: "page-head" }, h("a", { href: "#/jobs", class: "back" }, "← Jobs"),
            h("h1", {}, `${job.type} `, h("code", { class: "title-id" }, shortId(job.id))),
            h("span", { id: "job-state" }, badge(job.state)), jobActions(job, refresh)),
          h("div", { class: "grid-2" },
            section("Job", h("dl", {},
              field("Id", h("code", {}, job.id)), field("Tenant", job.tenant), field("Queue", h("code", {}, job.queue)),
              field("Priority", job.priority), field("Attempt", `${job.attempt} of ${job.max_attempts}`),
              field("Node", job.node), field("Parent", job.parent_id ? h("a", { href: `#/jobs/${job.parent_id}` }, shortId(job.parent_id)) : null),
              field("Created", when(job.created_at)), field("Started", when(job.started_at)),
              field("Finished", when(job.finished_at)), field("Progress", progressOf(job) || (job.progress ? json(job.progress) : null)),
              job.cancel_requested && !FINAL.has(job.state) ? field("Cancel", "requested: stops at its next check") : null)),
            section("Timeline", timeline(events))),
          section("Payload", json(job.payload)),
          job.error ? section("Error", h("pre", { class: "json error", id: "job-error" }, job.error))
                    : section("Result", h("div", { id: "job-result" }, json(job.result)),
                              job.output_url ? h("p", {}, h("a", { href: job.output_url }, "Download the output")) : null));
    return job;
  }
  let job;
  try {
    job = await refresh();
  } catch (error) {
    clear(content, h("a", { href: "#/jobs", class: "back" }, "← Jobs"), notice(error.message));
    return;
  }
  // Follows the job while it runs; a finished job stays still.
  context.every(REFRESH_MS, async () => {
    if (job && FINAL.has(job.state)) return;
    job = await refresh().catch(() => job);
  });
}

function timeline(events) {
  if (!events.length) return h("p", { class: "empty" }, "No events yet.");
  return h("ol", { class: "timeline", id: "timeline" }, events.map((e) => h("li", { "data-to": e.to_state },
    h("div", { class: "when muted small" }, when(e.at)),
    h("div", {}, e.from_state ? [badge(e.from_state), " → "] : null, badge(e.to_state),
      e.attempt ? h("span", { class: "muted small" }, ` attempt ${e.attempt}`) : null,
      e.node ? h("span", { class: "muted small" }, ` on ${e.node}`) : null),
    e.message || e.failure_kind ? h("div", { class: "small" }, [e.failure_kind ? `${e.failure_kind}: ` : "", e.message || ""]) : null)));
}

function jobActions(job, after) {
  if (!session.canSubmit) return null;
  const act = (label, path) => h("button", {
    class: `small ${label === "Cancel" ? "danger" : ""}`, "data-action": label.toLowerCase(),
    onclick: async (event) => {
      event.target.disabled = true;
      try {
        await call(`/api/v1/jobs/${job.id}${path}`, { method: "POST" });
        await after();
      } catch (error) {
        event.target.replaceWith(notice(`${label} failed: ${error.message}`));
      }
    },
  }, label);
  return h("div", { class: "actions" },
           !FINAL.has(job.state) && !job.cancel_requested ? act("Cancel", "/cancel") : null,
           job.state === "failed" || job.state === "cancelled" ? act("Retry", "/retry") : null);
}
