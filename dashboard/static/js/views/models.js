// Models: the base models and the organization's fine-tunes and checkpoints, and a small playground that
// calls /v1/chat/completions or /v1/completions (streamed or not), /v1/classifications (a text, or a text pair
// given a second text) or /v1/embeddings (similarity of each line to the first) on any of them.

import { del, get, modelPath, post, streamEvents } from "../api.js";
import { errorBox, fill, h, when } from "../dom.js";

export function mount(root, query) {
  const params = new URLSearchParams(query || "");
  const problem = h("div");
  const bases = h("tbody");
  const tunes = h("tbody");
  const playground = new Playground();

  root.append(
    h("section", { class: "toolbar" }, h("h1", {}, "Models")),
    problem,
    h("div", { class: "columns" },
      h("section", { class: "panel" },
        h("h2", {}, "Base models"),
        h("table", { class: "grid compact", id: "base-models" },
          h("thead", {}, h("tr", {}, ["Model", "Added", ""].map((t) => h("th", {}, t)))), bases),
        h("h2", {}, "Fine-tunes and checkpoints"),
        h("table", { class: "grid compact", id: "fine-tunes" },
          h("thead", {}, h("tr", {}, ["Model", "Created", ""].map((t) => h("th", {}, t)))), tunes)),
      playground.el));

  async function remove(model) {
    if (!confirm(`Unregister ${model.id}? Its weights stay in the store.`)) return;
    try {
      await del(modelPath(model.id));
      refresh();
    } catch (e) {
      fill(problem, errorBox(e));
    }
  }

  async function refresh() {
    try {
      const models = (await get("models")).data;
      const try_ = (m) => h("button", { class: "link", onclick: () => playground.use(m.id) }, "try");
      const baseModels = models.filter((m) => !m.parent);
      // Newest first, each fine-tune above its own checkpoints.
      const fineTunes = models.filter((m) => m.parent).sort((a, b) => b.created - a.created || a.id.length - b.id.length);
      fill(bases, baseModels.length ? baseModels.map((m) => h("tr", { dataset: { model: m.id } },
        h("td", { class: "mono" }, m.id), h("td", {}, when(m.created)), h("td", { class: "row-actions" }, try_(m))))
        : h("tr", {}, h("td", { colspan: 3, class: "empty" }, "No base models in SVFIT_MODELS_DIR.")));
      fill(tunes, fineTunes.length ? fineTunes.map((m) => h("tr", { dataset: { model: m.id } },
        h("td", { class: "mono small" }, m.id, h("div", { class: "muted" }, `from ${m.parent}`,
          m.id.includes(":ckpt-step-") ? " · checkpoint" : "")),
        h("td", {}, when(m.created)),
        h("td", { class: "row-actions" }, try_(m), h("button", { class: "link danger", onclick: () => remove(m) }, "delete"))))
        : h("tr", {}, h("td", { colspan: 3, class: "empty" }, "No fine-tunes yet.")));
      playground.setModels(models.map((m) => m.id), params.get("model"));
      fill(problem);
    } catch (e) {
      fill(problem, errorBox(e));
    }
  }
  refresh();
  return () => playground.stop();
}

class Playground {
  constructor() {
    this.history = []; // chat turns so far
    this.controller = null;
    this.model = h("select", { id: "pg-model", "aria-label": "Model" });
    this.mode = h("select", { id: "pg-mode", "aria-label": "Mode" },
      h("option", { value: "chat" }, "chat"), h("option", { value: "completion" }, "completion"),
      h("option", { value: "classify" }, "classification"), h("option", { value: "similarity" }, "similarity"));
    this.stream = h("input", { type: "checkbox", id: "pg-stream", checked: true });
    this.maxTokens = h("input", { type: "number", id: "pg-max-tokens", value: "64", min: "1" });
    this.temperature = h("input", { type: "number", id: "pg-temperature", value: "0.7", min: "0", max: "2", step: "0.1" });
    this.system = h("input", { id: "pg-system", placeholder: "system message (optional)" });
    // Chat only: OpenAI's tools list, as JSON; the model's calls show as "[tool call] name {arguments}" lines.
    this.tools = h("textarea", { id: "pg-tools", rows: 2, "aria-label": "Tools",
      placeholder: 'tools (optional), e.g. [{"type": "function", "function": {"name": "get_weather", "parameters": {...}}}]' });
    this.input = h("textarea", { id: "pg-input", rows: 3, placeholder: "Type a message; Ctrl+Enter sends" });
    // Classification only: the second text of a pair, for a model trained on {text, text_pair, label} lines.
    this.pair = h("textarea", { id: "pg-pair", rows: 2, hidden: true, "aria-label": "Text pair",
      placeholder: "Second text of a pair (optional, for a model trained on text pairs)" });
    this.output = h("div", { class: "transcript", id: "pg-output" });
    this.problem = h("div");
    this.send = h("button", { id: "pg-send", onclick: () => this.run() }, "Send");
    this.stopButton = h("button", { class: "secondary", hidden: true, onclick: () => this.stop() }, "Stop");
    const sendOnCtrlEnter = (e) => {
      if (e.key === "Enter" && (e.ctrlKey || e.metaKey)) this.run();
    };
    this.input.addEventListener("keydown", sendOnCtrlEnter);
    this.pair.addEventListener("keydown", sendOnCtrlEnter);
    this.mode.addEventListener("change", () => this.reset());
    this.model.addEventListener("change", () => this.reset());
    this.el = h("section", { class: "panel playground", id: "playground" },
      h("h2", {}, "Playground"),
      h("div", { class: "actions wrap" }, this.model, this.mode,
        h("label", { class: "small" }, this.stream, " stream"),
        h("label", { class: "small" }, "max tokens ", this.maxTokens),
        h("label", { class: "small" }, "temperature ", this.temperature)),
      this.system, this.tools, this.output, this.input, this.pair, this.problem,
      h("div", { class: "actions" }, this.send, this.stopButton,
        h("button", { class: "secondary", onclick: () => this.reset() }, "Clear")));
  }

  setModels(ids, preferred) {
    const current = preferred || this.model.value;
    fill(this.model, ids.map((id) => h("option", { value: id }, id)));
    if (current && ids.includes(current)) this.model.value = current;
  }

  use(id) {
    this.model.value = id;
    this.reset();
    this.input.focus();
  }

  reset() {
    this.stop();
    this.history = [];
    fill(this.output);
    fill(this.problem);
    this.system.hidden = this.mode.value !== "chat";
    this.tools.hidden = this.mode.value !== "chat";
    this.pair.hidden = this.mode.value !== "classify";
    this.input.placeholder = this.mode.value === "similarity"
      ? "One text per line: each line is compared with the first" : "Type a message; Ctrl+Enter sends";
  }

  stop() {
    if (this.controller) this.controller.abort();
    this.controller = null;
  }

  bubble(role, text = "") {
    const body = h("div", { class: "bubble-text" }, text);
    this.output.append(h("div", { class: `bubble ${role}` }, h("span", { class: "who" }, role), body));
    this.output.scrollTop = this.output.scrollHeight;
    return body;
  }

  async run() {
    const text = this.input.value.trim();
    if (!text || this.controller) return;
    fill(this.problem);
    this.controller = new AbortController();
    this.send.disabled = true;
    this.stopButton.hidden = false;
    const options = {
      model: this.model.value,
      max_tokens: Number(this.maxTokens.value) || undefined,
      temperature: Number(this.temperature.value),
    };
    try {
      if (this.mode.value === "classify") await this.classify(text);
      else if (this.mode.value === "similarity") await this.similarity(text);
      else if (this.mode.value === "chat") await this.chat(text, options);
      else await this.complete(text, options);
      this.input.value = "";
    } catch (e) {
      if (e.name !== "AbortError") fill(this.problem, errorBox(e));
    } finally {
      this.controller = null;
      this.send.disabled = false;
      this.stopButton.hidden = true;
    }
  }

  // Streams `chunks` into a new bubble; `pick(choice)` is the text a chunk's first choice adds.
  async pour(chunks, pick) {
    const out = this.bubble("assistant");
    let text = "";
    for await (const chunk of chunks) {
      const choice = (chunk.choices || [])[0];
      const piece = choice ? pick(choice) : "";
      if (piece) {
        text += piece;
        out.textContent = text;
        this.output.scrollTop = this.output.scrollHeight;
      }
    }
    return text;
  }

  async chat(text, options) {
    const messages = [];
    if (this.system.value.trim() && !this.history.length) this.history.push({ role: "system", content: this.system.value.trim() });
    this.history.push({ role: "user", content: text });
    messages.push(...this.history);
    this.bubble("user", text);
    const body = { ...options, messages, stream: this.stream.checked };
    if (this.tools.value.trim()) body.tools = JSON.parse(this.tools.value); // a bad list throws: shown as the problem
    const callLines = (calls) => (calls || []).map((c) => `\n[tool call] ${c.function.name} ${c.function.arguments}`).join("");
    let reply;
    if (body.stream) {
      reply = await this.pour(streamEvents("chat/completions", body, this.controller.signal),
        (c) => ((c.delta && c.delta.content) || "") + callLines(c.delta && c.delta.tool_calls));
    } else {
      const answer = await post("chat/completions", body, { signal: this.controller.signal });
      const message = answer.choices[0].message;
      reply = (message.content || "") + callLines(message.tool_calls);
      this.bubble("assistant", reply);
    }
    this.history.push({ role: "assistant", content: reply });
  }

  async complete(text, options) {
    this.bubble("prompt", text);
    const body = { ...options, prompt: text, stream: this.stream.checked };
    if (body.stream) {
      await this.pour(streamEvents("completions", body, this.controller.signal), (c) => c.text || "");
    } else {
      const answer = await post("completions", body, { signal: this.controller.signal });
      this.bubble("assistant", answer.choices[0].text || "");
    }
  }

  // Embeddings are unit length, so a dot product is the cosine similarity.
  async similarity(text) {
    const lines = text.split("\n").map((line) => line.trim()).filter(Boolean);
    this.bubble("input", lines.join("\n"));
    const answer = await post("embeddings", { model: this.model.value, input: lines }, { signal: this.controller.signal });
    const vectors = answer.data.map((d) => d.embedding);
    const cosine = (a, b) => a.reduce((sum, x, i) => sum + x * b[i], 0);
    this.output.append(h("div", { class: "bubble assistant" }, h("span", { class: "who" }, "similarity to the first line"),
      h("table", { class: "grid compact", id: "pg-similarity" }, h("tbody", {}, lines.slice(1).map((line, i) => h("tr", {},
        h("td", {}, line),
        h("td", { class: "mono" }, cosine(vectors[0], vectors[i + 1]).toFixed(4))))))));
  }

  async classify(text) {
    const pair = this.pair.value.trim();
    this.bubble("input", pair ? `${text}\n${pair}` : text);
    const input = pair ? { text, text_pair: pair } : text;
    const answer = await post("classifications", { model: this.model.value, input }, { signal: this.controller.signal });
    this.pair.value = "";
    const result = answer.data[0];
    this.output.append(h("div", { class: "bubble assistant" }, h("span", { class: "who" }, "labels"),
      h("table", { class: "grid compact" }, h("tbody", {}, (result.labels || []).map((l) => h("tr", {},
        h("td", {}, String(l.label)),
        h("td", {}, h("div", { class: "progress" },
          h("div", { class: "progress-fill", style: { width: `${(100 * l.probability).toFixed(1)}%` } }),
          h("span", {}, l.probability.toFixed(3))))))))));
  }
}
