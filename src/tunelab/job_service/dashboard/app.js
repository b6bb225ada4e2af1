// The tunelab service dashboard: a hash-routed page over the /v1 API. Everything shown comes from the API with the
// project's key; text is always set as textContent (never as HTML), so names and replies cannot become markup.
"use strict";

const KEY = "tunelab.key"; // sessionStorage: gone when the tab closes, never in a URL
const POLL_MS = 2000;
const ACTIVE = ["validating_files", "queued", "running", "paused"];
const STATUSES = ["validating_files", "queued", "running", "paused", "succeeded", "failed", "cancelled"];
let timers = []; // the current view's pollers, stopped when the view changes

// -- helpers ---------------------------------------------------------------------------------------------------

function h(tag, attrs, ...children) {
  const el = document.createElement(tag);
  for (const [name, value] of Object.entries(attrs || {})) {
    if (value === null || value === undefined || value === false) continue;
    if (name.startsWith("on")) el.addEventListener(name.slice(2), value);
    else if (name === "text") el.textContent = value;
    else el.setAttribute(name, value === true ? "" : String(value));
  }
  for (const child of children.flat(Infinity)) {
    if (child === null || child === undefined) continue;
    el.append(child instanceof Node ? child : document.createTextNode(String(child)));
  }
  return el;
}

class ApiError extends Error {
  constructor(status, body) {
    const err = (body && body.error) || {};
    super(err.message || `HTTP ${status}`);
    this.status = status;
    this.code = err.code;
  }
}

async function api(path, options = {}) {
  const headers = { Authorization: `Bearer ${sessionStorage.getItem(KEY) || ""}`, ...(options.headers || {}) };
  if (options.json !== undefined) {
    headers["Content-Type"] = "application/json";
    options.body = JSON.stringify(options.json);
  }
  const response = await fetch(`/v1${path}`, { ...options, headers });
  if (response.status === 401) {
    signOut("Your key was refused: sign in again.");
    throw new ApiError(401, await response.json().catch(() => null));
  }
  if (!response.ok) throw new ApiError(response.status, await response.json().catch(() => null));
  return options.raw ? response : response.json();
}

function when(seconds) {
  return seconds ? new Date(seconds * 1000).toLocaleString() : "";
}

function duration(job) {
  const end = job.finished_at || (ACTIVE.includes(job.status) ? Date.now() / 1000 : null);
  if (!end) return "";
  const s = Math.max(0, Math.round(end - job.created_at));
  return s < 60 ? `${s}s` : s < 3600 ? `${Math.floor(s / 60)}m ${s % 60}s` : `${Math.floor(s / 3600)}h ${Math.floor((s % 3600) / 60)}m`;
}

function badge(status) {
  return h("span", { class: `badge ${status}`, text: status });
}

function table(headers, rows, empty) {
  if (!rows.length) return h("p", { class: "muted", text: empty });
  return h("div", { class: "scroll" }, h("table", {}, h("thead", {}, h("tr", {}, headers.map((x) => h("th", { text: x })))),
    h("tbody", {}, rows)));
}

function showError(target, error) {
  target.replaceChildren(h("p", { class: "error", role: "alert", text: error.message }));
}

function every(ms, fn) {
  timers.push(setInterval(fn, ms));
}

function view(...children) {
  document.getElementById("view").replaceChildren(...children);
}

async function listAll(path, limit) {
  // Follows `after` cursors: the API pages every list.
  const items = [];
  let after = null;
  for (;;) {
    const sep = path.includes("?") ? "&" : "?";
    const page = await api(`${path}${sep}limit=${limit}${after ? `&after=${encodeURIComponent(after)}` : ""}`);
    items.push(...page.data);
    if (!page.has_more || !page.data.length) return items;
    after = page.last_id;
  }
}

// -- sign-in ---------------------------------------------------------------------------------------------------

function signedIn() {
  return Boolean(sessionStorage.getItem(KEY));
}

function signOut(message) {
  sessionStorage.removeItem(KEY);
  document.getElementById("signin-error").textContent = message || "";
  route();
}

async function signIn(event) {
  event.preventDefault();
  const input = document.getElementById("key");
  sessionStorage.setItem(KEY, input.value.trim());
  try {
    await api("/models");
    input.value = "";
    document.getElementById("signin-error").textContent = "";
    if (!location.hash || location.hash === "#/") location.hash = "#/jobs";
    route();
  } catch (error) {
    sessionStorage.removeItem(KEY);
    document.getElementById("signin-error").textContent = error.message;
  }
}

// -- jobs ------------------------------------------------------------------------------------------------------

async function jobsView(params) {
  const status = params.get("status") || "";
  const filter = h("select", { id: "status-filter", onchange: (e) => { location.hash = e.target.value ? `#/jobs?status=${e.target.value}` : "#/jobs"; } },
    h("option", { value: "", text: "all statuses" }), STATUSES.map((s) => h("option", { value: s, text: s, selected: s === status })));
  const body = h("div", { id: "jobs" });
  view(h("h1", { text: "Fine-tuning jobs" }), h("div", { class: "toolbar" }, h("label", {}, "Status ", filter),
    h("a", { class: "button", href: "#/new", text: "New job" })), body);
  const refresh = async () => {
    try {
      const jobs = (await listAll("/fine_tuning/jobs", 100)).filter((j) => !status || j.status === status);
      body.replaceChildren(table(["Job", "Status", "Base model", "Method", "Scenario", "Created", "Duration", "Trained tokens"],
        jobs.map((j) => h("tr", { "data-job": j.id },
          h("td", {}, h("a", { href: `#/job/${encodeURIComponent(j.id)}`, text: j.id })),
          h("td", {}, badge(j.status)), h("td", { text: j.model }), h("td", { text: j.tunelab.method }),
          h("td", { text: j.tunelab.scenario }), h("td", { text: when(j.created_at) }), h("td", { text: duration(j) }),
          h("td", { class: "num", text: j.trained_tokens == null ? "" : j.trained_tokens.toLocaleString() }))),
        status ? `No ${status} jobs.` : "No jobs yet."));
    } catch (error) {
      showError(body, error);
    }
  };
  await refresh();
  every(POLL_MS * 2, refresh);
}

function lossChart(target) {
  const opts = {
    width: Math.max(280, target.clientWidth || 600), height: 260,
    scales: { x: { time: false } },
    axes: [{ label: "step" }, { label: "loss" }],
    series: [{ label: "step" }, { label: "training loss", stroke: "#2563eb", width: 2 },
      { label: "validation loss", stroke: "#dc2626", width: 2, spanGaps: true, points: { show: true, size: 7 } }],
  };
  const plot = new uPlot(opts, [[], [], []], target);
  new ResizeObserver(() => plot.setSize({ width: Math.max(280, target.clientWidth), height: 260 })).observe(target);
  return plot;
}

// DPO's own curves, when a job's metrics events carry them (preference jobs: the objective adds them to each step).
const DPO_SERIES = [["reward_accuracy", "reward accuracy", "#16a34a"], ["reward_margin", "reward margin", "#9333ea"]];

function dpoChart(target) {
  const opts = {
    width: Math.max(280, target.clientWidth || 600), height: 220,
    scales: { x: { time: false } },
    axes: [{ label: "step" }, { label: "reward" }],
    series: [{ label: "step" }, ...DPO_SERIES.map(([, label, stroke]) => ({ label, stroke, width: 2 }))],
  };
  const plot = new uPlot(opts, [[], ...DPO_SERIES.map(() => [])], target);
  new ResizeObserver(() => plot.setSize({ width: Math.max(280, target.clientWidth), height: 220 })).observe(target);
  return plot;
}

function dpoData(events) {
  const rows = events.filter((e) => e.type === "metrics" && e.data && e.data.step != null && e.data.reward_accuracy != null);
  const byStep = new Map(rows.map((e) => [e.data.step, e.data]));
  const steps = [...byStep.keys()].sort((a, b) => a - b);
  return [steps, ...DPO_SERIES.map(([key]) => steps.map((s) => byStep.get(s)[key] ?? null))];
}

function curveData(events) {
  const train = new Map();
  const valid = new Map();
  for (const e of events) {
    if (e.type !== "metrics" || !e.data || e.data.step == null) continue;
    if (e.data.train_loss != null) train.set(e.data.step, e.data.train_loss);
    if (e.data.valid_loss != null) valid.set(e.data.step, e.data.valid_loss);
  }
  const steps = [...new Set([...train.keys(), ...valid.keys()])].sort((a, b) => a - b);
  return [steps, steps.map((s) => train.get(s) ?? null), steps.map((s) => valid.get(s) ?? null)];
}

async function newEvents(jobId, known) {
  // Newest first, page by page, until an event already shown: a poll costs one small request.
  const found = [];
  let after = null;
  for (;;) {
    const page = await api(`/fine_tuning/jobs/${encodeURIComponent(jobId)}/events?limit=1000${after ? `&after=${after}` : ""}`);
    for (const e of page.data) {
      if (known.has(e.id)) return found;
      found.push(e);
    }
    if (!page.has_more || !page.data.length) return found;
    after = page.last_id;
  }
}

async function download(fileId, name) {
  const response = await api(`/files/${encodeURIComponent(fileId)}/content`, { raw: true });
  const url = URL.createObjectURL(await response.blob());
  const link = h("a", { href: url, download: name });
  document.body.append(link);
  link.click();
  link.remove();
  setTimeout(() => URL.revokeObjectURL(url), 10000);
}

function keyValues(obj) {
  return h("dl", { class: "kv" }, Object.entries(obj || {}).map(([k, v]) => [h("dt", { text: k }), h("dd", { text: typeof v === "object" ? JSON.stringify(v) : String(v) })]));
}

async function jobView(id) {
  const head = h("div", { id: "job-head" });
  const controls = h("div", { class: "toolbar", id: "job-controls" });
  const chartBox = h("div", { id: "loss-chart", class: "chart" });
  const metrics = h("div", { id: "final-metrics" });
  const dpoBox = h("div", { id: "dpo-chart", class: "chart" });
  const dpoSection = h("section", { id: "dpo", hidden: true }, h("h2", { text: "DPO rewards" }), dpoBox);
  const log = h("ol", { id: "events", class: "log", reversed: true });
  const checkpoints = h("div", { id: "checkpoints" });
  const results = h("div", { id: "results" });
  const report = h("div", { id: "report" });
  const spec = h("div", { id: "spec" });
  view(h("p", {}, h("a", { href: "#/jobs", text: "← Jobs" })), head, controls,
    h("h2", { text: "Loss" }), chartBox, dpoSection, metrics,
    h("div", { class: "two" }, h("section", {}, h("h2", { text: "Checkpoints" }), checkpoints),
      h("section", {}, h("h2", { text: "Result files" }), results)),
    h("h2", { text: "Events" }), log, h("h2", { text: "Hyperparameters and spec" }), spec, report);
  const plot = lossChart(chartBox);
  let dpoPlot = null; // made when the first DPO point arrives: most jobs have none
  const events = [];
  const known = new Set();
  let reportShown = false;
  let finished = false;

  let busy = false; // a slow poll must not overlap the next one: both would add the same new events
  const refresh = async () => {
    if (finished || busy) return;
    busy = true;
    try {
      const job = await api(`/fine_tuning/jobs/${encodeURIComponent(id)}`);
      renderHead(job, head, controls, refresh);
      const fresh = await newEvents(id, known);
      for (const e of fresh.reverse()) {
        known.add(e.id);
        events.push(e);
        log.prepend(h("li", { class: `event ${e.level}` }, h("time", { text: when(e.created_at) }), " ", h("span", { text: e.message })));
      }
      if (fresh.length) {
        const data = curveData(events);
        plot.setData(data);
        // How many points each curve has: what a reader (or a test) can check without reading the canvas.
        chartBox.dataset.points = `${data[1].filter((x) => x != null).length}/${data[2].filter((x) => x != null).length}`;
        const dpo = dpoData(events);
        if (dpo[0].length) {
          dpoSection.hidden = false;
          dpoPlot = dpoPlot || dpoChart(dpoBox);
          dpoPlot.setData(dpo);
          dpoBox.dataset.points = String(dpo[0].length);
        }
        const after = events.filter((e) => e.type === "metrics" && e.data && e.data.step == null);
        if (after.length) metrics.replaceChildren(h("h3", { text: "Validation after training" }), keyValues(after[after.length - 1].data));
      }
      const ckpts = await listAll(`/fine_tuning/jobs/${encodeURIComponent(id)}/checkpoints`, 100);
      const valid = ckpts.some((c) => c.metrics.valid_loss != null); // a column only when the API gives one
      checkpoints.replaceChildren(table(["Step", "Training loss", valid ? "Validation loss" : null, "Model", ""].filter((x) => x !== null), ckpts.map((c) =>
        h("tr", { "data-checkpoint": c.id }, h("td", { class: "num", text: c.step_number }),
          h("td", { class: "num", text: fmt(c.metrics.train_loss) }), valid ? h("td", { class: "num", text: fmt(c.metrics.valid_loss) }) : null,
          h("td", { text: c.fine_tuned_model_checkpoint }),
          h("td", {}, h("a", { class: "button small", href: `#/playground?model=${encodeURIComponent(c.fine_tuned_model_checkpoint)}`, text: "Chat with this checkpoint" })))),
      "No checkpoints yet."));
      spec.replaceChildren(keyValues(job.hyperparameters), h("pre", { text: JSON.stringify(job.tunelab.spec, null, 2) }));
      if (job.result_files.length && !reportShown) {
        reportShown = true;
        await showResults(job, results, report);
      }
      finished = !ACTIVE.includes(job.status);
    } catch (error) {
      showError(head, error);
    } finally {
      busy = false;
    }
  };
  await refresh();
  every(POLL_MS, refresh);
}

function fmt(x) {
  return x == null ? "" : Number(x).toFixed(4);
}

function renderHead(job, head, controls, refresh) {
  head.replaceChildren(h("h1", {}, "Job ", h("span", { text: job.id }), " ", badge(job.status)),
    h("p", {}, h("span", { text: `${job.model} · ${job.tunelab.method} · ${job.tunelab.scenario}` }),
      job.tunelab.total_steps ? ` · step ${job.tunelab.step || 0}/${job.tunelab.total_steps}` : "",
      job.fine_tuned_model ? [" · model ", h("a", { href: `#/playground?model=${encodeURIComponent(job.fine_tuned_model)}`, text: job.fine_tuned_model })] : ""),
    job.error ? h("p", { class: "error", text: `${job.error.code}: ${job.error.message}` }) : "");
  const act = (verb) => h("button", { type: "button", id: `job-${verb}`, onclick: async () => {
    try { await api(`/fine_tuning/jobs/${encodeURIComponent(job.id)}/${verb}`, { method: "POST" }); await refresh(); }
    catch (error) { showError(controls, error); }
  }, text: verb[0].toUpperCase() + verb.slice(1) });
  const buttons = [];
  if (["queued", "running"].includes(job.status) && !job.tunelab.control) buttons.push(act("pause"));
  if (job.status === "paused") buttons.push(act("resume"));
  if (ACTIVE.includes(job.status) && job.tunelab.control !== "cancel") buttons.push(act("cancel"));
  controls.replaceChildren(...buttons);
}

async function showResults(job, results, report) {
  const files = await Promise.all(job.result_files.map((f) => api(`/files/${encodeURIComponent(f)}`)));
  results.replaceChildren(h("ul", {}, files.map((f) => h("li", {},
    h("button", { type: "button", class: "link", onclick: () => download(f.id, f.filename), text: f.filename }),
    h("span", { class: "muted", text: ` (${f.bytes.toLocaleString()} bytes)` })))));
  const page = files.find((f) => f.filename.endsWith(".html"));
  if (!page) return;
  const html = await (await api(`/files/${encodeURIComponent(page.id)}/content`, { raw: true })).text();
  // Sandboxed without scripts: the report is shown, never run.
  const frame = h("iframe", { sandbox: "", title: "Before/after report", class: "report" });
  frame.srcdoc = html;
  report.replaceChildren(h("h2", { text: "Before/after report" }), frame);
}

// -- new job ---------------------------------------------------------------------------------------------------

async function upload(input, status) {
  const file = input.files[0];
  if (!file) return null;
  status.replaceChildren(h("span", { class: "muted", text: `Uploading ${file.name}…` }));
  const form = new FormData();
  form.append("purpose", "fine-tune");
  form.append("file", file);
  let row = await api("/files", { method: "POST", body: form });
  while (row.status === "uploaded") {
    await new Promise((r) => setTimeout(r, 500));
    row = await api(`/files/${encodeURIComponent(row.id)}`);
  }
  const problems = (row.tunelab && row.tunelab.problems) || [];
  status.replaceChildren(h("p", { class: row.status === "processed" ? "ok" : "error", role: "status" },
    h("span", { text: `${row.filename}: ${row.status}` }), row.status === "processed" ? h("span", { text: ` — ${row.status_details || ""}` }) : ""),
  problems.length ? table(["Line", "Code", "Problem", "How to fix"], problems.map((p) => h("tr", { class: "problem" },
    h("td", { class: "num", text: p.line ?? "" }), h("td", {}, h("code", { text: p.code })), h("td", { text: p.message }), h("td", { text: p.hint || "" }))), "") : "");
  return row;
}

function field(label, input, hint) {
  return h("label", { class: "field" }, h("span", { text: label }), input, hint ? h("small", { class: "muted", text: hint }) : "");
}

async function newJobView() {
  const models = (await api("/models")).data;
  const train = h("input", { type: "file", id: "training-file", accept: ".jsonl,application/jsonl" });
  const valid = h("input", { type: "file", id: "validation-file", accept: ".jsonl,application/jsonl" });
  const trainStatus = h("div", { id: "training-status" });
  const validStatus = h("div", { id: "validation-status" });
  const model = h("select", { id: "model" }, models.map((m) => h("option", { value: m.id, text: m.id })));
  const methodType = h("select", { id: "method-type" }, ["supervised", "dpo"].map((t) => h("option", { value: t, text: t })));
  const method = h("input", { id: "method", value: "lora", list: "methods" });
  const scenario = h("input", { id: "scenario", value: "chat" });
  const epochs = h("input", { id: "n_epochs", placeholder: "auto" });
  const batch = h("input", { id: "batch_size", placeholder: "auto" });
  const lr = h("input", { id: "learning_rate_multiplier", placeholder: "auto" });
  const beta = h("input", { id: "beta", placeholder: "auto" });
  const suffix = h("input", { id: "suffix", maxlength: 64 });
  const spec = h("textarea", { id: "spec", rows: 4, placeholder: '{"train": {"max_steps": 50}}' });
  const create = h("button", { type: "submit", id: "create", disabled: true, text: "Create job" });
  const message = h("div", { id: "create-status" });
  const files = { training: null, validation: null };
  const ready = () => {
    create.disabled = !(files.training && files.training.status === "processed" && (!files.validation || files.validation.status === "processed"));
  };
  const onFile = (which, input, status) => async () => {
    files[which] = null;
    ready();
    try { files[which] = await upload(input, status); } catch (error) { showError(status, error); }
    ready();
  };
  train.addEventListener("change", onFile("training", train, trainStatus));
  valid.addEventListener("change", onFile("validation", valid, validStatus));
  const number = (input, name, parse) => {
    const raw = input.value.trim();
    if (!raw || raw === "auto") return "auto";
    const value = parse(raw);
    if (!Number.isFinite(value)) throw new Error(`${name}: "${raw}" is not a number (leave it empty for auto).`);
    return value;
  };
  const submit = async (event) => {
    event.preventDefault();
    try {
      const hyper = { n_epochs: number(epochs, "n_epochs", (x) => Number.parseInt(x, 10)),
        batch_size: number(batch, "batch_size", (x) => Number.parseInt(x, 10)),
        learning_rate_multiplier: number(lr, "learning_rate_multiplier", Number.parseFloat) };
      if (methodType.value === "dpo") hyper.beta = number(beta, "beta", Number.parseFloat);
      let extra = {};
      if (spec.value.trim()) {
        try { extra = JSON.parse(spec.value); } catch (error) { throw new Error(`Spec: not valid JSON (${error.message}).`); }
      }
      const body = { model: model.value, training_file: files.training.id,
        method: { type: methodType.value, [methodType.value]: { hyperparameters: hyper } },
        tunelab: { method: method.value.trim(), scenario: scenario.value.trim(), spec: extra } };
      if (files.validation) body.validation_file = files.validation.id;
      if (suffix.value.trim()) body.suffix = suffix.value.trim();
      const job = await api("/fine_tuning/jobs", { method: "POST", json: body });
      location.hash = `#/job/${encodeURIComponent(job.id)}`;
    } catch (error) {
      showError(message, error);
    }
  };
  view(h("h1", { text: "New fine-tuning job" }),
    h("form", { id: "new-job", class: "form", onsubmit: submit },
      h("datalist", { id: "methods" }, ["lora", "dora", "rslora", "ia3", "full"].map((m) => h("option", { value: m }))),
      field("Training file (chat JSONL)", train), trainStatus,
      field("Validation file (optional)", valid), validStatus,
      field("Base model", model), field("Method type", methodType),
      field("tunelab method", method, "lora, dora, rslora, ia3, ... (tunelab methods)"),
      field("Scenario", scenario, "the JobSpec's task.scenario"),
      h("fieldset", {}, h("legend", { text: "Hyperparameters (empty = auto)" }),
        field("n_epochs", epochs), field("batch_size", batch), field("learning_rate_multiplier", lr), field("beta (DPO)", beta)),
      field("Suffix", suffix, "up to 64 of A-Z a-z 0-9 . _ -"),
      field("Further spec (JSON, by section)", spec, "train, method, task, checkpoints, eval: as in a YAML JobSpec"),
      create, message));
}

// -- files and models ------------------------------------------------------------------------------------------

async function deleting(path, what, reload) {
  if (!confirm(`Delete ${what}? This cannot be undone.`)) return;
  try { await api(path, { method: "DELETE" }); } catch (error) { alert(error.message); }
  reload();
}

async function filesView() {
  const body = h("div", { id: "files" });
  view(h("h1", { text: "Files" }), body);
  const load = async () => {
    try {
      const files = (await api("/files")).data;
      body.replaceChildren(table(["File", "Name", "Purpose", "Bytes", "Status", "Created", ""], files.map((f) => h("tr", { "data-file": f.id },
        h("td", { text: f.id }), h("td", { text: f.filename }), h("td", { text: f.purpose }), h("td", { class: "num", text: f.bytes.toLocaleString() }),
        h("td", { title: f.status_details || "" }, badge(f.status)), h("td", { text: when(f.created_at) }),
        h("td", {}, h("button", { type: "button", class: "small", onclick: () => download(f.id, f.filename), text: "Download" }), " ",
          h("button", { type: "button", class: "small danger", onclick: () => deleting(`/files/${encodeURIComponent(f.id)}`, f.filename, load), text: "Delete" })))),
      "No files."));
    } catch (error) { showError(body, error); }
  };
  await load();
}

async function modelsView() {
  const body = h("div", { id: "models" });
  view(h("h1", { text: "Models" }), body);
  const load = async () => {
    try {
      const models = (await api("/models")).data;
      body.replaceChildren(table(["Model", "Owned by", "Created", ""], models.map((m) => h("tr", { "data-model": m.id },
        h("td", { text: m.id }), h("td", { text: m.owned_by }), h("td", { text: when(m.created) }),
        h("td", {}, h("a", { class: "button small", href: `#/playground?model=${encodeURIComponent(m.id)}`, text: "Chat" }), " ",
          m.id.startsWith("ft:") ? h("button", { type: "button", class: "small danger", onclick: () => deleting(`/models/${encodeURIComponent(m.id)}`, m.id, load), text: "Delete" }) : ""))),
      "No models."));
    } catch (error) { showError(body, error); }
  };
  await load();
}

// -- playground ------------------------------------------------------------------------------------------------

async function* sse(response) {
  // The `data:` lines of a server-sent event stream, parsed; ends at [DONE].
  const reader = response.body.getReader();
  const decoder = new TextDecoder();
  let buffer = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) return;
    buffer += decoder.decode(value, { stream: true });
    let cut;
    while ((cut = buffer.indexOf("\n\n")) >= 0) {
      const block = buffer.slice(0, cut);
      buffer = buffer.slice(cut + 2);
      for (const line of block.split("\n")) {
        if (!line.startsWith("data:")) continue;
        const data = line.slice(5).trim();
        if (data === "[DONE]") return;
        yield JSON.parse(data);
      }
    }
  }
}

function pane(index, models, chosen) {
  const select = h("select", { id: `model-${index}` }, models.map((m) => h("option", { value: m.id, text: m.id, selected: m.id === chosen })));
  const log = h("div", { class: "chat", id: `chat-${index}` });
  const history = [];
  const send = async (prompt, settings) => {
    history.push({ role: "user", content: prompt });
    log.append(h("div", { class: "msg user", text: prompt }));
    const reply = h("div", { class: "msg assistant streaming" });
    log.append(reply);
    try {
      const response = await api("/chat/completions", { method: "POST", raw: true,
        json: { model: select.value, messages: history, stream: true, ...settings } });
      for await (const chunk of sse(response)) {
        const delta = chunk.choices && chunk.choices[0] && chunk.choices[0].delta;
        if (delta && delta.content) {
          reply.textContent += delta.content;
          log.scrollTop = log.scrollHeight;
        }
      }
      history.push({ role: "assistant", content: reply.textContent });
    } catch (error) {
      history.pop();
      reply.classList.add("error");
      reply.textContent = error.message;
    }
    reply.classList.remove("streaming");
    reply.classList.add("done");
  };
  const clear = () => { history.length = 0; log.replaceChildren(); };
  return { el: h("section", { class: "pane" }, field(`Model ${index}`, select), log), send, clear, select };
}

async function playgroundView(params) {
  const models = (await api("/models")).data;
  const chosen = params.get("model");
  // A checkpoint is a model for chat, but /v1/models lists only the final ones: the one asked for is added.
  if (chosen && !models.some((m) => m.id === chosen)) models.unshift({ id: chosen });
  const base = models.find((m) => !m.id.startsWith("ft:")) || models[0];
  const first = pane(1, models, chosen || (base && base.id));
  const second = pane(2, models, base && base.id);
  const compare = h("input", { type: "checkbox", id: "compare" });
  const prompt = h("textarea", { id: "prompt", rows: 3, placeholder: "Say something…", required: true });
  const maxTokens = h("input", { id: "max_tokens", type: "number", value: 64, min: 1, max: 2048 });
  const temperature = h("input", { id: "temperature", type: "number", value: 0, min: 0, max: 2, step: 0.1 });
  const panes = h("div", { class: "panes" }, first.el);
  compare.addEventListener("change", () => { if (compare.checked) panes.append(second.el); else second.el.remove(); });
  const submit = async (event) => {
    event.preventDefault();
    const text = prompt.value.trim();
    if (!text) return;
    prompt.value = "";
    const settings = { max_tokens: Number(maxTokens.value), temperature: Number(temperature.value) };
    await Promise.all([first.send(text, settings), compare.checked ? second.send(text, settings) : null]);
  };
  view(h("h1", { text: "Playground" }),
    h("div", { class: "toolbar" }, h("label", {}, compare, " Compare two models side by side"),
      field("max_tokens", maxTokens), field("temperature", temperature),
      h("button", { type: "button", onclick: () => { first.clear(); second.clear(); }, text: "Clear" })),
    panes, h("form", { id: "prompt-form", class: "prompt", onsubmit: submit }, prompt, h("button", { type: "submit", id: "send", text: "Send" })));
}

// -- routing ---------------------------------------------------------------------------------------------------

async function route() {
  timers.forEach(clearInterval);
  timers = [];
  const ok = signedIn();
  document.getElementById("signin").hidden = ok;
  document.getElementById("nav").hidden = !ok;
  if (!ok) { view(); return; }
  const [path, query] = (location.hash.slice(1) || "/jobs").split("?");
  const params = new URLSearchParams(query || "");
  const parts = path.split("/").filter(Boolean);
  for (const link of document.querySelectorAll("#nav a")) link.classList.toggle("active", link.getAttribute("href") === `#/${parts[0]}`);
  try {
    if (parts[0] === "job" && parts[1]) await jobView(decodeURIComponent(parts[1]));
    else if (parts[0] === "new") await newJobView();
    else if (parts[0] === "files") await filesView();
    else if (parts[0] === "models") await modelsView();
    else if (parts[0] === "playground") await playgroundView(params);
    else await jobsView(params);
  } catch (error) {
    view(h("p", { class: "error", role: "alert", text: error.message }));
  }
}

document.getElementById("signin-form").addEventListener("submit", signIn);
document.getElementById("signout").addEventListener("click", () => signOut("Signed out."));
window.addEventListener("hashchange", route);
route();
