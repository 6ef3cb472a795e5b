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

function duration(seconds) {
  const s = Math.max(0, Math.round(seconds || 0));
  if (s < 60) return s + " s";
  if (s < 3600) return Math.floor(s / 60) + " min " + String(s % 60).padStart(2, "0") + " s";
  if (s < 86400) return Math.floor(s / 3600) + " h " + String(Math.floor(s % 3600 / 60)).padStart(2, "0") + " min";
  return Math.floor(s / 86400) + " d " + Math.floor(s % 86400 / 3600) + " h";
}

function overall(job) { return job.status === "succeeded" ? 1 : (job.overall_progress || 0); }

function progressBar(job) {
  /* one bar for the whole job (across stages): it never restarts at a stage change */
  const value = overall(job);
  const label = job.status === "running" ? `${pct(value)} · ${job.stage || "starting"} ${pct(job.progress)}` : job.status;
  return h("span", {class: "progress"},
    h("progress", {max: "1", value: String(value), "aria-label": `overall progress: ${label}`}),
    h("span", {class: "progress-text"}, label));
}

function timeText(job) {
  /* elapsed and ETA while it runs, the estimate while queued, the duration once it ended */
  if (job.status === "queued") return job.estimate ? `about ${duration(job.estimate.seconds)}` : "";
  if (job.elapsed_seconds === null || job.elapsed_seconds === undefined) return "";
  if (job.status !== "running") return duration(job.elapsed_seconds);
  return `${duration(job.elapsed_seconds)}` +
    (job.eta_seconds !== null && job.eta_seconds !== undefined ? `, about ${duration(job.eta_seconds)} left` : " elapsed");
}

function scoreText(score) {
  if (!score) return "–";
  return score.runs > 1 ? `${score.mean.toFixed(2)} ± ${score.std.toFixed(2)} %` : `${score.mean.toFixed(2)} %`;
}

function gainText(gain) { return gain === null || gain === undefined ? "–" : `${gain >= 0 ? "+" : ""}${gain.toFixed(2)}`; }

function resultText(job) {
  const e = job.evaluation;
  if (!e) return "";
  if (!e.accuracy) return `evaluation ${e.status}`;
  return `${scoreText(e.accuracy)} (control ${scoreText(e.control)}, gain ${gainText(e.gain)})`;
}

function keyParams(job) {
  /* what tells two jobs apart: the parameters the request set, max_per_class and seed */
  const r = job.request;
  const parts = Object.entries(r.params || {}).map(([k, v]) => `${k}=${typeof v === "string" ? v : JSON.stringify(v)}`);
  if (r.max_per_class !== null && r.max_per_class !== undefined) parts.unshift(`max_per_class=${r.max_per_class}`);
  if (r.seed) parts.push(`seed=${r.seed}`);
  return parts.join(" ") || (job.kind === "evaluate" ? "" : "defaults");
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
  const row = h("tr", {"data-job": job.id, "data-kind": job.kind || "distill"},
    h("td", {"data-label": "Job"}, h("a", {href: "#/jobs/" + job.id}, job.name || job.id),
      job.name ? h("div", {class: "muted small"}, job.id) : null),
    h("td", {"data-label": "Status"}),
    h("td", {"data-label": "Method"}, job.kind === "evaluate" ? `evaluation (${r.method})` : r.method),
    h("td", {"data-label": "Dataset"}, r.dataset),
    h("td", {"data-label": "IPC", class: "num"}, String(r.ipc)),
    h("td", {"data-label": "Parameters", class: "params"}, keyParams(job)),
    h("td", {"data-label": "Progress"}),
    h("td", {"data-label": "Time", class: "time"}),
    h("td", {"data-label": "Accuracy", class: "result"}),
    h("td", {"data-label": "Age", title: job.created_at}));
  return updateRow(row, job);
}

function updateRow(row, job) {
  /* in place, so a focused link keeps its focus while the list refreshes */
  const cells = row.children;
  row.dataset.status = job.status;
  cells[1].replaceChildren(badge(job.status),
    ...(job.error && job.status !== "cancelled" ? [h("div", {class: "reason"}, job.error.message)] : []));
  cells[6].replaceChildren(progressBar(job));
  cells[7].textContent = timeText(job);
  cells[8].textContent = resultText(job);
  cells[9].textContent = age(job.created_at);
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
    h("thead", {}, h("tr", {}, ["Job", "Status", "Method", "Dataset", "IPC", "Parameters", "Progress", "Time",
      "Accuracy", "Age"].map(
      (t) => h("th", {scope: "col", class: t === "IPC" ? "num" : null}, t)))),
    body);
  const compare = h("nav", {id: "compare-links", class: "compare-links", "aria-label": "compare results"});
  async function refresh() {
    const list = await apiJson(`/jobs?limit=${limit}`);
    syncRows(body, list.data);
    empty.hidden = list.data.length > 0;
    more.hidden = !list.has_more;
    const datasets = [...new Set(list.data.filter((j) => j.kind !== "evaluate" && j.status === "succeeded")
      .map((j) => j.request.dataset))].sort();
    const wanted = datasets.join(",");
    if (compare.dataset.sets !== wanted) {
      compare.dataset.sets = wanted;
      compare.replaceChildren(...(datasets.length ? [h("span", {class: "muted"}, "Compare finished jobs: ")] : []),
        ...datasets.map((d) => h("a", {href: "#/compare/" + encodeURIComponent(d), "data-dataset": d}, d)));
    }
  }
  setView(h("div", {class: "heading"}, h("h1", {}, "Jobs"), h("a", {class: "button", href: "#/new"}, "New job")),
    compare, h("div", {class: "table-wrap"}, table), empty, more);
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

  const timing = h("p", {id: "job-timing", class: "timing"});
  const stages = h("ol", {id: "stages", class: "stages", "aria-label": "stages"});
  const evaluation = h("section", {id: "evaluation", hidden: true});
  const cancelButton = h("button", {type: "button", id: "cancel", class: "danger"}, "Cancel job");
  cancelButton.addEventListener("click", async () => {
    if (!confirm("Cancel this job? Its work so far is discarded.")) return;
    cancelButton.disabled = true;
    try { render(await apiJson(`/jobs/${id}/cancel`, {method: "POST"})); }
    catch (e) { showBanner("Cancel failed: " + e.message); cancelButton.disabled = false; }
  });
  const deleteButton = h("button", {type: "button", id: "delete", class: "danger"}, "Delete job");
  deleteButton.addEventListener("click", async () => {
    if (!confirm("Delete this job, its archive and its evaluations?")) return;
    try { await api(`/jobs/${id}`, {method: "DELETE"}); location.hash = "#/"; }
    catch (e) { showBanner("Delete failed: " + e.message); }
  });
  const rerunButton = h("button", {type: "button", id: "rerun"}, "Run again");
  rerunButton.addEventListener("click", async () => {
    rerunButton.disabled = true;
    try {
      const job = await apiJson(`/jobs/${id}/rerun`, {method: "POST", headers: {"Content-Type": "application/json"},
        body: "{}"});
      location.hash = "#/jobs/" + job.id;
    } catch (e) { showBanner("Run again failed: " + e.message); rerunButton.disabled = false; }
  });
  const evalRuns = h("input", {id: "eval-runs", type: "text", inputmode: "numeric", size: "3", placeholder: "5",
    "aria-label": "students to train (runs)"});
  const evalEpochs = h("input", {id: "eval-epochs", type: "text", inputmode: "numeric", size: "5", placeholder: "default",
    "aria-label": "epochs per student"});
  const evaluateButton = h("button", {type: "button", id: "evaluate"}, "Evaluate");
  const evaluateGroup = h("span", {class: "eval-group"}, evaluateButton,
    h("label", {for: "eval-runs", class: "muted"}, "runs"), evalRuns, h("label", {for: "eval-epochs", class: "muted"}, "epochs"),
    evalEpochs);
  evaluateButton.addEventListener("click", async () => {
    evaluateButton.disabled = true;
    const budget = {};
    for (const [key, input] of [["runs", evalRuns], ["epochs", evalEpochs]]) {
      const raw = input.value.trim();
      if (raw !== "") budget[key] = /^\d+$/.test(raw) ? Number(raw) : raw;
    }
    try {
      const job = await apiJson(`/jobs/${id}/evaluations`, {method: "POST", headers: {"Content-Type": "application/json"},
        body: JSON.stringify(budget)});
      location.hash = "#/jobs/" + job.id;
    } catch (e) { showBanner("Evaluate failed: " + e.message); evaluateButton.disabled = false; }
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
      const metrics = Object.entries(m.metrics || {}).map(([k, v]) => `${k} ${typeof v === "number" ? +v.toFixed(4)
        : Array.isArray(v) && v.length > 4 ? `(${v.length} values)` : JSON.stringify(v)}`).join(", ");
      const params = Object.entries(m.params || {}).map(([k, v]) => `${k}=${JSON.stringify(v)}`).join(" ");
      manifest.replaceChildren(h("h2", {}, "Archive"), definitionList([
        ["images", String(m.num_images)], ["classes", (m.dataset && m.dataset.classes || []).length || null],
        ["parameters", params || "defaults"], ["seed", String(m.seed)], ["timings", timings || null],
        ["metrics", metrics || null], ["code version", m.code_version]]));
      manifest.hidden = false;
    } catch (e) { state.manifestShown = false; }
  }

  function renderStages(job) {
    stages.replaceChildren(...(job.stages || []).map((st) => h("li", {class: "stage-item " + st.state,
      "data-stage": st.name, "aria-current": st.state === "running" ? "step" : null},
      h("span", {class: "stage-name"}, st.name), " ",
      h("span", {class: "muted"}, st.state === "running" ? `${pct(job.progress)} (now)`
        : st.state === "done" ? `done, ${duration(st.seconds)}` : (st.seconds !== null ? `~${duration(st.seconds)}` : "")))));
    stages.hidden = !(job.stages || []).length;
  }

  function renderEvaluation(job) {
    const e = job.evaluation;
    if (!e) { evaluation.hidden = true; return; }
    const p = e.protocol || {};
    evaluation.replaceChildren(h("h2", {}, job.kind === "evaluate" ? "Result" : "Evaluation"), definitionList([
      ["accuracy", scoreText(e.accuracy)], ["random-subset control", scoreText(e.control)],
      ["gain over the control", e.gain === null || e.gain === undefined ? null : gainText(e.gain) + " points"],
      ["status", e.accuracy ? null : e.status],
      ["protocol", p.protocol ? `${p.runs} × ${p.model}, ${p.epochs} epochs, ${p.protocol}, ${p.test_images} test images` : null],
      ["evaluation job", job.kind === "evaluate" ? null : h("a", {href: "#/jobs/" + e.job_id}, e.job_id)]]));
    evaluation.hidden = false;
  }

  function render(job) {
    state.job = job;
    const r = job.request;
    status.replaceChildren(badge(job.status), " ", progressBar(job),
      ...(job.cancel_requested && !TERMINAL.has(job.status) ? [h("span", {class: "muted"}, "cancel requested")] : []));
    const est = job.estimate;
    timing.replaceChildren(...[timeText(job),
      est ? `estimate at submit: ${duration(est.seconds)} (${est.basis === "history"
        ? `from ${est.jobs} earlier job${est.jobs === 1 ? "" : "s"} on this server` : "a rough prior until this method has run here"})` : ""]
      .filter(Boolean).join(" · "));
    renderStages(job);
    renderEvaluation(job);
    if (job.name) title.replaceChildren(job.name, " ", h("code", {class: "muted"}, id));
    facts.replaceChildren(definitionList([
      ["kind", job.kind === "evaluate" ? "evaluation" : null],
      ["evaluates", job.parent_id ? h("a", {href: "#/jobs/" + job.parent_id}, job.parent_id) : null],
      ["method", r.method], ["dataset", r.dataset], ["images per class", String(r.ipc)],
      ["stage", job.stage], ["max per class", r.max_per_class === null ? null : String(r.max_per_class)],
      ["parameters", Object.keys(r.params).length ? JSON.stringify(r.params) : "defaults"],
      ["seed", String(r.seed)], ["created", new Date(job.created_at).toLocaleString()],
      ["finished", job.finished_at ? new Date(job.finished_at).toLocaleString() : null],
      ["attempts", String(job.attempts)],
      ["error", job.error ? `${job.error.code}: ${job.error.message}` : null],
      ["archive", job.artifact ? `${job.artifact.bytes} bytes, sha256 ${job.artifact.sha256.slice(0, 16)}…` : null]]));
    const evaluating = job.evaluation && !TERMINAL.has(job.evaluation.status);
    actions.replaceChildren(...(TERMINAL.has(job.status) ? [] : [cancelButton]),
      ...(job.artifact ? [downloadButton, downloadState] : []),
      ...(job.artifact && job.kind !== "evaluate" && !evaluating ? [evaluateGroup] : []),
      ...(job.kind !== "evaluate" && TERMINAL.has(job.status) ? [rerunButton] : []),
      ...(job.kind !== "evaluate" && job.status === "succeeded"
        ? [h("a", {href: "#/compare/" + encodeURIComponent(r.dataset), id: "compare-link"}, `Compare ${r.dataset} jobs`)] : []),
      ...(TERMINAL.has(job.status) && job.kind !== "evaluate" ? [deleteButton] : []));
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

  setView(h("p", {}, h("a", {href: "#/"}, "← all jobs")), title, status, timing, stages, actions, evaluation, facts,
    preview, manifest, h("h2", {}, "Event log"), log);
  follow().catch((e) => {
    if (e instanceof ApiError && e.status === 404) setView(h("h1", {}, "No such job"),
      h("p", {}, `There is no job ${id} for this API key. `, h("a", {href: "#/"}, "All jobs")));
    else if (!(e instanceof ApiError && e.status === 401)) showBanner("Could not load the job: " + e.message);
  });
}

/* ---------- comparison ---------- */

async function compareView(dataset) {
  /* every finished job of one dataset side by side: what each bought (accuracy over its random control) for what
     it cost (time), with its parameters; one click evaluates a job that has no result yet */
  document.title = `Compare ${dataset} · distillery`;
  const body = h("tbody", {id: "compare-rows"});
  const table = h("table", {class: "jobs compare"},
    h("caption", {class: "sr-only"}, `Finished jobs on ${dataset}, best gain first`),
    h("thead", {}, h("tr", {}, ["Job", "Method", "IPC", "Parameters", "Time", "Accuracy", "Control", "Gain", ""].map(
      (t) => h("th", {scope: "col"}, t)))), body);
  const empty = h("p", {class: "muted", hidden: true}, `No finished jobs on ${dataset} yet.`);
  setView(h("p", {}, h("a", {href: "#/"}, "← all jobs")), h("h1", {}, `Compare: ${dataset}`),
    h("p", {class: "muted"}, "Accuracy of students trained on each distilled set, next to the same protocol on a " +
      "random real subset of the same size (the control); gain = accuracy − control, in points."),
    h("div", {class: "table-wrap"}, table), empty);
  async function refresh() {
    const jobs = [];
    let after = null;
    for (let page = 0; page < 5; page++) {
      const list = await apiJson(`/jobs?limit=100` + (after ? `&after=${after}` : ""));
      jobs.push(...list.data);
      if (!list.has_more || !list.data.length) break;
      after = list.data[list.data.length - 1].id;
    }
    const rows = jobs.filter((j) => j.kind !== "evaluate" && j.status === "succeeded" && j.request.dataset === dataset);
    const gain = (j) => (j.evaluation && j.evaluation.gain !== null && j.evaluation.gain !== undefined ? j.evaluation.gain : -Infinity);
    rows.sort((a, b) => gain(b) - gain(a));
    empty.hidden = rows.length > 0;
    body.replaceChildren(...rows.map((j) => {
      const e = j.evaluation;
      let action = null;
      if (!e || TERMINAL.has(e.status) && !e.accuracy) {
        action = h("button", {type: "button", class: "evaluate-row"}, "Evaluate");
        action.addEventListener("click", async () => {
          action.disabled = true;
          try { await apiJson(`/jobs/${j.id}/evaluations`, {method: "POST", headers: {"Content-Type": "application/json"}, body: "{}"}); refresh(); }
          catch (err) { showBanner("Evaluate failed: " + err.message); action.disabled = false; }
        });
      } else if (!TERMINAL.has(e.status)) action = h("a", {href: "#/jobs/" + e.job_id}, "evaluating…");
      return h("tr", {"data-job": j.id},
        h("td", {"data-label": "Job"}, h("a", {href: "#/jobs/" + j.id}, j.name || j.id)),
        h("td", {"data-label": "Method"}, j.request.method),
        h("td", {"data-label": "IPC", class: "num"}, String(j.request.ipc)),
        h("td", {"data-label": "Parameters", class: "params"}, keyParams(j)),
        h("td", {"data-label": "Time"}, timeText(j)),
        h("td", {"data-label": "Accuracy", class: "accuracy"}, e && e.accuracy ? scoreText(e.accuracy) : "–"),
        h("td", {"data-label": "Control", class: "control"}, e && e.control ? scoreText(e.control) : "–"),
        h("td", {"data-label": "Gain", class: "gain"}, e ? gainText(e.gain) : "–"),
        h("td", {"data-label": ""}, action));
    }));
  }
  every(3000, refresh);
}

/* ---------- submit form ---------- */

const DEVICE_NAMES = {cuda: "a CUDA GPU"};  /* the devices a parameter's "x-device" may name */

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
  /* what this server cannot run stays visible, disabled, with the reason (a missing package, weights or files) */
  const method = h("select", {id: "f-method", name: "method", required: true},
    methods.map((m) => h("option", {value: m.name, disabled: m.available === false,
      title: m.unavailable_reason || null},
      `${m.name} (${m.family})` + (m.available === false ? " — not available here" : ""))));
  const dataset = h("select", {id: "f-dataset", name: "dataset", required: true},
    datasets.map((d) => h("option", {value: d.name, disabled: d.available === false,
      title: d.unavailable_reason || null},
      `${d.name} — ${d.description}` + (d.available === false ? ` (not on this server: ${d.unavailable_reason || "files missing"})` : ""))));
  const firstUsable = (select) => { const o = Array.from(select.options).find((x) => !x.disabled); if (o) select.value = o.value; };
  firstUsable(method);
  firstUsable(dataset);
  const name = h("input", {id: "f-name", name: "name", type: "text", maxlength: "100", placeholder: "optional"});
  const ipc = h("input", {id: "f-ipc", name: "ipc", type: "text", inputmode: "numeric", value: "10", required: true});
  const seed = h("input", {id: "f-seed", name: "seed", type: "text", inputmode: "numeric", value: "0"});
  const maxPer = h("input", {id: "f-max_per_class", name: "max_per_class", type: "text", inputmode: "numeric",
    placeholder: "all"});
  const params = h("fieldset", {id: "params"});
  const advanced = h("details", {id: "advanced"}, h("summary", {}, "Advanced: seed and method parameters"),
    fieldBlock("seed", "Seed", seed, null), params);
  const general = h("div", {id: "form-error", class: "form-error", role: "alert", tabindex: "-1", hidden: true});
  const submit = h("button", {type: "submit", id: "submit"}, "Submit job");
  const form = h("form", {id: "job-form", novalidate: true},
    general,
    fieldBlock("method", "Method", method, "how the set is distilled"),
    fieldBlock("dataset", "Dataset", dataset, "a dataset registered on this server"),
    fieldBlock("ipc", "Images per class", ipc, "at most the smallest class of the dataset"),
    fieldBlock("max_per_class", "Max training images per class", maxPer, "empty: all; small values make quick jobs"),
    fieldBlock("name", "Name", name, "a label for the job in the list (optional)"),
    advanced, submit);

  function renderParams() {
    const m = methods.find((x) => x.name === method.value);
    const hint = document.getElementById("f-method-hint");
    if (hint && m) hint.textContent = m.summary;
    const props = (m && m.parameters.properties) || {};
    /* a parameter that only has an effect on a device this server lacks ("x-device") is folded away, disabled,
       with the reason: it is not sent, the server's default applies */
    const absent = (p) => p["x-device"] && (m.devices || {})[p["x-device"]] === false;
    params.replaceChildren(h("legend", {}, `Parameters of ${method.value}`),
      ...Object.entries(props).filter(([, p]) => !absent(p)).map(([k, p]) => paramControl(k, p)));
    const byDevice = {};
    for (const [k, p] of Object.entries(props)) if (absent(p)) (byDevice[p["x-device"]] ||= []).push(paramControl(k, p));
    for (const [device, blocks] of Object.entries(byDevice)) {
      const needs = `needs ${DEVICE_NAMES[device] || device}; this host has none`;
      for (const control of blocks.map((b) => b.querySelector("input, select"))) { control.disabled = true; control.title = needs; }
      params.append(h("details", {class: "device-params", "data-device": device},
        h("summary", {}, `Only with ${DEVICE_NAMES[device] || device} (${blocks.length})`),
        h("p", {class: "hint"}, needs), ...blocks));
    }
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
      if (block.closest("details")) block.closest("details").open = true;  /* an error is never folded away */
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
    if (name.value.trim() !== "") body.name = name.value.trim();
    for (const control of params.querySelectorAll("input:enabled, select:enabled")) {
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
  const compare = hash.match(/^#\/compare\/([^/]+)$/);
  if (job) jobView(job[1]);
  else if (compare) compareView(decodeURIComponent(compare[1])).catch((e) => showBanner("Could not load: " + e.message));
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
    const health = await (await fetch("/healthz", {headers: headers()})).json();
    document.getElementById("version").textContent = "distillery" + (health.version ? " " + health.version : "");
  } catch (e) { /* the footer stays empty */ }
}

window.addEventListener("hashchange", route);
initKey();
initVersion();
route();
