// Playground: a chat with any served model through /v1, the reply streamed as it is generated.

import { call, streamChat } from "../api.js";
import { clear, h, notice } from "../dom.js";

export async function chat(content) {
  const { data: models } = await call("/v1/models");
  const history = []; // the conversation so far, as /v1/chat/completions takes it
  const model = h("select", { id: "chat-model", name: "model" }, models.map((m) => h("option", { value: m.id }, m.id)));
  const maxTokens = h("input", { id: "chat-max-tokens", type: "number", min: 1, max: 4096, value: 64, size: 5 });
  const temperature = h("input", { id: "chat-temperature", type: "number", min: 0, max: 2, step: 0.1, value: 0.7, size: 4 });
  const log = h("div", { class: "chat-log", id: "chat-log" },
                h("p", { class: "empty" }, models.length ? "Say something to the model." : "No model is served: deploy one under Models."));
  const input = h("textarea", { id: "chat-input", rows: 3, placeholder: "Your message (Enter sends, Shift+Enter breaks the line)" });
  const stats = h("span", { class: "muted small", id: "chat-stats" });
  const send = h("button", { type: "submit", class: "primary", id: "chat-send", disabled: !models.length }, "Send");
  let controller = null;

  function bubble(role, text) {
    const el = h("div", { class: `bubble ${role}`, "data-role": role }, h("div", { class: "speaker small muted" }, role), h("div", { class: "text" }, text));
    if (log.querySelector(".empty")) clear(log);
    log.append(el);
    log.scrollTop = log.scrollHeight;
    return el.querySelector(".text");
  }

  async function submit(event) {
    event.preventDefault();
    if (controller) { controller.abort(); return; }
    const text = input.value.trim();
    if (!text || !model.value) return;
    input.value = "";
    history.push({ role: "user", content: text });
    bubble("user", text);
    const reply = bubble("assistant", "");
    reply.parentElement.classList.add("streaming");
    controller = new AbortController();
    send.textContent = "Stop";
    const started = performance.now();
    let chunks = 0;
    try {
      await streamChat({ model: model.value, messages: history, max_tokens: Number(maxTokens.value) || 64,
                        ...(temperature.value === "" ? {} : { temperature: Number(temperature.value) }) }, (delta) => {
        chunks += 1;
        reply.textContent += delta;
        log.scrollTop = log.scrollHeight;
      }, controller.signal);
      stats.textContent = `${chunks} chunks, ${reply.textContent.length} characters in ${((performance.now() - started) / 1000).toFixed(1)} s`;
    } catch (error) {
      if (error.name !== "AbortError") reply.parentElement.append(notice(error.message));
    } finally {
      reply.parentElement.classList.remove("streaming");
      reply.parentElement.classList.add("done");
      history.push({ role: "assistant", content: reply.textContent });
      controller = null;
      send.textContent = "Send";
    }
  }

  input.addEventListener("keydown", (event) => {
    if (event.key === "Enter" && !event.shiftKey) submit(event);
  });
  clear(content,
        h("header", { class: "page-head" }, h("h1", {}, "Playground")),
        h("form", { class: "chat", id: "chat", onsubmit: submit },
          h("div", { class: "chat-options" }, h("label", {}, "Model ", model), h("label", {}, "Max tokens ", maxTokens),
            h("label", {}, "Temperature ", temperature),
            h("button", { type: "button", class: "small", onclick: () => { history.length = 0; clear(log); } }, "New chat"), stats),
          log, h("div", { class: "chat-input" }, input, send)));
  input.focus();
}
