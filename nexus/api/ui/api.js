// The public API, called with the signed-in token. Paths are relative to the page (/ui/),
// so the console works wherever the API is mounted.

const TOKEN_KEY = "nexus.console.token";
const ROOT = new URL("../", document.baseURI);

export class ApiError extends Error {
  constructor(status, message, details) {
    super(message);
    this.status = status;
    this.details = details || {};
  }
}

export const session = {
  token: sessionStorage.getItem(TOKEN_KEY),
  me: null, // {id, name, role, tenant} from GET /api/v1/tokens/self
  onSignedOut: () => {},
  get isAdmin() { return this.me?.role === "admin"; },
  get canSubmit() { return ["admin", "submitter"].includes(this.me?.role); },
};

export function keepToken(token) {
  session.token = token;
  sessionStorage.setItem(TOKEN_KEY, token);
}

export function signOut() {
  session.token = null;
  session.me = null;
  sessionStorage.removeItem(TOKEN_KEY);
}

export function url(path, query = {}) {
  const target = new URL(path.replace(/^\//, ""), ROOT);
  for (const [key, value] of Object.entries(query)) {
    if (value !== undefined && value !== null && value !== "") target.searchParams.set(key, value);
  }
  return target;
}

const READ_RETRIES = 2; // a read that meets a moment's outage (503, no answer) is tried again a second later

export async function call(path, { method = "GET", body, query, signal } = {}) {
  const headers = { Authorization: `Bearer ${session.token}`, Accept: "application/json" };
  if (body !== undefined) headers["Content-Type"] = "application/json";
  const request = () => fetch(url(path, query), {
    method, headers, signal, body: body === undefined ? undefined : JSON.stringify(body),
  });
  let response;
  for (let attempt = 0; ; attempt += 1) {
    const retry = method === "GET" && attempt < READ_RETRIES;
    try {
      response = await request();
    } catch (error) {
      if (!retry || error.name === "AbortError") throw error;
      await new Promise((done) => setTimeout(done, 1000));
      continue;
    }
    if (response.status !== 503 || !retry) break;
    await new Promise((done) => setTimeout(done, 1000));
  }
  const data = (response.headers.get("Content-Type") || "").includes("json") ? await response.json() : null;
  if (response.status === 401 && session.me) { // signed in until now: the token was revoked or expired
    signOut();
    session.onSignedOut(data?.error?.message || "Your token is no longer valid.");
  }
  if (!response.ok) {
    const error = data?.error || {};
    throw new ApiError(response.status, error.message || `${response.status} ${response.statusText}`, error.details);
  }
  return data;
}

/** A chat completion streamed over server-sent events: onDelta(text) per chunk; resolves when done. */
export async function streamChat(body, onDelta, signal) {
  const response = await fetch(url("/v1/chat/completions"), {
    method: "POST", signal,
    headers: { Authorization: `Bearer ${session.token}`, "Content-Type": "application/json" },
    body: JSON.stringify({ ...body, stream: true }),
  });
  if (!response.ok) {
    const data = await response.json().catch(() => ({}));
    throw new ApiError(response.status, data?.error?.message || `${response.status} ${response.statusText}`);
  }
  const reader = response.body.pipeThrough(new TextDecoderStream()).getReader();
  let buffer = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) return;
    buffer += value;
    let end;
    while ((end = buffer.indexOf("\n\n")) >= 0) {
      const event = buffer.slice(0, end);
      buffer = buffer.slice(end + 2);
      for (const line of event.split("\n")) {
        if (!line.startsWith("data:")) continue;
        const data = line.slice(5).trim();
        if (data === "[DONE]") return;
        const chunk = JSON.parse(data);
        if (chunk.error) throw new ApiError(500, chunk.error.message || "generation failed");
        const text = chunk.choices?.[0]?.delta?.content;
        if (text) onDelta(text);
      }
    }
  }
}
