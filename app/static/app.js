/* distillery web page: job list, job page, submit form. Plain JS, no build step, talks to the same API. */
"use strict";

const KEY_STORE = "distill.apiKey";
const TERMINAL = new Set(["succeeded", "failed", "cancelled"]);
const main = document.getElementById("main");
let cleanup = [];  // timers and streams of the current view

/* ---------- helpers ---------- */

function h(tag, attrs, ...children) {
  const el = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) {
    if (v === null || v === undefined || v === false) continue;
    if (k === "class") el.className = v;
    else if (k.startsWith("on")) el.addEventListener(k.slice(2), v);
    else if (k === "text") el.textContent = v;
    else el.setAttribute(k, v === true ? "" : v);
  }
  for (const c of children.flat()) if (c !== null && c !== undefined) el.append(c instanceof Node ? c : String(c));
  return el;
}

function apiKey() { return sessionStorage.getItem(KEY_STORE) || ""; }

function headers(extra) {
  const out = Object.assign({Accept: "application/json"}, extra || {});
  if (apiKey()) out.Authorization = "Bearer " + apiKey();
  return out;
}

class ApiError extends Error {
  constructor(problem) {
    super(problem.detail || problem.title || "request failed");
    this.problem = problem;
    this.status = problem.status;
  }
}

async function problemOf(response) {
  let body = null;
  try { body = await response.json(); } catch (e) { /* not JSON */ }
  if (body && body.title && body.status) return body;
  const problem = {type: "about:blank", title: response.statusText || "error", status: response.status, errors: []};
  if (body && Array.isArray(body.detail)) problem.errors = body.detail;
  else if (body && body.detail) problem.detail = String(body.detail);
  return problem;
}

async function api(path, options) {
  const opts = Object.assign({}, options || {});
  opts.headers = headers(opts.headers);
  let response;
  try {
    response = await fetch(path, opts);
  } catch (e) {
    showBanner("Cannot reach the server: " + e.message);
    throw e;
  }
  if (!response.ok) {
    const problem = await problemOf(response);
    if (response.status === 401) showBanner("The server needs a valid API key: the key " +
      (apiKey() ? "you entered was refused" : "is missing") + ". Enter it at the top of the page.", true);
    throw new ApiError(problem);
  }
  hideBanner();
  return response;
}

async function apiJson(path, options) { return (await api(path, options)).json(); }

function showBanner(text, focusKey) {
  const banner = document.getElementById("banner");
  banner.textContent = text;
  banner.hidden = false;
  if (focusKey) document.getElementById("api-key").focus();
}
function hideBanner() { document.getElementById("banner").hidden = true; }

function age(iso) {
  const s = Math.max(0, (Date.now() - Date.parse(iso)) / 1000);
  if (s < 60) return Math.floor(s) + " s";
  if (s < 3600) return Math.floor(s / 60) + " min";
  if (s < 86400) return Math.floor(s / 3600) + " h";
  return Math.floor(s / 86400) + " d";
}

function pct(x) { return Math.round(100 * (x || 0)) + "%"; }

function progressBar(job) {
  const value = job.status === "succeeded" ? 1 : (job.progress || 0);
  const label = job.status === "running" ? `${job.stage || "starting"} ${pct(value)}` : job.status;
  return h("span", {class: "progress"},
    h("progress", {max: "1", value: String(value), "aria-label": `progress: ${label}`}),
    h("span", {class: "progress-text"}, label));
}

function badge(status) { return h("span", {class: "badge " + status}, status); }

function setView(...nodes) {
  for (const stop of cleanup) stop();
  cleanup = [];
  main.replaceChildren(...nodes);
}

function every(ms, fn) {
  let stopped = false;
  let timer = null;
  const tick = async () => {
    if (stopped) return;
    try { await fn(); } catch (e) { /* shown by api() */ }
    if (!stopped) timer = setTimeout(tick, ms);
  };
  tick();
  cleanup.push(() => { stopped = true; clearTimeout(timer); });
}

/* ---------- job list ---------- */

function jobRow(job) {
  const r = job.request;
  const row = h("tr", {"data-job": job.id},
    h("td", {"data-label": "Job"}, h("a", {href: "#/jobs/" + job.id}, job.id)),
    h("td", {"data-label": "Status"}),
    h("td", {"data-label": "Method"}, r.method),
    h("td", {"data-label": "Dataset"}, r.dataset),
    h("td", {"data-label": "IPC", class: "num"}, String(r.ipc)),
    h("td", {"data-label": "Progress"}),
    h("td", {"data-label": "Age", title: job.created_at}));
  return updateRow(row, job);
}

function updateRow(row, job) {
  /* in place, so a focused link keeps its focus while the list refreshes */
  const cells = row.children;
  row.dataset.status = job.status;
  cells[1].replaceChildren(badge(job.status));
  cells[5].replaceChildren(progressBar(job));
  cells[6].textContent = age(job.created_at);
  return row;
}

function syncRows(body, jobs) {
  const existing = new Map(Array.from(body.children, (tr) => [tr.dataset.job, tr]));
  jobs.forEach((job, i) => {
    const row = existing.has(job.id) ? updateRow(existing.get(job.id), job) : jobRow(job);
    existing.delete(job.id);
    if (body.children[i] !== row) body.insertBefore(row, body.children[i] || null);
  });
  for (const stale of existing.values()) stale.remove();
}

function listView() {
  document.title = "Jobs · distillery";
  const body = h("tbody", {id: "job-rows"});
  const empty = h("p", {class: "muted", id: "no-jobs", hidden: true}, "No jobs yet. ",
    h("a", {href: "#/new"}, "Submit one"), ".");
  const more = h("button", {type: "button", id: "more", hidden: true}, "Show more");
  let limit = 20;
  more.addEventListener("click", () => { limit += 20; refresh(); });
  const table = h("table", {class: "jobs"},
    h("caption", {class: "sr-only"}, "Your jobs, newest first"),
    h("thead", {}, h("tr", {}, ["Job", "Status", "Method", "Dataset", "IPC", "Progress", "Age"].map(
      (t) => h("th", {scope: "col", class: t === "IPC" ? "num" : null}, t)))),
    body);
  async function refresh() {
    const list = await apiJson(`/jobs?limit=${limit}`);
    syncRows(body, list.data);
    empty.hidden = list.data.length > 0;
    more.hidden = !list.has_more;
  }
  setView(h("div", {class: "heading"}, h("h1", {}, "Jobs"), h("a", {class: "button", href: "#/new"}, "New job")),
    h("div", {class: "table-wrap"}, table), empty, more);
  every(2000, refresh);
}

/* ---------- job page ---------- */

function definitionList(pairs) {
  return h("dl", {class: "facts"}, pairs.filter(([, v]) => v !== null && v !== undefined && v !== "").flatMap(
    ([k, v]) => [h("dt", {}, k), h("dd", {}, v)]));
}

function eventLine(event) {
  const time = new Date(event.created_at).toLocaleTimeString();
  const progress = event.progress === null || event.progress === undefined ? "" : " " + pct(event.progress);
  return h("li", {class: "event " + event.level, "data-event": String(event.id)},
    h("time", {datetime: event.created_at}, time), " ",
    event.stage ? h("span", {class: "stage"}, event.stage + progress) : null, " ", event.message);
}

async function streamEvents(id, state, onLog, onStatus, signal) {
  /* Server-Sent Events over fetch (EventSource cannot send the API key). Returns false if the server has no stream. */
  const extra = {Accept: "text/event-stream"};
  if (state.last !== null) extra["Last-Event-ID"] = String(state.last);
  const response = await fetch(`/jobs/${id}/events`, {headers: headers(extra), signal});
  if (!response.ok) throw new ApiError(await problemOf(response));
  if (!(response.headers.get("content-type") || "").startsWith("text/event-stream")) return false;
  const reader = response.body.pipeThrough(new TextDecoderStream()).getReader();
  let buffer = "";
  for (;;) {
    const {value, done} = await reader.read();
    if (done) return true;
    buffer += value.replace(/\r\n?/g, "\n");
    let cut;
    while ((cut = buffer.indexOf("\n\n")) >= 0) {
      const block = buffer.slice(0, cut);
      buffer = buffer.slice(cut + 2);
      let kind = "message", data = [];
      for (const line of block.split("\n")) {
        if (line.startsWith(":")) continue;
        const i = line.indexOf(":");
        const name = i < 0 ? line : line.slice(0, i);
        let val = i < 0 ? "" : line.slice(i + 1);
        if (val.startsWith(" ")) val = val.slice(1);
        if (name === "event") kind = val; else if (name === "data") data.push(val);
      }
      if (!data.length) continue;
      const payload = JSON.parse(data.join("\n"));
      if (kind === "log") onLog(payload);
      else if (kind === "status" || kind === "end") onStatus(payload);
      if (kind === "end") return true;
    }
  }
}

async function sha256Hex(buffer) {
  if (!(window.crypto && crypto.subtle)) return null;
  const digest = await crypto.subtle.digest("SHA-256", buffer);
  return Array.from(new Uint8Array(digest)).map((b) => b.toString(16).padStart(2, "0")).join("");
}

function jobView(id) {
  document.title = id + " · distillery";
  const title = h("h1", {}, "Job ", h("code", {}, id));
  const status = h("div", {id: "job-status", "aria-live": "polite"});
  const facts = h("div", {id: "job-facts"});
  const actions = h("div", {class: "actions"});
  const preview = h("figure", {id: "preview", hidden: true});
  const manifest = h("section", {id: "manifest", hidden: true});
  const log = h("ol", {id: "events", class: "events", "aria-live": "polite"});
  const state = {last: null, job: null, previewShown: false, manifestShown: false};
  const controller = new AbortController();
  cleanup.push(() => controller.abort());

  const cancelButton = h("button", {type: "button", id: "cancel", class: "danger"}, "Cancel job");
  cancelButton.addEventListener("click", async () => {
    cancelButton.disabled = true;
    try { render(await apiJson(`/jobs/${id}/cancel`, {method: "POST"})); }
    catch (e) { showBanner("Cancel failed: " + e.message); cancelButton.disabled = false; }
  });
  const downloadButton = h("button", {type: "button", id: "download"}, "Download archive");
  const downloadState = h("span", {id: "download-state", class: "muted", "aria-live": "polite"});
  downloadButton.addEventListener("click", async () => {
    const art = state.job.artifact;
    downloadState.textContent = "downloading…";
    try {
      const buffer = await (await api(art.url, {headers: {Accept: "application/x-tar"}})).arrayBuffer();
      const digest = await sha256Hex(buffer);
      if (digest !== null && digest !== art.sha256) { downloadState.textContent = "checksum mismatch: not saved"; return; }
      const url = URL.createObjectURL(new Blob([buffer], {type: "application/x-tar"}));
      const r = state.job.request;
      const a = h("a", {href: url, download: `${r.dataset}-${r.method}-ipc${r.ipc}-${id}.tar`});
      document.body.append(a); a.click(); a.remove();
      setTimeout(() => URL.revokeObjectURL(url), 60000);
      downloadState.textContent = `saved ${buffer.byteLength} bytes` + (digest ? ", sha256 verified" : "");
    } catch (e) { downloadState.textContent = "download failed: " + e.message; }
  });

  async function showPreview(job) {
    state.previewShown = true;
    try {
      const blob = await (await api(job.artifact.preview_url, {headers: {Accept: "image/png"}})).blob();
      const img = h("img", {id: "preview-img", alt: `distilled images of ${id}, one row per class`,
        src: URL.createObjectURL(blob)});
      preview.replaceChildren(img, h("figcaption", {}, "The distilled set, one row per class"));
      preview.hidden = false;
    } catch (e) { state.previewShown = false; }
  }

  async function showManifest() {
    state.manifestShown = true;
    try {
      const m = await apiJson(`/jobs/${id}/manifest`);
      const timings = Object.entries(m.timings || {}).map(([k, v]) => `${k} ${Number(v).toFixed(1)} s`).join(", ");
      const metrics = Object.entries(m.metrics || {}).map(([k, v]) => `${k} ${typeof v === "number" ? +v.toFixed(4) : JSON.stringify(v)}`).join(", ");
      const params = Object.entries(m.params || {}).map(([k, v]) => `${k}=${JSON.stringify(v)}`).join(" ");
      manifest.replaceChildren(h("h2", {}, "Archive"), definitionList([
        ["images", String(m.num_images)], ["classes", (m.dataset && m.dataset.classes || []).length || null],
        ["parameters", params || "defaults"], ["seed", String(m.seed)], ["timings", timings || null],
        ["metrics", metrics || null], ["code version", m.code_version]]));
      manifest.hidden = false;
    } catch (e) { state.manifestShown = false; }
  }

  function render(job) {
    state.job = job;
    const r = job.request;
    status.replaceChildren(badge(job.status), " ", progressBar(job),
      ...(job.cancel_requested && !TERMINAL.has(job.status) ? [h("span", {class: "muted"}, "cancel requested")] : []));
    facts.replaceChildren(definitionList([
      ["method", r.method], ["dataset", r.dataset], ["images per class", String(r.ipc)],
      ["stage", job.stage], ["max per class", r.max_per_class === null ? null : String(r.max_per_class)],
      ["parameters", Object.keys(r.params).length ? JSON.stringify(r.params) : "defaults"],
      ["seed", String(r.seed)], ["created", new Date(job.created_at).toLocaleString()],
      ["finished", job.finished_at ? new Date(job.finished_at).toLocaleString() : null],
      ["attempts", String(job.attempts)],
      ["error", job.error ? `${job.error.code}: ${job.error.message}` : null],
      ["archive", job.artifact ? `${job.artifact.bytes} bytes, sha256 ${job.artifact.sha256.slice(0, 16)}…` : null]]));
    actions.replaceChildren(...(TERMINAL.has(job.status) ? [] : [cancelButton]),
      ...(job.artifact ? [downloadButton, downloadState] : []));
    if (job.artifact && !state.previewShown) showPreview(job);
    if (job.artifact && !state.manifestShown) showManifest();
  }

  function addEvent(event) {
    if (state.last !== null && event.id <= state.last) return;
    state.last = event.id;
    log.append(eventLine(event));
  }

  async function poll() {
    const job = await apiJson(`/jobs/${id}`);
    render(job);
    for (;;) {
      const page = await apiJson(`/jobs/${id}/events?limit=1000` + (state.last !== null ? `&after=${state.last}` : ""));
      page.data.forEach(addEvent);
      if (!page.has_more) break;
    }
    return TERMINAL.has(job.status);
  }

  async function follow() {
    let finished = await poll();
    if (finished) return;
    for (let attempt = 0; attempt < 100 && !controller.signal.aborted; attempt++) {
      try {
        const streamed = await streamEvents(id, state, addEvent, render, controller.signal);
        if (!streamed) break;
        if (state.job && TERMINAL.has(state.job.status)) return;
      } catch (e) {
        if (controller.signal.aborted) return;
        if (e instanceof ApiError) throw e;
      }
      await new Promise((resolve) => setTimeout(resolve, 1000));
    }
    every(2000, async () => { if (await poll()) for (const stop of cleanup) stop(); });
  }

  setView(h("p", {}, h("a", {href: "#/"}, "← all jobs")), title, status, actions, facts, preview, manifest,
    h("h2", {}, "Event log"), log);
  follow().catch((e) => {
    if (e instanceof ApiError && e.status === 404) setView(h("h1", {}, "No such job"),
      h("p", {}, `There is no job ${id} for this API key. `, h("a", {href: "#/"}, "All jobs")));
    else if (!(e instanceof ApiError && e.status === 401)) showBanner("Could not load the job: " + e.message);
  });
}

/* ---------- submit form ---------- */

function schemaType(prop) {
  if (prop.enum) return {type: "enum", values: prop.enum};
  if (prop.const !== undefined) return {type: "enum", values: [prop.const]};
  if (prop.type) return {type: prop.type, nullable: false};
  for (const alt of prop.anyOf || []) {
    if (alt.type === "null") continue;
    const inner = schemaType(alt);
    return Object.assign(inner, {nullable: (prop.anyOf || []).some((a) => a.type === "null")});
  }
  return {type: "string"};
}

function fieldBlock(name, label, control, hint) {
  const id = control.id;
  const error = h("p", {class: "field-error", id: id + "-error", hidden: true});
  control.setAttribute("aria-describedby", `${id}-hint ${id}-error`);
  return h("div", {class: "field", "data-field": name},
    h("label", {for: id}, label), control,
    hint ? h("p", {class: "hint", id: id + "-hint"}, hint) : null, error);
}

function paramControl(name, prop) {
  const t = schemaType(prop);
  const id = "param-" + name;
  const dflt = prop.default;
  let control;
  if (t.type === "boolean") {
    control = h("input", {id, type: "checkbox", name});
    control.checked = Boolean(dflt);
  } else if (t.type === "enum") {
    control = h("select", {id, name}, t.values.map((v) => h("option", {value: JSON.stringify(v)}, String(v))));
    if (dflt !== undefined) control.value = JSON.stringify(dflt);
  } else {
    const numeric = t.type === "integer" || t.type === "number";
    control = h("input", {id, name, type: "text", inputmode: numeric ? (t.type === "integer" ? "numeric" : "decimal") : null,
      placeholder: dflt === null || dflt === undefined ? "default" : String(typeof dflt === "object" ? JSON.stringify(dflt) : dflt)});
    if (dflt !== null && dflt !== undefined) control.value = typeof dflt === "object" ? JSON.stringify(dflt) : String(dflt);
  }
  control.dataset.kind = t.type;
  control.dataset.default = JSON.stringify(dflt === undefined ? null : dflt);
  const hint = [prop.description, dflt !== undefined ? `default ${JSON.stringify(dflt)}` : null].filter(Boolean).join(" · ");
  return fieldBlock("params." + name, prop.title ? `${name}` : name, control, hint);
}

function readParam(control) {
  /* the typed value of a parameter control, or undefined when it is unchanged from the default */
  const kind = control.dataset.kind;
  const dflt = JSON.parse(control.dataset.default);
  let value;
  if (kind === "boolean") value = control.checked;
  else if (kind === "enum") value = JSON.parse(control.value);
  else {
    const raw = control.value.trim();
    if (raw === "") return undefined;
    if (kind === "integer" || kind === "number") value = raw.match(/^-?[0-9.eE+-]+$/) && !isNaN(Number(raw)) ? Number(raw) : raw;
    else if (kind === "array" || kind === "object") { try { value = JSON.parse(raw); } catch (e) { value = raw; } }
    else value = raw;
  }
  return JSON.stringify(value) === JSON.stringify(dflt) ? undefined : value;
}

async function formView() {
  document.title = "New job · distillery";
  setView(h("h1", {}, "New job"), h("p", {class: "muted"}, "Loading methods and datasets…"));
  const [methods, datasets] = await Promise.all([apiJson("/methods"), apiJson("/datasets")]);
  const method = h("select", {id: "f-method", name: "method", required: true},
    methods.map((m) => h("option", {value: m.name}, `${m.name} (${m.family})`)));
  const dataset = h("select", {id: "f-dataset", name: "dataset", required: true},
    datasets.map((d) => h("option", {value: d.name}, `${d.name} — ${d.description}`)));
  const ipc = h("input", {id: "f-ipc", name: "ipc", type: "text", inputmode: "numeric", value: "10", required: true});
  const seed = h("input", {id: "f-seed", name: "seed", type: "text", inputmode: "numeric", value: "0"});
  const maxPer = h("input", {id: "f-max_per_class", name: "max_per_class", type: "text", inputmode: "numeric",
    placeholder: "all"});
  const params = h("fieldset", {id: "params"});
  const general = h("div", {id: "form-error", class: "form-error", role: "alert", tabindex: "-1", hidden: true});
  const submit = h("button", {type: "submit", id: "submit"}, "Submit job");
  const form = h("form", {id: "job-form", novalidate: true},
    general,
    fieldBlock("method", "Method", method, "how the set is distilled"),
    fieldBlock("dataset", "Dataset", dataset, "a dataset registered on this server"),
    fieldBlock("ipc", "Images per class", ipc, "at most the smallest class of the dataset"),
    fieldBlock("max_per_class", "Max training images per class", maxPer, "empty: all; small values make quick jobs"),
    fieldBlock("seed", "Seed", seed, null),
    params, submit);

  function renderParams() {
    const m = methods.find((x) => x.name === method.value);
    const hint = document.getElementById("f-method-hint");
    if (hint && m) hint.textContent = m.summary;
    const props = (m && m.parameters.properties) || {};
    params.replaceChildren(h("legend", {}, `Parameters of ${method.value}`),
      ...Object.entries(props).map(([k, p]) => paramControl(k, p)));
    if (!Object.keys(props).length) params.append(h("p", {class: "muted"}, "This method has no parameters."));
  }
  method.addEventListener("change", renderParams);

  function clearErrors() {
    general.hidden = true;
    for (const el of form.querySelectorAll(".field-error")) { el.hidden = true; el.textContent = ""; }
    for (const el of form.querySelectorAll("[aria-invalid]")) el.removeAttribute("aria-invalid");
  }

  function showErrors(problem) {
    let first = null;
    const unplaced = [];
    for (const err of problem.errors || []) {
      const loc = (err.loc || []).filter((p) => p !== "body");
      const key = loc.join(".");
      let block = form.querySelector(`[data-field="${CSS.escape(key)}"]`);
      if (!block && loc[0] === "params" && loc.length > 1) block = form.querySelector(`[data-field="params.${CSS.escape(String(loc[1]))}"]`);
      if (!block) { unplaced.push(`${key || "request"}: ${err.msg}`); continue; }
      const box = block.querySelector(".field-error");
      box.textContent = (box.textContent ? box.textContent + "; " : "") + err.msg;
      box.hidden = false;
      const control = block.querySelector("input, select");
      control.setAttribute("aria-invalid", "true");
      first = first || control;
    }
    if (unplaced.length || !(problem.errors || []).length) {
      general.replaceChildren(h("strong", {}, problem.title + (problem.detail ? ": " + problem.detail : "")),
        unplaced.length ? h("ul", {}, unplaced.map((t) => h("li", {}, t))) : null);
      general.hidden = false;
    }
    (first || general).focus();
  }

  form.addEventListener("submit", async (event) => {
    event.preventDefault();
    clearErrors();
    const asNumber = (v) => (v.trim() !== "" && /^-?\d+$/.test(v.trim()) ? Number(v) : v.trim());
    const body = {method: method.value, dataset: dataset.value, ipc: asNumber(ipc.value), seed: asNumber(seed.value || "0"),
      params: {}};
    if (maxPer.value.trim() !== "") body.max_per_class = asNumber(maxPer.value);
    for (const control of params.querySelectorAll("input, select")) {
      const value = readParam(control);
      if (value !== undefined) body.params[control.name] = value;
    }
    submit.disabled = true;
    try {
      const job = await apiJson("/jobs", {method: "POST", headers: {"Content-Type": "application/json"},
        body: JSON.stringify(body)});
      location.hash = "#/jobs/" + job.id;
    } catch (e) {
      if (e instanceof ApiError) showErrors(e.problem);
      else { general.textContent = "Could not submit: " + e.message; general.hidden = false; }
    } finally { submit.disabled = false; }
  });
  setView(h("h1", {}, "New job"), form);
  renderParams();
  method.focus();
}

/* ---------- routing and key ---------- */

function route() {
  const hash = location.hash || "#/";
  for (const a of document.querySelectorAll("nav a")) a.removeAttribute("aria-current");
  const job = hash.match(/^#\/jobs\/([A-Za-z0-9_-]+)$/);
  if (job) jobView(job[1]);
  else if (hash === "#/new") {
    document.getElementById("nav-new").setAttribute("aria-current", "page");
    formView().catch((e) => { if (!(e instanceof ApiError && e.status === 401)) showBanner("Could not load the form: " + e.message); });
  } else {
    document.getElementById("nav-jobs").setAttribute("aria-current", "page");
    listView();
  }
  main.focus({preventScroll: true});
}

function initKey() {
  const input = document.getElementById("api-key");
  const stateText = document.getElementById("key-state");
  const show = () => { stateText.textContent = apiKey() ? "key set for this browser session" : ""; };
  input.value = apiKey();
  show();
  document.getElementById("key-form").addEventListener("submit", (event) => {
    event.preventDefault();
    const value = input.value.trim();
    if (value) sessionStorage.setItem(KEY_STORE, value); else sessionStorage.removeItem(KEY_STORE);
    show();
    hideBanner();
    route();
  });
}

async function initVersion() {
  try {
    const health = await (await fetch("/healthz")).json();
    document.getElementById("version").textContent = "distillery " + health.version;
  } catch (e) { /* the footer stays empty */ }
}

window.addEventListener("hashchange", route);
initKey();
initVersion();
route();
