// The dashboard: DOM only. Networking lives in jobwire.js.
//
// Events are applied to plain models as they arrive, and rows are re-rendered at most once
// per animation frame, so a burst of thousands of events costs a few paints, not thousands.

import { JobwireClient, RETRYABLE_STATUS, TRANSPORTS, backoff, notBefore } from "./jobwire.js";

const MAX_ROWS = 100;
const FINAL = new Set(["SUCCESS", "FAILURE", "REVOKED"]);
const TRANSPORT_NAMES = { websocket: "WebSocket", sse: "SSE", polling: "polling" };

const $ = (sel, root = document) => root.querySelector(sel);
const list = $("#jobs");
const template = $("#job-template");
const jobs = new Map(); // job id -> model
const dirty = new Set();
let frame = 0;

// -- models ---------------------------------------------------------------------------

function jobFor(id, { task = null, created = Date.now() / 1000 } = {}) {
  let job = jobs.get(id);
  if (job) return job;
  const el = template.content.firstElementChild.cloneNode(true);
  el.dataset.jobId = id;
  job = {
    id, el, task, created, state: "PENDING", seq: 0, progress: null,
    result: undefined, error: null, events: new Map(), expanded: false,
    firstTs: null, lastTs: null,
  };
  jobs.set(id, job);
  $(".job-id", el).textContent = id;
  $(".cancel", el).addEventListener("click", () => cancel(job));
  $(".toggle", el).addEventListener("click", () => {
    job.expanded = !job.expanded;
    touch(job);
  });
  insertRow(job);
  touch(job);
  return job;
}

function insertRow(job) {
  // Newest first: find the first row created before this one.
  let before = null;
  for (const row of list.children) {
    const other = jobs.get(row.dataset.jobId);
    if (other && other.created < job.created) {
      before = row;
      break;
    }
  }
  list.insertBefore(job.el, before);
  trimRows();
}

function trimRows() {
  const rows = [...list.children];
  for (const row of rows.slice(MAX_ROWS).reverse()) {
    const job = jobs.get(row.dataset.jobId);
    if (job && FINAL.has(job.state)) {
      row.remove();
      jobs.delete(job.id);
      client.unsubscribe([job.id]);
    }
  }
}

function apply(event) {
  if (event.parent) return; // a group's child: shown under its group, not as a row
  const job = jobFor(event.job_id, { task: event.task, created: event.ts });
  if (job.events.has(event.seq)) return;
  job.events.set(event.seq, event);
  if (event.task) job.task = event.task;
  if (event.seq > job.seq) {
    job.seq = event.seq;
    job.state = event.state;
    if (event.progress) job.progress = event.progress;
    job.result = event.result;
    job.error = event.error || null;
  }
  if (event.seq === 1 && event.ts < job.created) job.created = event.ts;
  job.firstTs = job.firstTs === null ? event.ts : Math.min(job.firstTs, event.ts);
  job.lastTs = job.lastTs === null ? event.ts : Math.max(job.lastTs, event.ts);
  touch(job);
}

function touch(job) {
  dirty.add(job);
  if (!frame) frame = requestAnimationFrame(flush);
}

// -- rendering ------------------------------------------------------------------------

function flush() {
  frame = 0;
  for (const job of dirty) render(job);
  dirty.clear();
  renderCounts();
}

function percentOf(job) {
  if (job.state === "SUCCESS") return 100;
  if (job.progress && typeof job.progress.percent === "number") return job.progress.percent;
  return 0;
}

function formatBytes(n) {
  if (n < 1024) return `${n} B`;
  if (n < 1024 * 1024) return `${(n / 1024).toFixed(1)} KB`;
  return `${(n / 1024 / 1024).toFixed(1)} MB`;
}

/** "waiting for quota · retry in 3 s" for a job held by a rate limit (its latest event says until when). */
function waitingText(job) {
  const p = job.progress || {};
  if (job.state !== "RATE_LIMITED" || p.reason !== "rate_limited") return "";
  const left = Math.max(0, Math.ceil(p.retry_at - Date.now() / 1000));
  return `waiting for quota (${p.limit}) · retry in ${left} s`;
}

function render(job) {
  const el = job.el;
  const final = FINAL.has(job.state);
  el.dataset.state = job.state;
  $(".task", el).textContent = job.task || "task";
  const badge = $(".state", el);
  badge.textContent = job.state;
  badge.dataset.state = job.state;

  const pct = percentOf(job);
  const bar = $(".progress", el);
  bar.setAttribute("aria-valuenow", String(pct));
  $(".bar-fill", el).style.width = `${pct}%`;
  $(".percent", el).textContent = `${Math.round(pct)}%`;

  const p = job.progress || {};
  const step = p.step != null && p.total != null ? ` (${p.step}/${p.total})` : "";
  const aggregate = p.done != null && p.total != null; // a group or chord: its children's count
  $(".description", el).textContent = aggregate
    ? `${p.done} of ${p.total} done` + (p.failed ? `, ${p.failed} failed` : "") +
      (job.state === "CALLBACK" ? " · running the callback" : "")
    : job.state === "SUCCESS" ? "Completed" : final ? "" : waitingText(job) || (p.description || "") + step;
  renderChildren(job, aggregate ? p.total : 0);
  $(".elapsed", el).textContent = elapsed(job);

  const outcome = $(".outcome", el);
  outcome.classList.toggle("error", Boolean(job.error) && job.state !== "SUCCESS");
  if (job.state === "SUCCESS" && job.result && job.result.type === "stored_result") {
    // A result kept in object storage: the event carries only its reference.
    const link = document.createElement("a");
    link.className = "download";
    link.href = `${BASE}/api/v1/jobs/${encodeURIComponent(job.id)}/result` + (token ? `?token=${encodeURIComponent(token)}` : "");
    link.textContent = `Download ${job.result.filename} (${formatBytes(job.result.size_bytes)})`;
    outcome.replaceChildren(link);
  } else if (job.state === "SUCCESS" && job.result !== undefined) {
    outcome.textContent = `result: ${JSON.stringify(job.result)}`;
  } else if (job.error && (final || job.state === "RETRY")) {
    outcome.textContent = `${job.error.type}: ${job.error.message}`;
  } else {
    outcome.textContent = "";
  }

  $(".cancel", el).hidden = final;
  const toggle = $(".toggle", el);
  toggle.setAttribute("aria-expanded", String(job.expanded));
  const timeline = $(".timeline", el);
  timeline.hidden = !job.expanded;
  renderTimeline(job, timeline);
}

// The timeline shows transitions: a run of events in the same state (progress updates)
// is one entry that keeps the latest detail and counts the updates. Only entries that
// changed are touched, so thousands of progress events stay cheap to render.
// A group's children sit under its aggregate bar, collapsed when there are many, and are
// fetched when opened (a page of them: a group may have thousands).
const CHILDREN_SHOWN = 50;

function renderChildren(job, total) {
  const box = $(".children", job.el);
  box.hidden = total === 0;
  if (total === 0) return;
  $("summary", box).textContent = `${total} ${job.task === "chord" ? "chord tasks" : "children"}`;
  if (!job.childrenWired) {
    job.childrenWired = true;
    if (total <= 10) box.open = true;
    box.addEventListener("toggle", () => box.open && loadChildren(job));
  }
  const now = Date.now();
  if (box.open && (FINAL.has(job.state) || !job.childrenAt || now - job.childrenAt > 1000)) loadChildren(job);
}

async function loadChildren(job) {
  job.childrenAt = Date.now();
  const box = $(".children", job.el);
  let page;
  try {
    page = await api(`/api/v1/jobs/${encodeURIComponent(job.id)}/children?limit=${CHILDREN_SHOWN}`);
  } catch {
    return; // shown again on the next event
  }
  const items = page.children.map((child) => {
    const li = document.createElement("li");
    const id = document.createElement("code");
    id.textContent = child.job_id;
    const badge = document.createElement("span");
    badge.className = "badge state";
    badge.textContent = badge.dataset.state = child.status;
    li.append(badge, id);
    return li;
  });
  if (page.total > page.children.length) {
    const more = document.createElement("li");
    more.textContent = `… and ${page.total - page.children.length} more`;
    items.push(more);
  }
  $(".child-list", box).replaceChildren(...items);
}

function renderTimeline(job, timeline) {
  const events = [...job.events.values()].sort((a, b) => a.seq - b.seq);
  const runs = [];
  for (const e of events) {
    const last = runs[runs.length - 1];
    if (last && last.state === e.state && e.state !== "RETRY" && e.state !== "STARTED") {
      last.latest = e;
      last.count += 1 + (e.coalesced || 0); // it stands for the updates coalesced into it
    } else {
      runs.push({ state: e.state, first: e, latest: e, count: 1 + (e.coalesced || 0) });
    }
  }
  const start = events.length ? events[0].ts : 0;
  while (timeline.childElementCount > runs.length) timeline.lastElementChild.remove();
  runs.forEach((run, i) => {
    let li = timeline.children[i];
    if (!li) {
      li = document.createElement("li");
      li.innerHTML =
        '<span class="t-state"></span><span class="t-time"></span>' +
        '<span class="t-offset"></span><span class="t-extra"></span>';
      timeline.appendChild(li);
    }
    if (li.dataset.key === `${run.first.seq}:${run.latest.seq}`) return;
    li.dataset.key = `${run.first.seq}:${run.latest.seq}`;
    li.dataset.state = run.state;
    li.dataset.seq = String(run.first.seq);
    li.dataset.count = String(run.count);
    const p = run.latest.progress;
    const detail = p && p.description ? p.description : "";
    li.children[0].textContent = run.state;
    li.children[1].textContent = new Date(run.first.ts * 1000).toLocaleTimeString();
    li.children[2].textContent = `+${(run.first.ts - start).toFixed(2)}s`;
    li.children[3].textContent = run.count > 1 ? `${detail} · ${run.count} updates` : detail;
  });
}

function elapsed(job) {
  if (job.firstTs === null) return "";
  const end = FINAL.has(job.state) ? job.lastTs : Date.now() / 1000;
  return `${Math.max(0, end - job.firstTs).toFixed(1)}s`;
}

function renderCounts() {
  let running = 0;
  for (const job of jobs.values()) if (!FINAL.has(job.state)) running += 1;
  $("#counts").textContent = `${jobs.size} jobs · ${running} running`;
}

// Running jobs' elapsed time moves even when no event arrives.
setInterval(() => {
  for (const job of jobs.values()) if (!FINAL.has(job.state)) touch(job);
}, 1000);

// -- connection -----------------------------------------------------------------------

function showConnection({ status, transport }) {
  const el = $("#connection");
  el.dataset.status = status;
  el.dataset.transport = transport;
  const name = TRANSPORT_NAMES[transport] || transport;
  const text = {
    live: transport === "polling" ? "Live · polling" : `Live · ${name}`,
    connecting: "Connecting…",
    reconnecting: `Reconnecting… (${name})`,
    closed: "Disconnected",
  }[status];
  $(".conn-text", el).textContent = text || status;
}

const params = new URLSearchParams(window.location.search);
// A token from the page's address (`/?token=…`, e.g. a link the app minted) is kept for
// this tab, then taken out of the address bar so it is not bookmarked or shared.
if (params.get("token")) {
  sessionStorage.setItem("jobwire.token", params.get("token"));
  params.delete("token");
  const rest = params.toString();
  history.replaceState(null, "", window.location.pathname + (rest ? `?${rest}` : ""));
}
const token = sessionStorage.getItem("jobwire.token") || undefined;

/** `?transports=sse,polling` forces a fallback (for trying it out); unknown names are left
 * out, and none left means the usual order. */
function forcedTransports() {
  const wanted = (params.get("transports") || "").split(",").filter((t) => TRANSPORTS.includes(t));
  return wanted.length ? wanted : undefined;
}
// Where jobwire is: the folder this module came from, so the dashboard works at the site's
// root and under a prefix it is mounted at (`/progress/`) alike.
const BASE = new URL(".", import.meta.url).href.replace(/\/$/, "");
const client = new JobwireClient({
  baseUrl: BASE,
  token,
  transports: forcedTransports(),
  upgradeInterval: params.get("upgrade") ? Number(params.get("upgrade")) : undefined,
  onEvent: apply,
  onStatus: showConnection,
  onNewJob: (id, info) => {
    if (info.parent) return; // a group's child: listed under its group
    jobFor(id);
    client.subscribe([id]);
  },
  // Subscribe, then list: a job created before the all-jobs stream was live is in the
  // listing, one created after arrives on the stream.
  onAllSync: () => loadRecent().catch((err) => console.warn("jobwire: could not load recent jobs", err)),
  onError: (err) => console.warn("jobwire:", err.code, err.message),
  // The job's history was lost (a Redis restart) and begins again: drop what was shown.
  onReset: (id) => {
    const job = jobFor(id);
    job.events.clear();
    job.seq = 0;
    touch(job);
  },
});

// -- actions --------------------------------------------------------------------------

const API_TRIES = 6; // a read refused "later" (429, 503) is tried again, backing off, this often

async function api(path, init = {}) {
  const headers = { ...(init.headers || {}) };
  if (token) headers.authorization = `Bearer ${token}`;
  const method = (init.method || "GET").toUpperCase();
  let resp;
  for (let attempt = 0; ; attempt += 1) {
    resp = await fetch(BASE + path, { ...init, headers });
    // Only reads are repeated: a refused submit or cancel is the user's to retry.
    if (method !== "GET" || !RETRYABLE_STATUS.has(resp.status) || attempt + 1 >= API_TRIES) break;
    const delay = notBefore(resp.headers.get("retry-after"), backoff(attempt, 500, 10000));
    await new Promise((resolve) => setTimeout(resolve, delay));
  }
  const body = resp.status === 204 ? null : await resp.json();
  if (!resp.ok) {
    const err = new Error(body && body.error ? body.error.message : `HTTP ${resp.status}`);
    err.code = body && body.error ? body.error.code : "http_error";
    throw err;
  }
  return body;
}

async function cancel(job) {
  const button = $(".cancel", job.el);
  button.disabled = true;
  try {
    await api(`/api/v1/jobs/${encodeURIComponent(job.id)}`, { method: "DELETE" });
  } catch (err) {
    if (err.code !== "job_finished") alert(`Could not cancel: ${err.message}`);
  } finally {
    button.disabled = false;
  }
}

async function loadTasks() {
  const { tasks } = await api("/api/v1/tasks");
  const select = $("#task");
  select.replaceChildren(
    ...tasks.map((t) => {
      const option = document.createElement("option");
      option.value = t.name;
      option.textContent = t.name;
      option.dataset.description = t.description;
      return option;
    }),
  );
  const describe = () => {
    const option = select.selectedOptions[0];
    $("#task-description").textContent = option ? option.dataset.description : "";
  };
  select.addEventListener("change", describe);
  describe();
}

$("#submit-form").addEventListener("submit", async (e) => {
  e.preventDefault();
  const button = $("#submit");
  const error = $("#submit-error");
  error.textContent = "";
  button.disabled = true;
  try {
    const task = $("#task").value;
    const delay = Number($("#delay").value);
    const job = await api("/api/v1/jobs", {
      method: "POST",
      headers: { "content-type": "application/json" },
      body: JSON.stringify({ task, kwargs: { delay } }),
    });
    jobFor(job.job_id, { task });
    client.subscribe([job.job_id]);
  } catch (err) {
    error.textContent = err.message;
  } finally {
    button.disabled = false;
  }
});

async function loadRecent() {
  const { jobs: listed } = await api("/api/v1/jobs?limit=50");
  const recent = listed.filter((snap) => !snap.parent); // children show under their group
  for (const snap of recent.reverse()) {
    const job = jobFor(snap.job_id, { task: snap.task, created: snap.created_at });
    if (!job.seq) {
      job.state = snap.status; // provisional until the replayed events arrive
      job.progress = snap.progress;
    }
  }
  client.subscribe(recent.map((s) => s.job_id));
}

loadTasks().catch((err) => ($("#submit-error").textContent = `Could not load tasks: ${err.message}`));
loadRecent().catch((err) => console.warn("jobwire: could not load recent jobs", err));
client.subscribeAll();

window.jobwire = { client, jobs };

// -- rate limits panel (admin) --------------------------------------------------------------

/** Whether the token may read admin endpoints: without a token (no auth) the server decides;
 * a token without the admin scope is not asked at all (a 403 every 5 s says nothing new). */
function mayBeAdmin() {
  if (!token) return true;
  try {
    const claims = JSON.parse(atob(token.split(".")[1].replace(/-/g, "+").replace(/_/g, "/")));
    const scope = Array.isArray(claims.scope) ? claims.scope : String(claims.scope || "").split(" ");
    return scope.includes("admin") && !claims.jobs;
  } catch (err) {
    return false;
  }
}

let limitsTimer = null;
async function loadLimits() {
  let limits;
  try {
    ({ limits } = await api("/api/v1/admin/rate-limits"));
  } catch (err) {
    if (err.code === "forbidden" || err.code === "unauthenticated") clearInterval(limitsTimer);
    return; // not an admin, or none defined: no panel
  }
  const panel = $("#limits");
  panel.hidden = limits.length === 0;
  $("#limits-body").replaceChildren(
    ...limits.map((l) => {
      const row = document.createElement("tr");
      for (const text of [l.name, l.rate, String(l.burst), String(l.waiting)]) {
        const cell = document.createElement("td");
        cell.textContent = text;
        row.append(cell);
      }
      return row;
    }),
  );
}

if (mayBeAdmin()) {
  loadLimits();
  limitsTimer = setInterval(loadLimits, 5000);
}
// Waiting jobs count down their "retry in" every second.
setInterval(() => {
  for (const job of jobs.values()) if (job.state === "RATE_LIMITED") touch(job);
}, 1000);
