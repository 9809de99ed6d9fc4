// Building the page without innerHTML: filenames, events and model output are user data, so every text
// goes in as a text node. Plus the small pieces every view uses: badges, error boxes, polling, formats.

export function h(tag, props = {}, ...children) {
  const el = document.createElement(tag);
  let value;
  for (const [k, v] of Object.entries(props || {})) {
    if (v === undefined || v === null || v === false) continue;
    if (k === "class") el.className = v;
    else if (k === "dataset") Object.assign(el.dataset, v);
    else if (k === "style" && typeof v === "object") Object.assign(el.style, v);
    else if (k.startsWith("on") && typeof v === "function") el.addEventListener(k.slice(2), v);
    else if (k === "value") value = v; // after the children: a <select> needs its options first
    else if (typeof v === "boolean") el[k] = v; // checked, disabled, hidden: properties, not attributes
    else el.setAttribute(k, String(v));
  }
  append(el, children);
  if (value !== undefined) el.value = value;
  return el;
}

export function append(el, children) {
  for (const child of children.flat(Infinity)) {
    if (child === undefined || child === null || child === false) continue;
    el.append(child instanceof Node ? child : document.createTextNode(String(child)));
  }
  return el;
}

export function fill(el, ...children) {
  el.replaceChildren();
  return append(el, children);
}

export function errorBox(error) {
  if (!error) return null;
  const code = error.code || "error";
  return h("div", { class: "error", role: "alert", dataset: { code } },
    h("strong", {}, code), " ", error.message || String(error),
    error.param ? h("span", { class: "muted" }, ` (param: ${error.param})`) : null);
}

export function statusBadge(status) {
  return h("span", { class: `badge status-${status}` }, status.replace("_", " "));
}

// Calls fn now and then every `ms` until the returned stop() (or fn returning false). Skips ticks while
// the tab is hidden: a dashboard left open in the background should not keep the API busy.
export function every(ms, fn) {
  let stopped = false;
  let timer = null;
  const tick = async () => {
    if (stopped) return;
    let again = true;
    if (!document.hidden) {
      try {
        again = (await fn()) !== false;
      } catch (e) {
        console.warn(e);
      }
    }
    if (again && !stopped) timer = setTimeout(tick, ms);
  };
  tick();
  return () => {
    stopped = true;
    clearTimeout(timer);
  };
}

export function bytes(n) {
  if (n === null || n === undefined) return "-";
  const units = ["B", "KB", "MB", "GB"];
  let i = 0;
  while (n >= 1000 && i < units.length - 1) {
    n /= 1000;
    i += 1;
  }
  return i ? `${n.toFixed(1)} ${units[i]}` : `${n} B`;
}

export function duration(seconds) {
  if (seconds === null || seconds === undefined || seconds < 0) return "-";
  const s = Math.round(seconds);
  const hours = Math.floor(s / 3600);
  const minutes = Math.floor((s % 3600) / 60);
  const rest = String(s % 60).padStart(2, "0");
  return hours ? `${hours}:${String(minutes).padStart(2, "0")}:${rest}` : `${minutes}:${rest}`;
}

export function when(timestamp) {
  if (!timestamp) return "-";
  const ago = Date.now() / 1000 - timestamp;
  const absolute = new Date(timestamp * 1000).toLocaleString();
  let text;
  if (ago < 60) text = "just now";
  else if (ago < 3600) text = `${Math.floor(ago / 60)} min ago`;
  else if (ago < 86400) text = `${Math.floor(ago / 3600)} h ago`;
  else text = new Date(timestamp * 1000).toLocaleDateString();
  return h("time", { title: absolute, datetime: new Date(timestamp * 1000).toISOString() }, text);
}

export function num(value, digits = 4) {
  return typeof value === "number" && Number.isFinite(value) ? value.toFixed(digits) : "-";
}

export function progressBar(step, total) {
  const fraction = total ? Math.min(1, step / total) : 0;
  return h("div", { class: "progress", title: total ? `${step}/${total}` : "" },
    h("div", { class: "progress-fill", style: { width: `${(fraction * 100).toFixed(1)}%` } }),
    h("span", {}, total ? `${step}/${total}` : "-"));
}

export const TERMINAL = new Set(["succeeded", "failed", "cancelled"]);
