// Saving a file the API serves (an artifact archive, a metrics CSV) to the user's disk.
//
// Without a key the browser downloads straight from the API: streamed to disk, any size. A link cannot
// carry an Authorization header, so with a key the file is fetched, checked against its X-Content-SHA256
// when the server sent one, and handed over as a blob.

import { apiKey, request, url } from "./api.js";
import { bytes, errorBox, fill, h } from "./dom.js";

function filenameFrom(response, fallback) {
  const disposition = response.headers.get("content-disposition") || "";
  const encoded = disposition.match(/filename\*=utf-8''([^;]+)/i);
  if (encoded) return decodeURIComponent(encoded[1]);
  const plain = disposition.match(/filename="?([^";]+)"?/i);
  return plain ? plain[1] : fallback;
}

async function sha256Hex(blob) {
  if (!(window.crypto && crypto.subtle)) return null; // only in secure contexts (https, localhost)
  const digest = await crypto.subtle.digest("SHA-256", await blob.arrayBuffer());
  return [...new Uint8Array(digest)].map((b) => b.toString(16).padStart(2, "0")).join("");
}

function clickLink(href, name) {
  const a = h("a", { href, download: name });
  document.body.append(a);
  a.click();
  a.remove();
}

// Save GET `path`?`params` as `fallback` (or the server's name); progress and results go into `report`.
export async function saveFromApi(path, params, fallback, report) {
  if (!apiKey()) {
    clickLink(url(path, params), fallback);
    fill(report, `Downloading ${fallback}. Its sha256 is in the X-Content-SHA256 header; `,
      h("code", {}, "svfit artifacts download"), " checks it for you.");
    return;
  }
  fill(report, `Preparing ${fallback}... (a merged model can take a while)`);
  const response = await request(path, { params, raw: true });
  const blob = await response.blob();
  const expected = response.headers.get("x-content-sha256");
  const actual = expected ? await sha256Hex(blob) : null;
  if (expected && actual && actual !== expected) {
    fill(report, errorBox({ code: "checksum_mismatch", message: `sha256 ${actual}, expected ${expected}` }));
    return;
  }
  const name = filenameFrom(response, fallback);
  const href = URL.createObjectURL(blob);
  clickLink(href, name);
  setTimeout(() => URL.revokeObjectURL(href), 60000);
  fill(report, `${name}: ${bytes(blob.size)}`, expected ? `, sha256 ${expected}${actual ? " (verified)" : ""}` : "");
}
