// The console's shell: sign-in, navigation, and hash routes (#/jobs, #/nodes/<id>, ...).
// Nothing but the sign-in is drawn until GET /api/v1/tokens/self accepts the token.

import { call, keepToken, session, signOut } from "./api.js";
import { clear, h, notice } from "./dom.js";
import * as cluster from "./views/cluster.js";
import * as jobs from "./views/jobs.js";
import * as models from "./views/models.js";
import * as proofs from "./views/proofs.js";
import * as playground from "./views/playground.js";

const root = document.getElementById("root");

// Each section: its hash, its title, who may open it, and the view for each route under it.
const SECTIONS = [
  { path: "cluster", title: "Cluster", allowed: () => session.canSubmit, views: { "": cluster.overview } },
  { path: "nodes", title: null, allowed: () => session.isAdmin, views: { ":id": cluster.node } },
  { path: "jobs", title: "Jobs", allowed: () => true, views: { "": jobs.list, ":id": jobs.detail } },
  { path: "models", title: "Models", allowed: () => true, views: { "": models.overview } },
  { path: "proofs", title: "Proofs", allowed: () => true, views: { "": proofs.overview, ":id": proofs.detail } },
  { path: "playground", title: "Playground", allowed: () => session.canSubmit, views: { "": playground.chat } },
];

let leave = () => {};

function takeTokenFromAddress() {
  // ?token= once: kept in this tab's session storage, then gone from the address bar and history.
  const address = new URL(location.href);
  const token = address.searchParams.get("token");
  if (token === null) return;
  keepToken(token.trim());
  address.searchParams.delete("token");
  history.replaceState(null, "", address.pathname + address.search + address.hash);
}

async function signIn(token) {
  keepToken(token);
  try {
    session.me = await call("/api/v1/tokens/self");
  } catch (error) {
    if (error.status === 401) signOut(); // kept when the API is only unreachable: a reload retries
    throw error;
  }
}

function showSignIn(message) {
  leave();
  leave = () => {};
  document.body.dataset.view = "sign-in";
  const input = h("input", { id: "token", name: "token", type: "password", autocomplete: "off", required: true,
                             placeholder: "nx_…", "aria-label": "API token" });
  const status = h("div", { id: "sign-in-status" }, message ? notice(message) : null);
  const form = h("form", {
    id: "sign-in", class: "sign-in",
    onsubmit: async (event) => {
      event.preventDefault();
      clear(status);
      try {
        await signIn(input.value.trim());
        showConsole();
      } catch (error) {
        clear(status, notice(error.status === 401 ? "That token is not valid (unknown, expired or revoked)."
                                                  : `Could not sign in: ${error.message}`));
      }
    },
  },
  h("div", { class: "brand big" }, h("span", { class: "logo" }, "◆"), " Nexus"),
  h("p", { class: "muted" }, "Sign in with an API token. It is kept in this tab only and sent to this API alone."),
  h("label", { for: "token" }, "API token"), input,
  h("button", { type: "submit", class: "primary" }, "Sign in"), status);
  clear(root, h("main", { class: "centered" }, form));
  input.focus();
}

function showConsole() {
  document.body.dataset.view = "console";
  const nav = h("nav", { id: "nav" }, SECTIONS.filter((s) => s.title && s.allowed()).map((s) =>
    h("a", { href: `#/${s.path}`, "data-section": s.path }, s.title)));
  const me = session.me;
  const who = h("div", { class: "who", id: "who" },
                h("div", { class: "who-name" }, me.name),
                h("div", { class: "muted" }, `${me.role} · tenant ${me.tenant}`),
                h("button", { id: "sign-out", class: "link", onclick: () => { signOut(); showSignIn(); } }, "Sign out"));
  const content = h("div", { id: "content" });
  clear(root, h("div", { class: "layout" },
                h("aside", { class: "sidebar" }, h("div", { class: "brand" }, h("span", { class: "logo" }, "◆"), " Nexus"),
                  nav, who),
                h("main", { class: "main" }, content)));
  route();
}

function resolve(hash) {
  const [path, queryString] = hash.replace(/^#\/?/, "").split("?");
  const [first, ...rest] = path.split("/").filter(Boolean).map(decodeURIComponent);
  const fallback = SECTIONS.find((s) => s.title && s.allowed());
  const section = SECTIONS.find((s) => s.path === first && s.allowed()) || fallback;
  const id = section.path === first ? rest.join("/") : "";
  const view = id ? section.views[":id"] : section.views[""];
  return { section, view: view || section.views[""], params: { id, query: new URLSearchParams(queryString || "") } };
}

function route() {
  const content = document.getElementById("content");
  if (!content || !session.me) return;
  leave();
  const { section, view, params } = resolve(location.hash);
  for (const link of document.querySelectorAll("#nav a")) {
    link.classList.toggle("active", link.dataset.section === section.path ||
                                    (section.path === "nodes" && link.dataset.section === "cluster"));
  }
  document.body.dataset.view = section.path;
  clear(content);
  const timers = [];
  let alive = true;
  const context = {
    every(ms, fn) { timers.push(setInterval(fn, ms)); }, // refreshes, stopped when the route changes
    get alive() { return alive; },
  };
  leave = () => { alive = false; timers.forEach(clearInterval); };
  Promise.resolve(view(content, params, context)).catch((error) => content.append(notice(error.message)));
}

async function start() {
  takeTokenFromAddress();
  session.onSignedOut = (message) => showSignIn(message);
  window.addEventListener("hashchange", route);
  if (!session.token) return showSignIn();
  try {
    await signIn(session.token);
    showConsole();
  } catch (error) {
    showSignIn(error.status === 401 ? "That token is not valid (unknown, expired or revoked)." : error.message);
  }
}

start();
