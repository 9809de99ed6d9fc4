// The dashboard's only door to the service: the public /v1 API, with the key the user typed (kept in
// localStorage), OpenAI-style error envelopes turned into ApiError, cursor pages, uploads with progress
// and server-sent event streams.

const KEY_STORAGE = "svfit.apiKey";

// Relative to the page, so a dashboard served under a proxy prefix (/svfit/ui/) still finds its /v1.
export const API_BASE = new URL("../v1/", document.baseURI).href;

export class ApiError extends Error {
  constructor(status, code, message, param = null) {
    super(message);
    this.status = status;
    this.code = code;
    this.param = param;
  }
}

export function apiKey() {
  return localStorage.getItem(KEY_STORAGE) || "";
}

export function setApiKey(key) {
  if (key) localStorage.setItem(KEY_STORAGE, key);
  else localStorage.removeItem(KEY_STORAGE);
}

function authHeaders() {
  const key = apiKey();
  return key ? { Authorization: `Bearer ${key}` } : {};
}

export function url(path, params = {}) {
  const u = new URL(path.replace(/^\//, ""), API_BASE);
  for (const [k, v] of Object.entries(params)) if (v !== undefined && v !== null && v !== "") u.searchParams.set(k, v);
  return u.href;
}

// Listeners told about every 401, so the page can ask for a key wherever the refusal happened.
const unauthorizedListeners = new Set();
export function onUnauthorized(fn) {
  unauthorizedListeners.add(fn);
}

function errorFromBody(status, body, fallback) {
  const e = body && typeof body === "object" ? body.error : null;
  if (e && typeof e === "object") return new ApiError(status, e.code || e.type || "error", e.message || fallback, e.param);
  return new ApiError(status, `http_${status}`, fallback);
}

async function errorFrom(response) {
  let body = null;
  try {
    body = await response.json();
  } catch {
    // not JSON: a proxy's page; the status says enough
  }
  const error = errorFromBody(response.status, body, response.statusText || `HTTP ${response.status}`);
  if (response.status === 401) unauthorizedListeners.forEach((fn) => fn(error));
  return error;
}

// One request; the decoded JSON body, or the Response itself with { raw: true }.
export async function request(path, { method = "GET", params, body, headers = {}, signal, raw = false } = {}) {
  const init = { method, headers: { ...authHeaders(), ...headers }, signal };
  if (body instanceof FormData) init.body = body;
  else if (body !== undefined) {
    init.body = JSON.stringify(body);
    init.headers["Content-Type"] = "application/json";
  }
  let response;
  try {
    response = await fetch(url(path, params), init);
  } catch (e) {
    if (e.name === "AbortError") throw e;
    throw new ApiError(0, "api_unreachable", "The API did not answer.");
  }
  if (!response.ok) throw await errorFrom(response);
  return raw ? response : response.json();
}

export const get = (path, params) => request(path, { params });
export const post = (path, body, options = {}) => request(path, { ...options, method: "POST", body });
export const del = (path) => request(path, { method: "DELETE" });

// Model ids hold ':' and '/': escape each segment, keep the slashes (the route takes {model:path}).
export const modelPath = (id) => `models/${id.split("/").map(encodeURIComponent).join("/")}`;

// Every item of a cursor list, following has_more / after.
export async function all(path, params = {}, max = Infinity) {
  const items = [];
  let after;
  while (items.length < max) {
    const page = await get(path, { limit: 100, ...params, after });
    items.push(...page.data);
    if (!page.has_more || !page.data.length) break;
    after = page.data[page.data.length - 1].id;
  }
  return items;
}

// POST /files through XMLHttpRequest: fetch reports no upload progress. onProgress(sentBytes, totalBytes).
export function uploadFile(file, purpose, onProgress) {
  return new Promise((resolve, reject) => {
    const xhr = new XMLHttpRequest();
    xhr.open("POST", url("files"));
    for (const [k, v] of Object.entries(authHeaders())) xhr.setRequestHeader(k, v);
    xhr.upload.onprogress = (e) => onProgress && onProgress(e.loaded, e.lengthComputable ? e.total : file.size);
    xhr.onerror = () => reject(new ApiError(0, "api_unreachable", "The upload did not reach the API."));
    xhr.onload = () => {
      let body = null;
      try {
        body = JSON.parse(xhr.responseText);
      } catch {
        // handled below
      }
      if (xhr.status >= 200 && xhr.status < 300 && body) return resolve(body);
      const error = errorFromBody(xhr.status, body, xhr.statusText || `HTTP ${xhr.status}`);
      if (xhr.status === 401) unauthorizedListeners.forEach((fn) => fn(error));
      reject(error);
    };
    const form = new FormData();
    form.append("purpose", purpose);
    form.append("file", file, file.name);
    xhr.send(form);
  });
}

// The JSON chunks of a streamed answer (text/event-stream) until `data: [DONE]`; an error chunk throws.
export async function* streamEvents(path, body, signal) {
  const response = await request(path, { method: "POST", body, signal, raw: true });
  const reader = response.body.pipeThrough(new TextDecoderStream()).getReader();
  let buffer = "";
  try {
    for (;;) {
      const { value, done } = await reader.read();
      if (done) return;
      buffer += value.replace(/\r\n/g, "\n");
      let end;
      while ((end = buffer.indexOf("\n\n")) >= 0) {
        const block = buffer.slice(0, end);
        buffer = buffer.slice(end + 2);
        for (const line of block.split("\n")) {
          if (!line.startsWith("data:")) continue;
          const data = line.slice(5).trim();
          if (data === "[DONE]") return;
          const chunk = JSON.parse(data);
          if (chunk && chunk.error) throw errorFromBody(response.status, chunk, "stream error");
          yield chunk;
        }
      }
    }
  } finally {
    reader.cancel().catch(() => {});
  }
}
