// Building the page from data without ever parsing data as HTML: every value goes in as text.

export function h(tag, attrs = {}, ...children) {
  const el = document.createElement(tag);
  for (const [key, value] of Object.entries(attrs || {})) {
    if (value === undefined || value === null || value === false) continue;
    if (key.startsWith("on")) el.addEventListener(key.slice(2), value);
    else if (key === "class") el.className = value;
    else if (key === "value") el.value = value;
    else el.setAttribute(key, value === true ? "" : value);
  }
  append(el, children);
  return el;
}

function append(el, children) {
  for (const child of children.flat(Infinity)) {
    if (child === undefined || child === null || child === false) continue;
    el.append(child instanceof Node ? child : document.createTextNode(String(child)));
  }
}

export function clear(el, ...children) {
  el.replaceChildren();
  append(el, children);
  return el;
}

export const STATE_TONES = {
  ready: "good", succeeded: "good", running: "busy", serving: "good", live: "good", accepted: "good",
  queued: "wait", retrying: "wait", pending: "wait", starting: "wait", draining: "warn", quarantined: "bad",
  offline: "bad", failed: "bad", rejected: "bad", cancelled: "mute", removed: "mute", stopped: "mute",
};

export function badge(state, label) {
  return h("span", { class: `badge ${STATE_TONES[state] || "mute"}`, "data-state": state }, label || state);
}

export function shortId(id) {
  return id ? String(id).slice(0, 8) : "";
}

export function when(iso) {
  if (!iso) return "–";
  const date = new Date(iso);
  return date.toLocaleString(undefined, { month: "short", day: "numeric", hour: "2-digit", minute: "2-digit",
                                          second: "2-digit" });
}

export function ago(seconds) {
  if (seconds === null || seconds === undefined) return "never";
  if (seconds < 60) return `${Math.max(0, Math.round(seconds))} s ago`;
  if (seconds < 3600) return `${Math.round(seconds / 60)} min ago`;
  if (seconds < 86400) return `${Math.round(seconds / 3600)} h ago`;
  return `${Math.round(seconds / 86400)} d ago`;
}

export function sinceIso(iso) {
  return iso ? ago((Date.now() - new Date(iso).getTime()) / 1000) : "never";
}

export function gib(mb) {
  if (!mb) return "0 GiB";
  return `${(mb / 1024).toFixed(mb >= 10240 ? 0 : 1)} GiB`;
}

export function meter(fraction, label) {
  const pct = Math.max(0, Math.min(1, fraction || 0)) * 100;
  const tone = pct > 90 ? "bad" : pct > 70 ? "warn" : "good";
  const fill = h("span", { class: `fill ${tone}` });
  fill.style.width = `${pct.toFixed(1)}%`; // through the CSSOM: the page's policy refuses inline style attributes
  return h("span", { class: "meter", title: label || `${pct.toFixed(0)}%` }, fill);
}

export function json(value) {
  return h("pre", { class: "json" }, value === undefined || value === null ? "–" : JSON.stringify(value, null, 2));
}

export function table(headers, rows, empty = "Nothing here yet.") {
  if (!rows.length) return h("p", { class: "empty" }, empty);
  return h("table", {},
           h("thead", {}, h("tr", {}, headers.map((name) => h("th", {}, name)))),
           h("tbody", {}, rows));
}

export function field(label, value) {
  return [h("dt", {}, label), h("dd", {}, value === undefined || value === null || value === "" ? "–" : value)];
}

export function section(title, ...children) {
  return h("section", { class: "panel" }, h("h2", {}, title), ...children);
}

export function notice(message, tone = "bad") {
  return h("p", { class: `notice ${tone}`, role: "alert" }, message);
}
