// jobwire-progress.js — <jobwire-progress job="…">: a live progress bar for one jobwire job.
// Plain ES module, no dependencies, no build step.
//
//   <script type="module" src="https://jobs.example.com/jobwire-progress.js"></script>
//   <jobwire-progress job="4c7f…"></jobwire-progress>
//   <jobwire-progress job="9a1b…" token="eyJ…" label="Report export"></jobwire-progress>
//
// Attributes: `job` (change it to switch jobs), `base-url` (default: where this module was
// loaded from, so a page on another origin needs nothing else), `token` (a fixed token),
// `label` (the bar's accessible name). Properties: `token` (a string, or a function that
// returns one, asked again on every reconnect) and `client` (a JobwireClient of yours,
// shared by the bars you give it). Bars with the same base URL and token share one client
// (one websocket for a page of bars); a bar removed from the page unsubscribes its job, and
// the client closes when no bar uses it. Every event fires `jobwire-progress`, the last one
// `jobwire-final` too (CustomEvents, `detail` is the event; they bubble out of the shadow).
// Theming: CSS custom properties --jobwire-progress-{color,track,height,radius,success,
// failure,retry,font} and the parts state, percent, bar, fill, description, detail,
// download, estimate.

import { JobwireClient } from "./jobwire.js";

const FINAL = new Set(["SUCCESS", "FAILURE", "REVOKED"]);
const MODULE_BASE = new URL(".", import.meta.url).href;

// -- the time-remaining estimate (pure) -------------------------------------------------

/** When an estimate may be shown: enough samples over enough time, every one of them close
 * to the straight line from the first to the last (a steady rate), and no long silence. */
export const ESTIMATE = {
  minSamples: 5,
  minSpanMs: 3000,
  maxDeviation: 0.1, // of the progress made over the samples
  stallFactor: 3, // silence longer than this many typical gaps (at least 1 s each): stalled
  sampleGapMs: 200, // closer samples are merged (see addSample), so bursts count once
  maxSamples: 60,
};

/** Seconds left, or null when the samples ({t: ms, percent}) show no steady rate at `now`
 * (ms, same clock). Null means "say nothing": an estimate is never a guess. */
export function estimateRemaining(samples, now, rules = ESTIMATE) {
  if (samples.length < rules.minSamples) return null;
  const first = samples[0];
  const last = samples[samples.length - 1];
  const span = last.t - first.t;
  const made = last.percent - first.percent;
  if (span < rules.minSpanMs || made <= 0 || last.percent >= 100) return null;
  for (let i = 1; i < samples.length; i++) {
    if (samples[i].percent < samples[i - 1].percent) return null; // went backwards
  }
  const rate = made / span;
  for (const s of samples) {
    const expected = first.percent + rate * (s.t - first.t);
    if (Math.abs(s.percent - expected) > rules.maxDeviation * made) return null; // erratic
  }
  const gap = Math.max(span / (samples.length - 1), 1000);
  if (now - last.t > rules.stallFactor * gap) return null; // no report for a while: stalled
  return Math.max(0, ((100 - last.percent) / rate - (now - last.t)) / 1000);
}

/** `samples` with one more. Samples stay `sampleGapMs` apart but for the newest, which a
 * newer one replaces while it is that close: a burst is one point, and the list spans time,
 * not events. */
export function addSample(samples, sample, rules = ESTIMATE) {
  const last = samples[samples.length - 1];
  if (last && sample.percent < last.percent) return [sample]; // backwards: start again
  const out = samples.slice(-(rules.maxSamples - 1));
  const before = out[out.length - 2];
  if (before && last.t - before.t < rules.sampleGapMs) out[out.length - 1] = sample;
  else out.push(sample);
  return out;
}

/** "about 2 min left (estimate)"; "" for null. */
export function describeRemaining(seconds) {
  if (seconds == null) return "";
  if (seconds < 10) return "a few seconds left (estimate)";
  if (seconds < 60) return `about ${Math.round(seconds / 5) * 5} s left (estimate)`;
  const minutes = Math.round(seconds / 60);
  if (minutes < 60) return `about ${minutes} min left (estimate)`;
  const rest = minutes % 60;
  return `about ${Math.floor(minutes / 60)} h${rest ? ` ${rest} min` : ""} left (estimate)`;
}

// -- one job's model, shared by every bar that shows it --------------------------------------

function newModel() {
  return { event: null, state: null, progress: null, percent: null, samples: [], skew: null, problem: null };
}

function applyEvent(model, event, arrived) {
  const p = event.progress && typeof event.progress === "object" ? event.progress : null;
  model.event = event;
  model.state = event.state;
  model.problem = null;
  if (p || !FINAL.has(event.state)) model.progress = p; // a final event may say nothing new
  if (event.state === "SUCCESS") model.percent = 100;
  else if (p && typeof p.percent === "number") model.percent = p.percent;
  else if (!FINAL.has(event.state)) model.percent = null; // no number now: indeterminate
  // (a failed or revoked job keeps the bar where it stopped)
  if (model.percent === null || FINAL.has(event.state)) model.samples = [];
  else model.samples = addSample(model.samples, { t: event.ts * 1000, percent: model.percent });
  // Samples carry the worker's clock. The smallest arrival delay seen is the best guess at
  // the clocks' offset; a replayed old event (delays of minutes) says nothing about it.
  const delay = arrived - event.ts * 1000;
  if (delay < 60000 && (model.skew === null || delay < model.skew)) model.skew = delay;
}

// -- clients, shared per base URL and token -------------------------------------------------

const pools = new Set();
const poolOfClient = new WeakMap();

/** A client with the bars that use it: job id → {model, bars}. */
class Pool {
  constructor(client, owned) {
    this.client = client;
    this.owned = owned; // ours to close when the last bar goes; a page's own client is not
    this.jobs = new Map();
    this.problem = null; // an error of the connection, not of one job
  }

  static for(bar) {
    if (bar.client) {
      let pool = poolOfClient.get(bar.client);
      if (!pool) poolOfClient.set(bar.client, (pool = Pool.around(bar.client)));
      return pool;
    }
    const baseUrl = bar.baseUrl;
    const token = bar.token || undefined;
    for (const pool of pools) if (pool.baseUrl === baseUrl && pool.token === token) return pool;
    const pool = new Pool(null, true);
    Object.assign(pool, { baseUrl, token });
    pool.client = new JobwireClient({ baseUrl, token, ...pool.handlers() });
    pools.add(pool);
    return pool;
  }

  /** A page's client: its callbacks are kept and ours run after them. */
  static around(client) {
    const pool = new Pool(client, false);
    for (const [name, handler] of Object.entries(pool.handlers())) {
      const theirs = client[name];
      client[name] = (...args) => {
        if (typeof theirs === "function") theirs.apply(client, args);
        handler(...args);
      };
    }
    return pool;
  }

  handlers() {
    return {
      onEvent: (event) => {
        const job = this.jobs.get(event.job_id);
        if (!job) return;
        applyEvent(job.model, event, Date.now());
        for (const bar of job.bars) bar._update(event);
      },
      onReset: (jobId) => this._each(jobId, (job) => (job.model = newModel())),
      onError: (error) => {
        if (error.job_id) return this._each(error.job_id, (job) => (job.model.problem = error));
        this.problem = error; // the connection's (a token refused, no server): every bar's
        this._each(null);
      },
      onStatus: ({ status }) => {
        if (status !== "live" || !this.problem) return;
        this.problem = null;
        this._each(null);
      },
    };
  }

  /** Change one job (or every job) and show it. */
  _each(jobId, change = () => {}) {
    for (const [id, job] of this.jobs) {
      if (jobId && id !== jobId) continue;
      change(job);
      for (const bar of job.bars) bar._update(null);
    }
  }

  add(bar, jobId) {
    let job = this.jobs.get(jobId);
    if (!job) {
      this.jobs.set(jobId, (job = { model: newModel(), bars: new Set() }));
      this.client.subscribe([jobId]);
    }
    job.bars.add(bar);
    return job;
  }

  remove(bar, jobId) {
    const job = this.jobs.get(jobId);
    if (!job || !job.bars.delete(bar) || job.bars.size) return;
    this.jobs.delete(jobId);
    this.client.unsubscribe([jobId]);
    if (!this.jobs.size && this.owned) {
      this.client.close();
      pools.delete(this);
    }
  }
}

// -- the element --------------------------------------------------------------------------

const STYLE = `
:host { display: block; font: var(--jobwire-progress-font, inherit); }
:host([hidden]), [hidden] { display: none !important; }
.head { display: flex; justify-content: space-between; gap: .5em; }
[part~="state"] { font-weight: 600; }
[part~="bar"] { height: var(--jobwire-progress-height, .5em); margin: .3em 0; overflow: hidden;
  background: var(--jobwire-progress-track, #e5e7eb); border-radius: var(--jobwire-progress-radius, 999px); }
[part~="fill"] { height: 100%; width: 0; background: var(--jobwire-progress-color, #2563eb);
  border-radius: inherit; transition: width .3s ease; }
[part~="bar"].indeterminate [part~="fill"] { width: 30%; animation: slide 1.4s ease-in-out infinite; }
@keyframes slide { from { transform: translateX(-100%); } to { transform: translateX(340%); } }
@media (prefers-reduced-motion: reduce) { [part~="fill"] { transition: none; animation: none; } }
:host([state="SUCCESS"]) [part~="fill"] { background: var(--jobwire-progress-success, #16a34a); }
:host([state="FAILURE"]) [part~="fill"], :host([state="REVOKED"]) [part~="fill"] {
  background: var(--jobwire-progress-failure, #dc2626); }
:host([state="RETRY"]) [part~="fill"] { background: var(--jobwire-progress-retry, #d97706); }
.small { font-size: .85em; opacity: .85; }
.error { color: var(--jobwire-progress-failure, #dc2626); opacity: 1; }
.sr-only { position: absolute; width: 1px; height: 1px; overflow: hidden; clip: rect(0 0 0 0);
  white-space: nowrap; }
`;

const HTML = `<style>${STYLE}</style>
<div class="head"><span part="state"></span><span part="percent"></span></div>
<div part="bar" role="progressbar" aria-valuemin="0" aria-valuemax="100"><div part="fill"></div></div>
<div part="description" class="small"></div>
<div part="detail" class="small"></div>
<div part="estimate" class="small"></div>
<div class="sr-only" role="status" aria-live="polite"></div>`;

function formatBytes(n) {
  if (!(n >= 0)) return "";
  if (n < 1024) return `${n} B`;
  return n < 1024 * 1024 ? `${(n / 1024).toFixed(1)} KB` : `${(n / 1024 / 1024).toFixed(1)} MB`;
}

/** "Retry 1 at 10:42:07 after ConnectionError: …", from the event's `retry` and `error`. */
function retryText(event) {
  const retry = event.retry || {};
  const words = ["Retry"];
  if (retry.attempt != null) words.push(String(retry.attempt));
  if (retry.eta) words.push(`at ${new Date(retry.eta).toLocaleTimeString()}`);
  else if (retry.countdown != null) words.push(`in ${retry.countdown} s`);
  if (event.error) words.push(`after ${event.error.type}: ${event.error.message}`);
  return words.join(" ");
}

const Base = globalThis.HTMLElement ?? class {}; // importable outside a browser (the estimate)

export class JobwireProgressElement extends Base {
  static observedAttributes = ["job", "base-url", "token", "label"];

  constructor() {
    super();
    this.attachShadow({ mode: "open" }).innerHTML = HTML;
    this._el = { live: this.shadowRoot.querySelector('[role="status"]') };
    for (const node of this.shadowRoot.querySelectorAll("[part]")) this._el[node.getAttribute("part")] = node;
    this._attached = null; // {pool, jobId, job}
    this._announced = null;
    this._token = undefined;
    this._client = undefined;
  }

  get job() { return this.getAttribute("job") || ""; }
  set job(id) { this.setAttribute("job", id); }
  get baseUrl() {
    const url = new URL(this.getAttribute("base-url") || MODULE_BASE, document.baseURI);
    return url.href.replace(/\/$/, "");
  }
  get token() { return this._token ?? this.getAttribute("token") ?? undefined; }
  set token(value) { this._token = value; this._reattach(); }
  get client() { return this._client; }
  set client(value) { this._client = value; this._reattach(); }
  get state() { return this._model()?.state ?? null; }
  get percent() { return this._model()?.percent ?? null; }
  /** Seconds left by the estimate, or null while there is no steady rate. */
  get remaining() {
    const model = this._model();
    if (!model || model.percent === null || FINAL.has(model.state)) return null;
    return estimateRemaining(model.samples, Date.now() - (model.skew ?? 0));
  }

  connectedCallback() {
    // Properties a page set before this module defined the element shadow our accessors.
    for (const name of ["job", "token", "client"]) {
      if (!Object.hasOwn(this, name)) continue;
      const value = this[name];
      delete this[name];
      this[name] = value;
    }
    this._attach();
  }
  disconnectedCallback() {
    // A bar moved elsewhere on the page is disconnected and connected again in one go.
    queueMicrotask(() => !this.isConnected && this._detach());
  }
  attributeChangedCallback(name, old, value) {
    if (old === value) return;
    if (name === "label") this._render();
    else this._reattach();
  }

  _model() { return this._attached?.job.model; }

  _reattach() {
    if (!this.isConnected) return;
    const old = this._attached;
    this._attached = null;
    this._attach(); // first: a client this bar alone used stays open when it only switches job
    const now = this._attached;
    if (old && (old.pool !== now?.pool || old.jobId !== now?.jobId)) old.pool.remove(this, old.jobId);
  }

  _attach() {
    if (this._attached || !this.job) return this._render();
    clearInterval(this._timer);
    const pool = Pool.for(this);
    this._attached = { pool, jobId: this.job, job: pool.add(this, this.job) };
    this._announced = null;
    this._timer = setInterval(() => this._renderEstimate(), 1000); // it counts down, and can stall
    const last = this._model().event;
    if (last) this._update(last); // a job another bar already follows
    else this._render();
  }

  _detach() {
    clearInterval(this._timer);
    if (!this._attached) return;
    this._attached.pool.remove(this, this._attached.jobId);
    this._attached = null;
  }

  /** An event (or null: connection, error or reset news) for this bar's job. */
  _update(event) {
    this._render();
    if (!event) return;
    const init = { detail: event, bubbles: true, composed: true };
    this.dispatchEvent(new CustomEvent("jobwire-progress", init));
    if (event.final || FINAL.has(event.state)) {
      clearInterval(this._timer);
      this.dispatchEvent(new CustomEvent("jobwire-final", init));
    }
  }

  _render() {
    const el = this._el;
    const model = this._model() || newModel();
    const pool = this._attached?.pool;
    const event = model.event || {};
    const state = model.state;
    const progress = model.progress || {};
    const pct = model.percent;
    const problem = model.problem || (!FINAL.has(state) && pool?.problem) || null;
    if (state) this.setAttribute("state", state);
    else this.removeAttribute("state");

    const trouble = problem && (problem.code === "job_not_found" ? "Not found" : !state && "Error");
    el.state.textContent = trouble || state || (this.job ? "Connecting…" : "");
    el.percent.textContent = pct === null ? "" : `${Math.round(pct)}%`;
    el.fill.style.width = pct === null ? "" : `${pct}%`;
    el.bar.classList.toggle("indeterminate", pct === null && !!state && !FINAL.has(state));
    const aggregate = progress.done != null && progress.total != null; // a group or chord
    let description = "";
    if (aggregate) {
      description = `${progress.done} of ${progress.total} done`;
      if (progress.failed) description += `, ${progress.failed} failed`;
      if (state === "CALLBACK") description += " · running the callback";
    } else if (state === "SUCCESS") description = "Done";
    else if (!FINAL.has(state) && progress.description) {
      const step = progress.step != null && progress.total != null;
      description = progress.description + (step ? ` (${progress.step}/${progress.total})` : "");
    }
    el.description.textContent = description;
    this._renderDetail(event, state, problem);
    this._renderEstimate();

    const bar = el.bar;
    bar.setAttribute("aria-label", this.getAttribute("label") || `Progress of job ${this.job}`);
    if (pct === null) bar.removeAttribute("aria-valuenow");
    else bar.setAttribute("aria-valuenow", String(Math.round(pct * 100) / 100));
    const words = [pct === null ? null : `${Math.round(pct)}%`, state, description].filter(Boolean);
    bar.setAttribute("aria-valuetext", words.join(", ") || "waiting");
    const news = problem ? `${problem.code}: ${problem.message}` : state && this._news(state, event);
    if (news && news !== this._announced) el.live.textContent = this._announced = news; // changes only
  }

  _renderEstimate() {
    const remaining = this.remaining;
    this._el.estimate.textContent = describeRemaining(remaining);
    this._el.estimate.hidden = remaining === null;
  }

  _renderDetail(event, state, problem) {
    const detail = this._el.detail;
    const result = event.result;
    detail.classList.toggle("error", Boolean(problem) || state === "FAILURE");
    if (problem) detail.textContent = problem.message || problem.code;
    else if (state === "SUCCESS" && result && result.type === "stored_result") {
      if (detail.firstChild?.dataset?.job === event.job_id) return; // already offered
      const link = document.createElement("a");
      link.setAttribute("part", "download");
      link.dataset.job = event.job_id;
      link.download = result.filename || "";
      link.textContent = `Download ${result.filename || "result"} (${formatBytes(result.size_bytes)})`;
      detail.replaceChildren(link);
      this._downloadHref(event.job_id).then((href) => (link.href = href));
    } else if (state === "RETRY") detail.textContent = retryText(event);
    else if ((state === "FAILURE" || state === "REVOKED") && event.error) {
      detail.textContent = `${event.error.type}: ${event.error.message}`;
    } else detail.textContent = state === "REVOKED" ? "Cancelled" : "";
  }

  /** The result endpoint, with the token in the address (a link cannot send a header). */
  async _downloadHref(jobId) {
    const client = this._attached?.pool.client;
    const url = `${client?.baseUrl || this.baseUrl}/api/v1/jobs/${encodeURIComponent(jobId)}/result`;
    let token = this.token ?? client?.token; // a page's own client has its own token
    if (typeof token === "function") token = await token();
    return token ? `${url}?token=${encodeURIComponent(token)}` : url;
  }

  _news(state, event) {
    const error = event.error ? `${event.error.type}: ${event.error.message}` : state;
    if (state === "FAILURE") return `Failed: ${error}`;
    if (state === "RETRY") return retryText(event);
    if (state === "SUCCESS") return "Finished: SUCCESS";
    return state === "REVOKED" ? "Cancelled: REVOKED" : `Now ${state}`;
  }
}

if (globalThis.customElements && !customElements.get("jobwire-progress")) {
  customElements.define("jobwire-progress", JobwireProgressElement);
}
