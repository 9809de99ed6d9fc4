// One job: its state and controls (cancel / pause / resume), live loss and accuracy curves built from the
// metrics events, the events log, checkpoints with their metrics, hyperparameters and the resolved `peft`
// block, and artifact downloads. Polls while the job can still change; stops once it has ended.

import { get, post } from "../api.js";
import { MetricsCurves } from "../charts.js";
import { TERMINAL, duration, errorBox, every, fill, h, num, progressBar, statusBadge, when } from "../dom.js";
import { saveFromApi } from "../download.js";
import { method } from "./jobs.js";

const POLL_MS = 1000;
const EVENT_PAGE = 100;
const FORMATS = [
  ["svfit", "SVFit adapter", "the native adapter: r numbers per matrix"],
  ["peft_lora", "PEFT LoRA", "loads with PeftModel.from_pretrained"],
  ["merged", "Merged model", "full HF model, update merged in (large)"],
];

// Reads the events the page has not seen yet, oldest first, from the newest-first cursor list.
class EventFeed {
  constructor(jobId) {
    this.path = `fine_tuning/jobs/${jobId}/events`;
    this.newest = null;
  }

  async next() {
    const fresh = [];
    let after;
    for (;;) {
      const page = await get(this.path, { limit: EVENT_PAGE, after });
      let caughtUp = false;
      for (const event of page.data) {
        if (event.id === this.newest) {
          caughtUp = true;
          break;
        }
        fresh.push(event);
      }
      if (caughtUp || !page.has_more || !page.data.length) break;
      after = page.data[page.data.length - 1].id;
    }
    if (fresh.length) this.newest = fresh[0].id;
    return fresh.reverse();
  }
}

function definitionList(object) {
  const rows = Object.entries(object || {}).filter(([, v]) => v !== null && v !== undefined);
  if (!rows.length) return h("p", { class: "muted" }, "-");
  return h("dl", { class: "kv" }, rows.map(([k, v]) => [h("dt", {}, k),
    h("dd", { class: "mono" }, typeof v === "object" ? JSON.stringify(v) : String(v))]));
}

export function mount(root, jobId) {
  const feed = new EventFeed(jobId);
  const curves = new MetricsCurves();
  let events = [];
  let checkpoints = [];
  let job = null;

  const title = h("h1", { class: "mono" }, jobId);
  const badge = h("span");
  const problem = h("div");
  const jobError = h("div");
  const summary = h("div", { class: "summary" });
  const controls = {
    cancel: h("button", { class: "danger", id: "job-cancel", onclick: () => act("cancel") }, "Cancel"),
    pause: h("button", { class: "secondary", id: "job-pause", onclick: () => act("pause") }, "Pause"),
    resume: h("button", { class: "secondary", id: "job-resume", onclick: () => act("resume") }, "Resume"),
  };
  const stepSelect = h("select", { id: "artifact-step", "aria-label": "Weights" }, h("option", { value: "" }, "final weights"));
  const artifactButtons = FORMATS.map(([format, label, hint]) =>
    h("button", { class: "secondary", title: hint, dataset: { format }, onclick: () => download(format) }, `Download ${label}`));
  const artifactReport = h("p", { class: "muted small", id: "artifact-report" });
  const resultFiles = h("span", { id: "result-files" });
  const checkpointBody = h("tbody");
  const hyper = h("div", { id: "hyperparameters" });
  const peft = h("div", { id: "peft" });
  const showMetrics = h("input", { type: "checkbox", id: "show-metrics" });
  const log = h("ol", { class: "log", id: "events" });

  root.append(
    h("p", { class: "crumbs" }, h("a", { href: "#/jobs" }, "Jobs"), " / "),
    h("section", { class: "toolbar" }, title, badge, h("div", { class: "spacer" }), controls.pause, controls.resume, controls.cancel),
    problem, jobError, summary,
    h("section", { class: "panel" }, h("h2", {}, "Training curves"), curves.el),
    h("div", { class: "columns" },
      h("section", { class: "panel" }, h("h2", {}, "Artifacts"),
        h("div", { class: "actions wrap" }, stepSelect, artifactButtons, resultFiles), artifactReport,
        h("h2", {}, "Checkpoints"),
        h("table", { class: "grid compact", id: "checkpoints" },
          h("thead", {}, h("tr", {}, ["Step", "Train loss", "Valid loss", "Accuracy", "Created", "Model"].map((t) => h("th", {}, t)))),
          checkpointBody)),
      h("section", { class: "panel" }, h("h2", {}, "Hyperparameters"), hyper, h("h2", {}, "PEFT (resolved)"), peft)),
    h("section", { class: "panel" },
      h("div", { class: "toolbar" }, h("h2", {}, "Events"), h("div", { class: "spacer" }),
        h("label", { class: "small" }, showMetrics, " show metrics events")),
      log));
  showMetrics.addEventListener("change", renderLog);

  function renderJob() {
    fill(badge, statusBadge(job.status));
    const p = job.progress || {};
    const rows = [
      ["Base model", job.model],
      ["Fine-tuned model", job.fine_tuned_model ? h("code", { id: "fine-tuned-model" }, job.fine_tuned_model) : "-"],
      ["Method", method(job)],
      ["Progress", progressBar(p.step || 0, p.total_steps)],
      ["Epoch", p.epoch !== null && p.epoch !== undefined ? num(p.epoch, 2) : "-"],
      ["ETA", job.status === "running" ? duration(p.seconds_remaining) : "-"],
      ["Queue position", job.queue_position || "-"],
      ["Trained tokens", job.trained_tokens ?? "-"],
      ["Training file", h("code", {}, job.training_file)],
      ["Validation file", job.validation_file ? h("code", {}, job.validation_file) : "-"],
      ["Created", when(job.created_at)],
      ["Finished", when(job.finished_at)],
    ];
    fill(summary, h("dl", { class: "kv wide" }, rows.map(([k, v]) => [h("dt", {}, k), h("dd", {}, v)])));
    fill(jobError, job.error ? errorBox(job.error) : null);
    fill(hyper, definitionList(job.hyperparameters));
    fill(peft, definitionList(job.peft));
    const ended = TERMINAL.has(job.status);
    controls.cancel.disabled = ended;
    controls.pause.disabled = ended || job.status === "paused";
    controls.resume.disabled = job.status !== "paused";
    renderArtifacts();
  }

  function renderArtifacts() {
    const chosen = stepSelect.value;
    fill(stepSelect, h("option", { value: "" }, "final weights"),
      checkpoints.map((c) => h("option", { value: String(c.step_number) }, `checkpoint step ${c.step_number}`)));
    stepSelect.value = chosen;
    // The final weights exist once the job succeeded; a checkpoint's as soon as it is listed.
    const available = stepSelect.value ? true : job && job.status === "succeeded";
    for (const button of artifactButtons) button.disabled = !available;
    fill(resultFiles, (job ? job.result_files : []).map((id) =>
      h("button", { class: "link", dataset: { file: id }, onclick: () => save(`files/${id}/content`, {}, `${jobId}-metrics.csv`) },
        "Download metrics CSV")));
  }
  stepSelect.addEventListener("change", renderArtifacts);

  function renderCheckpoints() {
    fill(checkpointBody, checkpoints.length ? checkpoints.map((c) => h("tr", {},
      h("td", {}, c.step_number),
      h("td", {}, num(c.metrics.train_loss)),
      h("td", {}, num(c.metrics.valid_loss)),
      h("td", {}, num(c.metrics.valid_mean_token_accuracy ?? c.metrics.train_mean_token_accuracy)),
      h("td", {}, when(c.created_at)),
      h("td", { class: "mono small" }, c.fine_tuned_model_checkpoint)))
      : h("tr", {}, h("td", { colspan: 6, class: "empty" }, "No checkpoints yet.")));
  }

  function renderLog() {
    const shown = events.filter((e) => showMetrics.checked || e.type !== "metrics");
    // Newest first, like the API; the list is capped so a long run does not grow the page without end.
    fill(log, shown.slice(-500).reverse().map((e) => h("li", { class: `level-${e.level}`, dataset: { type: e.type } },
      h("span", { class: "muted mono" }, new Date(e.created_at * 1000).toLocaleTimeString()), " ",
      e.level !== "info" ? h("strong", {}, `${e.level} `) : null, e.message)));
  }

  async function act(action) {
    fill(problem);
    try {
      job = await post(`fine_tuning/jobs/${jobId}/${action}`);
      renderJob();
      restart();
    } catch (e) {
      fill(problem, errorBox(e));
    }
  }

  async function save(path, params, name) {
    try {
      await saveFromApi(path, params, name, artifactReport);
    } catch (e) {
      fill(artifactReport, errorBox(e));
    }
  }

  function download(format) {
    const step = stepSelect.value ? Number(stepSelect.value) : undefined;
    const name = `${jobId}-${format}${step !== undefined ? `-step-${step}` : ""}.tar.gz`;
    return save(`fine_tuning/jobs/${jobId}/artifacts`, { format, step }, name);
  }

  async function refresh() {
    try {
      const [fresh, newEvents, ckpts] = await Promise.all([
        get(`fine_tuning/jobs/${jobId}`),
        feed.next(),
        get(`fine_tuning/jobs/${jobId}/checkpoints`, { limit: 100 }),
      ]);
      job = fresh;
      checkpoints = ckpts.data;
      if (newEvents.length) {
        events.push(...newEvents);
        curves.add(newEvents);
        renderLog();
      }
      fill(problem);
      renderCheckpoints();
      renderJob();
    } catch (e) {
      fill(problem, errorBox(e));
      if (e.status === 404) return false;
    }
    // One more poll after the end: the last events and checkpoints land around the final status write.
    if (job && TERMINAL.has(job.status)) {
      if (settled) return false;
      settled = true;
    }
    return true;
  }

  let settled = false;
  let stop = every(POLL_MS, refresh);
  function restart() {
    stop();
    settled = false;
    stop = every(POLL_MS, refresh);
  }
  return () => {
    stop();
    curves.destroy();
  };
}
