// Training files: upload by drag-and-drop (or a file picker) with a byte progress bar, the list, and each
// file's validation report from `status_details`, with the line numbers of problems picked out.

import { all, del, uploadFile } from "../api.js";
import { bytes, errorBox, fill, h, statusBadge, when } from "../dom.js";

const LINE_PROBLEM = /^line (\d+):\s*(.*)$/;

// status_details is plain text: a summary line, then one "line N: problem" per line.
export function validationReport(file) {
  const lines = (file.status_details || "").split("\n").filter(Boolean);
  if (!lines.length) return h("p", { class: "muted" }, "No report yet.");
  return h("div", { class: `report report-${file.status}`, dataset: { file: file.id } },
    lines.map((line) => {
      const m = line.match(LINE_PROBLEM);
      return m
        ? h("div", { class: "report-line" }, h("span", { class: "lineno" }, `line ${m[1]}`), " ", m[2])
        : h("div", { class: "report-summary" }, line);
    }));
}

export function mount(root) {
  const input = h("input", { type: "file", id: "file-input", accept: ".jsonl,.json,.txt,application/jsonl", multiple: true, hidden: true });
  const drop = h("div", { class: "dropzone", id: "dropzone", tabindex: 0, role: "button" },
    h("strong", {}, "Drop JSONL files here"), h("span", { class: "muted" }, " or click to choose"),
    h("p", { class: "muted small" }, "chat {messages}, {prompt, completion} or classification {text, label}; one example per line"));
  const uploads = h("div", { id: "uploads" });
  const problem = h("div");
  const body = h("tbody");

  root.append(
    h("section", { class: "toolbar" }, h("h1", {}, "Files")),
    h("section", { class: "panel" }, drop, input, uploads),
    problem,
    h("table", { class: "grid", id: "files" },
      h("thead", {}, h("tr", {}, ["File", "Name", "Size", "Status", "Created", ""].map((t) => h("th", {}, t)))),
      body));

  drop.addEventListener("click", () => input.click());
  drop.addEventListener("keydown", (e) => (e.key === "Enter" || e.key === " ") && input.click());
  drop.addEventListener("dragover", (e) => {
    e.preventDefault();
    drop.classList.add("over");
  });
  drop.addEventListener("dragleave", () => drop.classList.remove("over"));
  drop.addEventListener("drop", (e) => {
    e.preventDefault();
    drop.classList.remove("over");
    [...e.dataTransfer.files].forEach(upload);
  });
  input.addEventListener("change", () => {
    [...input.files].forEach(upload);
    input.value = "";
  });

  async function upload(file) {
    const bar = h("div", { class: "progress-fill" });
    const label = h("span", {}, `0 / ${bytes(file.size)}`);
    const result = h("div");
    const card = h("div", { class: "upload" }, h("strong", {}, file.name), h("div", { class: "progress" }, bar, label), result);
    uploads.prepend(card);
    try {
      const created = await uploadFile(file, "fine-tune", (sent, total) => {
        bar.style.width = `${((100 * sent) / (total || 1)).toFixed(1)}%`;
        label.textContent = `${bytes(sent)} / ${bytes(total)}`;
      });
      bar.style.width = "100%";
      fill(result, h("p", {}, h("code", {}, created.id), " ", statusBadge(created.status), " ",
        created.status === "processed" ? h("a", { href: `#/jobs?new&file=${created.id}` }, "Fine-tune with it") : null),
      validationReport(created));
      card.dataset.file = created.id;
      card.dataset.status = created.status;
      refresh();
    } catch (e) {
      fill(result, errorBox(e));
    }
  }

  function fileRows(file) {
    const report = h("tr", { class: "details", hidden: true }, h("td", { colspan: 6 }, validationReport(file)));
    const toggle = h("button", { class: "link", onclick: () => (report.hidden = !report.hidden) }, "report");
    const remove = h("button", { class: "link danger", onclick: async () => {
      if (!confirm(`Delete ${file.filename} (${file.id})?`)) return;
      try {
        await del(`files/${file.id}`);
        refresh();
      } catch (e) {
        fill(problem, errorBox(e));
      }
    } }, "delete");
    return [
      h("tr", { dataset: { file: file.id, status: file.status } },
        h("td", { class: "mono" }, file.id),
        h("td", {}, file.filename, file.purpose !== "fine-tune" ? h("div", { class: "muted small" }, file.purpose) : null),
        h("td", {}, bytes(file.bytes)),
        h("td", {}, statusBadge(file.status)),
        h("td", {}, when(file.created_at)),
        h("td", { class: "row-actions" }, toggle,
          file.status === "processed" && file.purpose === "fine-tune"
            ? h("a", { href: `#/jobs?new&file=${file.id}` }, "fine-tune") : null,
          remove)),
      report,
    ];
  }

  async function refresh() {
    try {
      const files = await all("files", { order: "desc" }, 1000);
      fill(body, files.length ? files.map(fileRows) : h("tr", {}, h("td", { colspan: 6, class: "empty" }, "No files yet.")));
      fill(problem);
    } catch (e) {
      fill(problem, errorBox(e));
    }
  }
  refresh();
  return null;
}
