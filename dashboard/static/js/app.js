// The dashboard's entry point: the key form, the connection light, and a hash router that mounts one view
// at a time (each view returns a cleanup that stops its polling).

import { apiKey, get, onUnauthorized, setApiKey } from "./api.js";
import { every, fill } from "./dom.js";
import * as filesView from "./views/files.js";
import * as jobView from "./views/job.js";
import * as jobsView from "./views/jobs.js";
import * as modelsView from "./views/models.js";

const ROUTES = [
  [/^#\/jobs\/([^/?]+)$/, jobView, "jobs"],
  [/^#\/jobs(?:\?(.*))?$/, jobsView, "jobs"],
  [/^#\/files$/, filesView, "files"],
  [/^#\/models(?:\?(.*))?$/, modelsView, "models"],
];

const view = document.getElementById("view");
const banner = document.getElementById("banner");
let cleanup = null;

function route() {
  if (cleanup) cleanup();
  cleanup = null;
  const hash = location.hash || "#/jobs";
  for (const [pattern, module, nav] of ROUTES) {
    const match = hash.match(pattern);
    if (!match) continue;
    document.querySelectorAll("[data-nav]").forEach((a) => a.classList.toggle("active", a.dataset.nav === nav));
    fill(view);
    cleanup = module.mount(view, match[1] || "") || null;
    return;
  }
  location.hash = "#/jobs";
}

function showBanner(text) {
  fill(banner, text);
  banner.hidden = !text;
}

function setupKeyForm() {
  const form = document.getElementById("keyform");
  const input = document.getElementById("apikey");
  input.value = apiKey();
  form.addEventListener("submit", (e) => {
    e.preventDefault();
    setApiKey(input.value.trim());
    showBanner("");
    route(); // reload the current view with the new key
  });
  onUnauthorized((error) => {
    showBanner(`${error.message} Enter an API key (from \`svfit keys create --org NAME\`) at the top right.`);
    input.focus();
  });
}

function setupConnectionLight() {
  const light = document.getElementById("conn");
  every(10000, async () => {
    try {
      await get("models");
      light.className = "conn ok";
      light.title = "API reachable";
    } catch (e) {
      light.className = e.status === 401 ? "conn warn" : "conn down";
      light.title = `${e.code}: ${e.message}`;
    }
  });
}

setupKeyForm();
setupConnectionLight();
window.addEventListener("hashchange", route);
route();
