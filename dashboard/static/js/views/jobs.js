// The jobs list (status, model, method, progress, ETA, created; filterable, refreshed every few seconds)
// and the form that creates a job from an uploaded file.

import { ApiError, all, get, post } from "../api.js";
import { TERMINAL, duration, errorBox, every, fill, h, progressBar, statusBadge, when } from "../dom.js";

const REFRESH_MS = 2000;
const STATUS_FILTERS = {
  all: () => true,
  active: (s) => !TERMINAL.has(s),
  running: (s) => s === "running",
  queued: (s) => s === "queued",
  paused: (s) => s === "paused",
  succeeded: (s) => s === "succeeded",
  failed: (s) => s === "failed",
  cancelled: (s) => s === "cancelled",
};

export function method(job) {
  // The peft type, preceded by the training method when it is not plain supervised: "dpo/svfit".
  const peftType = job.peft && job.peft.type;
  const methodType = job.method && job.method.type;
  if (methodType && methodType !== "supervised") return peftType ? `${methodType}/${peftType}` : methodType;
  return peftType || methodType || "-";
}

function eta(job) {
  if (job.status === "running") return duration(job.progress && job.progress.seconds_remaining);
  if (job.status === "queued" && job.queue_position) return `#${job.queue_position} in queue`;
  return "-";
}

function jobRow(job) {
  const p = job.progress || {};
  return h("tr", { dataset: { job: job.id, status: job.status } },
    h("td", {}, h("a", { href: `#/jobs/${job.id}`, class: "mono" }, job.id)),
    h("td", {}, statusBadge(job.status)),
    h("td", { class: "model" }, job.fine_tuned_model || job.model,
      job.fine_tuned_model ? h("div", { class: "muted small" }, `from ${job.model}`) : null),
    h("td", {}, method(job)),
    h("td", {}, progressBar(p.step || 0, p.total_steps)),
    h("td", {}, eta(job)),
    h("td", {}, when(job.created_at)));
}

export function mount(root, query) {
  const params = new URLSearchParams(query || "");
  let jobs = [];
  let hasMore = false;
  const filter = h("select", { id: "job-filter", "aria-label": "Status" },
    Object.keys(STATUS_FILTERS).map((k) => h("option", { value: k }, k)));
  const search = h("input", { type: "search", id: "job-search", placeholder: "Filter by id, model or suffix" });
  const body = h("tbody");
  const more = h("button", { class: "secondary", hidden: true, onclick: loadMore }, "Load older jobs");
  const problem = h("div");
  const formSlot = h("div");
  const newButton = h("button", { id: "new-job", onclick: () => toggleForm() }, "New job");

  root.append(
    h("section", { class: "toolbar" }, h("h1", {}, "Fine-tuning jobs"), h("div", { class: "spacer" }), filter, search, newButton),
    formSlot,
    problem,
    h("table", { class: "grid", id: "jobs" },
      h("thead", {}, h("tr", {}, ["Job", "Status", "Model", "Method", "Progress", "ETA", "Created"].map((t) => h("th", {}, t)))),
      body),
    more);

  function render() {
    const keep = STATUS_FILTERS[filter.value] || STATUS_FILTERS.all;
    const needle = search.value.trim().toLowerCase();
    const shown = jobs.filter((j) => keep(j.status) && (!needle ||
      [j.id, j.model, j.fine_tuned_model, j.user_provided_suffix].some((v) => v && v.toLowerCase().includes(needle))));
    fill(body, shown.length ? shown.map(jobRow)
      : h("tr", {}, h("td", { colspan: 7, class: "empty" }, jobs.length ? "No job matches." : "No jobs yet: create one.")));
    more.hidden = !hasMore;
  }
  filter.addEventListener("change", render);
  search.addEventListener("input", render);

  async function refresh() {
    try {
      const page = await get("fine_tuning/jobs", { limit: 100 });
      // Newest page replaces what it covers; older pages loaded with "Load older jobs" stay below.
      const fresh = new Set(page.data.map((j) => j.id));
      const oldestFresh = page.data.length ? page.data[page.data.length - 1].created_at : -Infinity;
      const older = jobs.filter((j) => !fresh.has(j.id) && j.created_at <= oldestFresh);
      jobs = [...page.data, ...older];
      if (!older.length) hasMore = page.has_more;
      fill(problem);
      render();
    } catch (e) {
      fill(problem, errorBox(e));
    }
  }

  async function loadMore() {
    const page = await get("fine_tuning/jobs", { limit: 100, after: jobs[jobs.length - 1].id });
    jobs.push(...page.data);
    hasMore = page.has_more;
    render();
  }

  function toggleForm(fileId) {
    if (formSlot.firstChild && !fileId) return fill(formSlot);
    fill(formSlot, newJobForm(fileId, () => fill(formSlot)));
  }

  if (params.has("new")) toggleForm(params.get("file") || "");
  return every(REFRESH_MS, refresh);
}

// --- the new-job form -----------------------------------------------------------------------------------

function field(label, input, hint) {
  return h("label", { class: "field" }, h("span", {}, label), input, hint ? h("small", { class: "muted" }, hint) : null);
}

function numberOrAuto(text, name) {
  const value = text.trim();
  if (!value || value === "auto") return "auto";
  const n = Number(value);
  if (!Number.isFinite(n)) throw new ApiError(0, "invalid_parameter", `${name}: a number or "auto"`, name);
  return n;
}

function idempotencyKey() {
  // randomUUID exists only in secure contexts (https, localhost); a plain-http LAN address gets the fallback.
  if (crypto.randomUUID) return crypto.randomUUID();
  return [...crypto.getRandomValues(new Uint8Array(16))].map((b) => b.toString(16).padStart(2, "0")).join("");
}

function newJobForm(fileId, close) {
  const model = h("select", { name: "model", required: true }, h("option", { value: "" }, "loading..."));
  const training = h("select", { name: "training_file", required: true }, h("option", { value: "" }, "loading..."));
  const validation = h("select", { name: "validation_file" }, h("option", { value: "" }, "none"));
  const peftType = h("select", { name: "peft_type" }, ["svfit", "lora", "full"].map((t) => h("option", { value: t }, t)));
  const rank = h("input", { name: "rank", type: "number", min: "1", placeholder: "auto" });
  const energy = h("input", { name: "energy", type: "number", step: "0.01", min: "0", max: "1", placeholder: "auto" });
  const targets = h("input", { name: "target_modules", placeholder: "model default (or all-linear, q_proj,v_proj)" });
  const epochs = h("input", { name: "n_epochs", placeholder: "auto" });
  const batch = h("input", { name: "batch_size", placeholder: "auto" });
  const lrMult = h("input", { name: "learning_rate_multiplier", placeholder: "auto" });
  const suffix = h("input", { name: "suffix", maxlength: "64", placeholder: "optional" });
  const seed = h("input", { name: "seed", type: "number", min: "0", placeholder: "random" });
  const extra = h("textarea", { name: "peft_extra", rows: 2, placeholder: '{"checkpoint_every": 50}' });
  const problem = h("div");
  const submit = h("button", { type: "submit" }, "Create job");

  const form = h("form", { class: "panel", id: "new-job-form", onsubmit: create },
    h("h2", {}, "New fine-tuning job"),
    h("div", { class: "form-grid" },
      field("Base model", model),
      field("Training file", training, h("span", {}, "Upload on the ", h("a", { href: "#/files" }, "Files"), " page.")),
      field("Validation file", validation),
      field("Method", peftType, "SVFit trains only the top singular values."),
      field("Rank", rank), field("Energy", energy), field("Target modules", targets),
      field("Epochs", epochs), field("Batch size", batch), field("LR multiplier", lrMult),
      field("Suffix", suffix), field("Seed", seed),
      field("More peft options (JSON)", extra)),
    problem,
    h("div", { class: "actions" }, submit, h("button", { type: "button", class: "secondary", onclick: close }, "Close")));

  (async () => {
    try {
      const [models, files] = await Promise.all([get("models"), all("files", { purpose: "fine-tune" }, 500)]);
      const bases = models.data.filter((m) => !m.parent);
      fill(model, bases.length ? bases.map((m) => h("option", { value: m.id }, m.id)) : h("option", { value: "" }, "no base models"));
      const usable = files.filter((f) => f.status === "processed");
      const options = () => usable.map((f) => h("option", { value: f.id }, `${f.filename} (${f.id})`));
      fill(training, usable.length ? options() : h("option", { value: "" }, "no processed files: upload one"));
      fill(validation, h("option", { value: "" }, "none"), options());
      if (fileId) training.value = fileId;
    } catch (e) {
      fill(problem, errorBox(e));
    }
  })();

  async function create(event) {
    event.preventDefault();
    fill(problem);
    submit.disabled = true;
    try {
      const body = { model: model.value, training_file: training.value };
      if (validation.value) body.validation_file = validation.value;
      if (suffix.value.trim()) body.suffix = suffix.value.trim();
      if (seed.value) body.seed = Number(seed.value);
      body.hyperparameters = {
        n_epochs: numberOrAuto(epochs.value, "n_epochs"),
        batch_size: numberOrAuto(batch.value, "batch_size"),
        learning_rate_multiplier: numberOrAuto(lrMult.value, "learning_rate_multiplier"),
      };
      const peft = { type: peftType.value };
      if (rank.value) peft.rank = Number(rank.value);
      if (energy.value) peft.energy = Number(energy.value);
      const t = targets.value.trim();
      if (t) peft.target_modules = t === "all-linear" ? t : t.split(",").map((s) => s.trim()).filter(Boolean);
      if (extra.value.trim()) {
        try {
          Object.assign(peft, JSON.parse(extra.value));
        } catch {
          throw new ApiError(0, "invalid_json", "More peft options must be a JSON object.", "peft");
        }
      }
      body.peft = peft;
      // A key per submission: should the request be retried (a proxy, a flaky link), one job is created, not two.
      const job = await post("fine_tuning/jobs", body, { headers: { "Idempotency-Key": idempotencyKey() } });
      location.hash = `#/jobs/${job.id}`;
    } catch (e) {
      fill(problem, errorBox(e));
      submit.disabled = false;
    }
  }
  return form;
}
