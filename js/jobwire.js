// jobwire.js — the jobwire client, for browsers and Node >= 20. Plain ES module, no build
// step, no dependencies; its types are in jobwire.d.ts (hand-written, kept beside it).
//
//   import { JobwireClient } from "jobwire";            // or "/jobwire.js" from a jobwire server
//   const client = new JobwireClient({
//     onEvent: (event) => render(event),          // events in seq order per job, each once
//     onStatus: ({ status, transport }) => show(status, transport),
//   });
//   client.subscribe(["4c7f…"]);
//   …
//   client.close();                                // every timer and connection let go
//
// In Node, pass `baseUrl` (there is no page to default to) and, for WebSocket, `ws`'s
// constructor: `new JobwireClient({ baseUrl, WebSocket })`. Without one Node 20 polls
// through its fetch.
//
// Transports, in order: WebSocket, then Server-Sent Events, then polling; one whose
// constructor is missing here is left out. The client moves down when a transport cannot
// be opened `failuresBeforeFallback` times in a row, and says which one it is on through
// onStatus. When even the last one keeps failing and nothing has ever opened, onError gets
// `{code: "unreachable"}` once, and the client goes on trying. On every reconnect it resumes
// each job from the last seq it delivered, so across drops, restarts and fallbacks no
// transition is missed and no event is delivered twice. When the client falls behind, the
// server coalesces progress: an event with `coalesced: n` stands for itself and the n
// progress events before it, which were never sent (its progress is the newest).

// -- The contract ------------------------------------------------------------------------
//
// Mirrored from jobwire/protocol.py, the one contract module: change names there first.
// tests/test_js_contract.py holds these to the Python classes, name by name and value by
// value, and tests/test_js_package.py holds jobwire.d.ts to them.

/** What a client sends on `/ws`: `{"op": <Op>, ...}`. */
export const Op = Object.freeze({
  SUBSCRIBE: "subscribe",
  UNSUBSCRIBE: "unsubscribe",
  SUBSCRIBE_ALL: "subscribe_all",
  UNSUBSCRIBE_ALL: "unsubscribe_all",
  PING: "ping",
  AUTH: "auth",
});

/** The `type` of what the server sends, on `/ws` frames and SSE `event: control` data. */
export const Msg = Object.freeze({
  WELCOME: "welcome",
  EVENT: "event",
  SUBSCRIBED: "subscribed",
  UNSUBSCRIBED: "unsubscribed",
  SUBSCRIBED_ALL: "subscribed_all",
  UNSUBSCRIBED_ALL: "unsubscribed_all",
  GAP: "gap",
  RESET: "reset",
  RESYNC: "resync",
  HEARTBEAT: "heartbeat",
  PONG: "pong",
  ERROR: "error",
  END: "end",
});

/** Websocket close codes (4000-4999 are jobwire's own). */
export const Close = Object.freeze({
  NORMAL: 1000,
  GOING_AWAY: 1001,
  POLICY: 1008,
  TOO_BIG: 1009,
  INTERNAL_ERROR: 1011,
  TRY_AGAIN_LATER: 1013,
  BAD_REQUEST: 4400,
  UNAUTHENTICATED: 4401,
  FORBIDDEN: 4403,
  NOT_FOUND: 4404,
});

/** Close codes after which reconnecting cannot help. */
export const TERMINAL_CLOSE_CODES = new Set([
  Close.NORMAL,
  Close.POLICY,
  Close.TOO_BIG,
  Close.BAD_REQUEST,
  Close.UNAUTHENTICATED,
  Close.FORBIDDEN,
  Close.NOT_FOUND,
]);

/** States after which a job never changes again (its event has `final: true`). */
export const FINAL_STATES = new Set(["SUCCESS", "FAILURE", "REVOKED"]);

/** Why a stream ended at its token's `exp`: the message of that `unauthenticated` error. */
export const TOKEN_EXPIRED = "token expired";

/** The transports, best first. */
export const TRANSPORTS = Object.freeze(["websocket", "sse", "polling"]);

/** Statuses that mean "later" (too many connections, overloaded), not "no". */
export const RETRYABLE_STATUS = new Set([408, 429, 502, 503, 504]);

/** Exponential backoff with jitter (as jobwire/backoff.py): the delay in ms for `attempt`. */
export function backoff(attempt, min, max) {
  const base = Math.min(max, min * 2 ** attempt);
  return base / 2 + Math.random() * base; // 0.5-1.5 × base: spreads reconnect storms
}

/** `delay` (ms), or a moment past the server's `Retry-After` (seconds) if that is later:
 * 1-1.5 × it, so clients refused together do not all come back at once (as not_before in
 * jobwire/backoff.py). */
export function notBefore(retryAfter, delay) {
  const seconds = Number(retryAfter);
  if (!retryAfter || !(seconds >= 0)) return delay;
  return Math.max(delay, seconds * 1000 * (1 + Math.random() / 2));
}

const OPEN = 1; // WebSocket.OPEN, in browsers and in `ws` alike
const LOST_JOB_RETRY_MS = 1000;
const LOST_JOB_PATIENCE_MS = 60000;
const CLOSE_HANDSHAKE_MS = 1000; // then a Node `ws` socket whose server went quiet is dropped

// -- Checking options --------------------------------------------------------------------

function fail(message) {
  throw new TypeError(`JobwireClient: ${message}`);
}

/** The server's URL, without a trailing slash. Relative URLs resolve against the page; with
 * no page (Node) there is nothing to default to, so `baseUrl` is required. */
function serverUrl(baseUrl) {
  const page = globalThis.location && globalThis.location.href;
  if (baseUrl === undefined || baseUrl === null || baseUrl === "") {
    if (!page) {
      fail(
        "`baseUrl` is required where there is no page to default to (Node, for one): " +
          'new JobwireClient({ baseUrl: "http://127.0.0.1:8000" })',
      );
    }
    return globalThis.location.origin;
  }
  if (typeof baseUrl !== "string") fail(`baseUrl must be a string, got ${typeof baseUrl}`);
  let url;
  try {
    url = new URL(baseUrl, page || undefined);
  } catch (e) {
    fail(`baseUrl ${JSON.stringify(baseUrl)} is not a URL${page ? "" : " (without a page it must be absolute)"}`);
  }
  if (url.protocol !== "http:" && url.protocol !== "https:") {
    fail(`baseUrl must be http: or https: (the websocket URL is derived from it), got ${JSON.stringify(baseUrl)}`);
  }
  return (url.origin + url.pathname).replace(/\/+$/, "");
}

function callback(options, name) {
  const fn = options[name];
  if (fn === undefined || fn === null) return () => {};
  if (typeof fn !== "function") fail(`${name} must be a function, got ${typeof fn}`);
  return fn;
}

function number(options, name, fallback, { min, integer = false }) {
  const value = options[name];
  if (value === undefined || value === null) return fallback;
  if (typeof value !== "number" || !Number.isFinite(value) || value < min || (integer && !Number.isInteger(value))) {
    fail(`${name} must be ${integer ? "an integer" : "a number"} >= ${min}, got ${String(value)}`);
  }
  return value;
}

function injected(options, name) {
  const given = options[name];
  if (given !== undefined && given !== null) {
    if (typeof given !== "function") fail(`${name} must be a function or constructor, got ${typeof given}`);
    return given;
  }
  return typeof globalThis[name] === "function" ? globalThis[name] : null;
}

function jobIds(ids, method) {
  if (!Array.isArray(ids)) fail(`${method} takes an array of job ids, got ${ids === null ? "null" : typeof ids}`);
  for (const id of ids) {
    if (typeof id !== "string" || !id) fail(`${method}: job ids are non-empty strings, got ${JSON.stringify(id)}`);
  }
  return ids;
}

function parse(text) {
  try {
    return JSON.parse(text);
  } catch (e) {
    return undefined;
  }
}

/** Let go of a connection: no more callbacks from it, and closed. A `ws` socket that
 * errors with no listener would throw, so a quiet one stays; one that does not finish its
 * close handshake soon is dropped, so it cannot keep Node running. */
function letGo(conn, { force = false } = {}) {
  conn.onopen = conn.onmessage = conn.onclose = null;
  conn.onerror = () => {};
  try {
    if (force && typeof conn.terminate === "function") {
      conn.terminate();
      return;
    }
    conn.close();
  } catch (e) {
    return; // already closed
  }
  if (typeof conn.terminate === "function") {
    const timer = setTimeout(() => conn.terminate(), CLOSE_HANDSHAKE_MS);
    if (timer.unref) timer.unref();
  }
}

function describe(error) {
  if (!error) return "";
  const cause = error.cause && (error.cause.code || error.cause.message);
  return [error.message, cause].filter(Boolean).join(": ");
}

// -- The client --------------------------------------------------------------------------

export class JobwireClient {
  /** See jobwire.d.ts (`JobwireOptions`) for every option. */
  constructor(options = {}) {
    if (options === null || typeof options !== "object") fail(`options must be an object, got ${options}`);
    this.baseUrl = serverUrl(options.baseUrl);
    this._WebSocket = injected(options, "WebSocket");
    this._EventSource = injected(options, "EventSource");
    const fetchImpl = injected(options, "fetch");
    // Called as a plain function: a browser's fetch refuses to run as another object's method.
    this._fetch = fetchImpl && ((url, init) => fetchImpl(url, init));

    const wanted = options.transports ?? TRANSPORTS;
    if (!Array.isArray(wanted) || !wanted.length) fail("transports must be a non-empty array");
    for (const t of wanted) {
      if (!TRANSPORTS.includes(t)) fail(`unknown transport ${JSON.stringify(t)}: choose from ${TRANSPORTS.join(", ")}`);
    }
    const usable = { websocket: this._WebSocket, sse: this._EventSource, polling: this._fetch };
    this.transports = [...new Set(wanted)].filter((t) => usable[t]);
    if (!this.transports.length) {
      fail(
        `none of the transports ${wanted.join(", ")} can run here: no WebSocket, EventSource or fetch. ` +
          "In Node, pass `WebSocket` (from the `ws` package), or run Node >= 20 for fetch.",
      );
    }

    this.onEvent = callback(options, "onEvent");
    this.onStatus = callback(options, "onStatus");
    this.onNewJob = callback(options, "onNewJob");
    this.onAllSync = callback(options, "onAllSync");
    this.onError = callback(options, "onError");
    this.onReset = callback(options, "onReset");
    this.pollInterval = number(options, "pollInterval", 1000, { min: 1 });
    this.failuresBeforeFallback = number(options, "failuresBeforeFallback", 3, { min: 1, integer: true });
    this.upgradeInterval = number(options, "upgradeInterval", 30000, { min: 0 });
    this.connectTimeout = number(options, "connectTimeout", 10000, { min: 0 });
    const token = options.token;
    if (token !== undefined && token !== null && typeof token !== "string" && typeof token !== "function") {
      fail(`token must be a string or a function that returns one, got ${typeof token}`);
    }
    this.token = token ?? undefined;
    this._token = typeof token === "string" ? token : null;
    this.backoffMin = 250;
    this.backoffMax = 10000;

    this._jobs = new Map(); // jobId -> {last: seq delivered, final, epoch, lostSince}
    this._all = false;
    this._known = new Set(); // jobs announced through onNewJob
    this._level = 0; // index into this.transports
    this._failures = 0; // consecutive failed opens on the current transport
    this._refusals = 0; // sockets closed "try again later" (1013) before anything arrived
    this._everOpened = false; // some transport reached the server once
    this._toldUnreachable = false;
    this._attempt = 0; // bumped by every connect and teardown: a stale open is dropped
    this._conn = null; // the current transport's handle (a poll's is its AbortController's)
    this._polling = null; // the poll in flight
    this._pollAgain = false;
    this._timer = null; // reconnect or next poll
    this._watchdog = null;
    this._upgradeTimer = null;
    this._probeDone = null; // ends the upgrade probe in flight
    this._lostTimers = new Set();
    this._closed = false;
    this.status = "connecting";
    this.transport = this.transports[0];
    this._connect();
  }

  /** Watch jobs; `since` maps job id to the last seq already seen (default: all history).
   * A job already watched is left as it is. */
  subscribe(ids, since = {}) {
    jobIds(ids, "subscribe()");
    if (since === null || typeof since !== "object") fail("subscribe(): since must be an object of job id -> seq");
    if (this._closed) return;
    const added = [];
    for (const id of ids) {
      if (this._jobs.has(id)) continue;
      const from = Object.hasOwn(since, id) ? since[id] : 0;
      if (!Number.isSafeInteger(from) || from < 0) fail(`subscribe(): since[${JSON.stringify(id)}] must be a seq >= 0`);
      this._jobs.set(id, { last: from, final: false, epoch: null, lostSince: null });
      added.push(id);
    }
    if (added.length) this._changed(added);
  }

  /** Stop watching jobs: no event of theirs is delivered from now on. */
  unsubscribe(ids) {
    jobIds(ids, "unsubscribe()");
    if (this._closed) return;
    const dropped = ids.filter((id) => this._jobs.delete(id));
    if (!dropped.length) return;
    if (this.transport === "websocket") this._wsSend({ op: Op.UNSUBSCRIBE, job_ids: dropped });
    else if (this.transport === "sse") this._restart(); // the job set is in the stream's URL
  }

  /** Be told (onNewJob) about jobs created anywhere; subscribe to those you want to watch. */
  subscribeAll() {
    if (this._all || this._closed) return;
    this._all = true;
    this._changed([], true);
  }

  /** No longer be told about new jobs (the jobs subscribed stay). */
  unsubscribeAll() {
    if (!this._all || this._closed) return;
    this._all = false;
    if (this.transport === "websocket") this._wsSend({ op: Op.UNSUBSCRIBE_ALL });
    else if (this.transport === "sse") this._restart();
  }

  /** The last seq delivered for a job (0 if none). */
  lastSeq(jobId) {
    const job = this._jobs.get(jobId);
    return job ? job.last : 0;
  }

  /** Stop for good: every connection is closed, an in-flight poll aborted, every timer
   * cleared, and no callback is called again except onStatus's "closed". Nothing is left to
   * keep a Node process running. Calling it again does nothing. */
  close() {
    if (this._closed) return;
    this._closed = true;
    clearTimeout(this._upgradeTimer);
    this._upgradeTimer = null;
    for (const timer of this._lostTimers) clearTimeout(timer);
    this._lostTimers.clear();
    if (this._probeDone) this._probeDone(false);
    this._teardown();
    this.status = "closed";
    this.onStatus({ status: "closed", transport: this.transport });
  }

  // -- delivery ------------------------------------------------------------------------

  _deliver(event) {
    if (this._closed || !event) return;
    const job = this._jobs.get(event.job_id);
    if (!job) return; // unsubscribed meanwhile
    if (event.epoch && job.epoch && event.epoch !== job.epoch) this._reset(event.job_id, event.epoch);
    if (event.seq <= job.last) return; // already delivered (replay overlap)
    job.last = event.seq;
    job.lostSince = null;
    if (event.epoch) job.epoch = event.epoch;
    if (event.final) job.final = true;
    const { type, ...clean } = event;
    this.onEvent(clean);
  }

  _error(message) {
    if (this._closed) return;
    const { type, ...error } = message;
    this.onError(error);
  }

  /** A job this client has seen events of, now "not found": its record was lost (Redis
   * restarted without persistence) and the worker's next event recreates it. Retry for a
   * minute before believing it is gone. */
  _lostForNow(error) {
    const job = error.code === "job_not_found" && this._jobs.get(error.job_id);
    if (!job || !job.epoch) return false;
    job.lostSince = job.lostSince || Date.now();
    return Date.now() - job.lostSince < LOST_JOB_PATIENCE_MS;
  }

  _retryLost(jobId) {
    const timer = setTimeout(() => {
      this._lostTimers.delete(timer);
      if (this._closed || !this._jobs.has(jobId)) return;
      if (this.transport === "websocket") this._wsSubscribe([jobId]);
    }, LOST_JOB_RETRY_MS);
    this._lostTimers.add(timer);
  }

  /** The job's history began again under `epoch`: its seqs count from 0 once more. */
  _reset(jobId, epoch) {
    const job = this._jobs.get(jobId);
    if (this._closed || !job || job.epoch === epoch) return;
    job.last = 0;
    job.final = false;
    job.epoch = epoch;
    this.onReset(jobId);
  }

  /** `info` is what announced the job: its event or listing entry (`parent` says it is a
   * group's child). */
  _announce(jobId, info = {}) {
    if (this._closed) return;
    if (this._all && !this._jobs.has(jobId) && !this._known.has(jobId)) {
      this._known.add(jobId);
      this.onNewJob(jobId, info);
    }
  }

  _allSync() {
    if (!this._closed) this.onAllSync();
  }

  _changed(added, all = false) {
    if (this.transport === "websocket") {
      if (added.length) this._wsSubscribe(added);
      if (all) this._wsSend({ op: Op.SUBSCRIBE_ALL });
    } else if (this.transport === "sse") {
      this._restart();
    } else if (this.transport === "polling") {
      this._schedulePoll(0);
    }
  }

  _setStatus(status) {
    if (this._closed) return; // "closed" is the last word (close() says it)
    if (status === this.status && this._shownTransport === this.transport) return;
    this.status = status;
    this._shownTransport = this.transport;
    this.onStatus({ status, transport: this.transport });
  }

  // -- connection management -------------------------------------------------------------

  _connect(quietly = false) {
    if (this._closed) return;
    const attempt = ++this._attempt;
    this.transport = this.transports[this._level];
    if (!quietly) this._setStatus(this._everOpened ? "reconnecting" : "connecting");
    this._refreshToken().then(() => {
      // Closed, or superseded while the token was fetched (two subscribe() calls in one
      // tick restart an SSE stream twice): open nothing, or one stream would be orphaned.
      if (this._closed || attempt !== this._attempt) return;
      if (this.transport === "websocket") this._openWebSocket();
      else if (this.transport === "sse") this._openEventSource();
      else this._schedulePoll(0);
    });
  }

  /** A token function is asked again before each connection (tokens expire). */
  async _refreshToken() {
    if (typeof this.token !== "function") return;
    try {
      this._token = await this.token();
    } catch (e) {
      if (!this._closed) this.onError({ code: "unauthenticated", message: `token function failed: ${e}` });
    }
  }

  _withToken(url) {
    if (!this._token) return url;
    return url + (url.includes("?") ? "&" : "?") + `token=${encodeURIComponent(this._token)}`;
  }

  _wsUrl() {
    return this.baseUrl.replace(/^http/, "ws") + "/ws";
  }

  /** A transport reached the server (`reached`), or has nothing to ask it yet. */
  _opened(reached = true) {
    if (this._closed) return;
    this._failures = 0;
    if (reached) {
      this._everOpened = true;
      this._toldUnreachable = false;
    }
    this._setStatus("live");
    this._scheduleUpgrade();
  }

  /** After a fallback, now and then check whether a better transport works again. */
  _scheduleUpgrade() {
    if (this._closed || this._upgradeTimer || this._level === 0 || !this.upgradeInterval) return;
    this._upgradeTimer = setTimeout(() => {
      this._upgradeTimer = null;
      this._probe(this.transports[0]).then((ok) => {
        if (this._closed) return;
        if (!ok) {
          this._scheduleUpgrade();
          return;
        }
        // Switch over; every job resumes from its last seq, so nothing is lost.
        this._teardown();
        this._level = 0;
        this._failures = 0;
        this._connect(true);
      });
    }, this.upgradeInterval);
  }

  /** Can `transport` be opened right now? (Opens and closes a throwaway connection.) */
  _probe(transport) {
    return new Promise((resolve) => {
      let conn;
      const done = (ok) => {
        this._probeDone = null;
        if (conn) letGo(conn);
        resolve(ok);
      };
      try {
        if (transport === "websocket") conn = new this._WebSocket(this._wsUrl());
        else if (transport === "sse") conn = new this._EventSource(this._withToken(`${this.baseUrl}/api/v1/events`));
        else return resolve(true);
      } catch (e) {
        return resolve(false);
      }
      this._probeDone = done;
      conn.onopen = () => done(true);
      conn.onerror = conn.onclose = () => done(false);
    });
  }

  /** The connection dropped or could not be opened: retry with backoff, or fall back.
   * `cause` says what failed, where the runtime tells (Node does; browsers do not). */
  _lost(neverOpened, cause = "", { force = false } = {}) {
    this._teardown({ force });
    if (this._closed) return;
    if (neverOpened) this._failures += 1;
    const limit = this.failuresBeforeFallback * (this._everOpened ? 3 : 1);
    if (this._failures >= limit && this._level < this.transports.length - 1) {
      this._level += 1;
      this._failures = 0;
      this._connect();
      return;
    }
    this._setStatus("reconnecting");
    this._checkReachable(cause);
    if (this._closed) return; // onError closed it
    // A refusal for load counts toward the delay, not toward a fallback: the next
    // transport would be refused the same way.
    const delay = backoff(this._failures + this._refusals, this.backoffMin, this.backoffMax);
    this._timer = setTimeout(() => this._connect(), delay);
  }

  /** Nothing has ever opened, and the last transport has failed as often as the others:
   * say so once, with what usually causes it. The client goes on trying until close(). */
  _checkReachable(cause) {
    if (this._everOpened || this._toldUnreachable) return;
    if (this._level < this.transports.length - 1 || this._failures < this.failuresBeforeFallback) return;
    this._toldUnreachable = true;
    const tried = this.transports.join(", then ");
    this.onError({
      code: "unreachable",
      message:
        `cannot reach the jobwire server at ${this.baseUrl} (${tried}; ` +
        `${this.failuresBeforeFallback} failed ${this.failuresBeforeFallback === 1 ? "try" : "tries"} each` +
        `${cause ? `; last: ${this.transport}: ${cause}` : ""}). Is the server running, and is baseUrl right? ` +
        "A page on another origin also needs that origin in the server's JOBWIRE_ALLOWED_ORIGINS " +
        "(websocket Origin check and CORS). Still trying until close().",
    });
  }

  /** Reopen with the current job set (SSE carries it in the URL). */
  _restart() {
    this._teardown();
    this._connect(true);
  }

  _teardown({ force = false } = {}) {
    this._attempt += 1;
    clearTimeout(this._timer);
    clearTimeout(this._watchdog);
    clearTimeout(this._openTimer);
    this._timer = this._watchdog = this._openTimer = null;
    this._polling = null;
    this._pollAgain = false;
    const conn = this._conn;
    this._conn = null;
    if (conn) letGo(conn, { force });
  }

  _pending() {
    const ids = [];
    const since = {};
    for (const [id, job] of this._jobs) {
      if (!job.final) {
        ids.push(id);
        since[id] = job.last;
      }
    }
    return { ids, since };
  }

  // -- WebSocket -------------------------------------------------------------------------

  _openWebSocket() {
    let ws;
    let opened = false;
    let cause = "";
    try {
      ws = new this._WebSocket(this._wsUrl());
    } catch (e) {
      this._lost(true, describe(e));
      return;
    }
    this._conn = ws;
    this._giveUpOpening(ws, "websocket");
    ws.onopen = () => {
      opened = true;
      clearTimeout(this._openTimer);
      this._opened();
      // Browsers cannot set headers on a websocket: the token goes in the first message.
      if (this._token) ws.send(JSON.stringify({ op: Op.AUTH, token: this._token }));
      const { ids } = this._pending();
      if (ids.length) this._wsSubscribe(ids);
      if (this._all) this._wsSend({ op: Op.SUBSCRIBE_ALL });
    };
    ws.onmessage = (msg) => {
      const data = parse(msg.data);
      if (!data || this._conn !== ws) return;
      this._refusals = 0; // served, not just accepted
      this._armWatchdog(data.heartbeat);
      if (data.type === Msg.EVENT && data.stream === "all") this._announce(data.job_id, data);
      else if (data.type === Msg.EVENT) this._deliver(data);
      else if (data.type === Msg.RESET) this._reset(data.job_id, data.epoch);
      else if (data.type === Msg.SUBSCRIBED_ALL || data.type === Msg.RESYNC) this._allSync();
      else if (data.type === Msg.ERROR && this._lostForNow(data)) this._retryLost(data.job_id);
      else if (data.type === Msg.ERROR) this._error(data);
    };
    ws.onerror = (e) => {
      cause = (e && e.message) || cause; // Node's `ws` says why; a browser does not
    };
    ws.onclose = (e) => {
      // Too many connections (or the server is short of Redis): later, with a longer wait
      // each time. (A refusal before the upgrade, HTTP 429, looks like any failed open to
      // a browser.)
      if (e.code === Close.TRY_AGAIN_LATER) this._refusals += 1;
      if (e.code === Close.UNAUTHENTICATED || e.code === Close.FORBIDDEN) {
        this.onError({ code: e.code === Close.FORBIDDEN ? "forbidden" : "unauthenticated", message: e.reason });
        // A fixed token will not become valid: stop. A token function gets another try.
        if (typeof this.token !== "function") {
          this.close();
          return;
        }
      }
      this._lost(!opened, cause || `closed ${e.code}${e.reason ? ` (${e.reason})` : ""}`);
    };
  }

  /** A connection that neither opens nor fails (a proxy that holds the upgrade, a server
   * that accepts the socket and says nothing) counts as a failed open after
   * `connectTimeout` ms, so the client moves on instead of "connecting" forever. */
  _giveUpOpening(conn, what) {
    clearTimeout(this._openTimer);
    if (!this.connectTimeout) return;
    this._openTimer = setTimeout(() => {
      if (this._conn === conn) this._lost(true, `${what} did not open within ${this.connectTimeout} ms`);
    }, this.connectTimeout);
  }

  _wsSubscribe(ids) {
    const since = {};
    const epochs = {};
    for (const id of ids) {
      since[id] = this.lastSeq(id);
      const job = this._jobs.get(id);
      if (job && job.epoch) epochs[id] = job.epoch;
    }
    this._wsSend({ op: Op.SUBSCRIBE, job_ids: ids, since, epochs });
  }

  _wsSend(message) {
    const ws = this._conn;
    if (this.transport === "websocket" && ws && ws.readyState === OPEN) {
      ws.send(JSON.stringify(message));
    } // otherwise onopen sends the whole state
  }

  /** No frame for 2.5 heartbeats means a dead link the runtime has not noticed: reconnect. */
  _armWatchdog(heartbeat) {
    if (heartbeat) this._heartbeat = heartbeat * 1000;
    if (!this._heartbeat) return;
    clearTimeout(this._watchdog);
    this._watchdog = setTimeout(
      () => this._lost(false, "no frame for 2.5 heartbeats", { force: true }),
      this._heartbeat * 2.5,
    );
  }

  // -- Server-Sent Events ------------------------------------------------------------------

  _openEventSource() {
    const { ids, since } = this._pending();
    if (!ids.length && !this._all) {
      // Nothing to follow: hold no stream until subscribe() or subscribeAll() (_changed).
      this._opened(false);
      return;
    }
    const params = new URLSearchParams();
    for (const id of ids) {
      params.append("job", id);
      params.append("since", `${id}:${since[id]}`);
      const epoch = this._jobs.get(id).epoch;
      if (epoch) params.append("epoch", `${id}:${epoch}`);
    }
    if (this._all) params.set("all", "1");
    let opened = false;
    if (this._token) params.set("token", this._token);
    let es;
    try {
      es = new this._EventSource(`${this.baseUrl}/api/v1/events?${params}`);
    } catch (e) {
      this._lost(true, describe(e));
      return;
    }
    this._conn = es;
    this._giveUpOpening(es, "event stream");
    es.onopen = () => {
      opened = true;
      clearTimeout(this._openTimer);
      this._opened();
      if (this._all) this._allSync(); // the server subscribed before it answered
    };
    es.onmessage = (msg) => this._deliver(parse(msg.data));
    es.addEventListener("all", (msg) => {
      if (this._conn !== es) return;
      const event = parse(msg.data);
      if (event) this._announce(event.job_id, event);
    });
    es.addEventListener("control", (msg) => {
      if (this._conn !== es) return; // a stream already let go (its events may still be queued)
      const data = parse(msg.data) || {};
      if (data.type === Msg.ERROR && data.code === "unauthenticated") this._expired(data);
      else if (data.type === Msg.ERROR) this._error(data);
      else if (data.type === Msg.RESET) this._reset(data.job_id, data.epoch);
      else if (data.type === Msg.RESYNC) this._allSync();
      else if (data.type === Msg.END) this._teardown(); // every job ended: do not reconnect
    });
    // EventSource would reconnect to the same URL with stale `since`; resume ourselves.
    es.onerror = (e) => this._lost(!opened, (e && e.message) || "");
  }

  /** The stream's token expired (the server ends it, as a websocket closes 4401): a token
   * function is asked for a new one and every job resumes from its seq at once; a fixed
   * token will not become valid, so the client stops. */
  _expired(error) {
    if (this._closed) return; // told once: a closed client reports nothing more
    this._error(error);
    this._teardown();
    if (typeof this.token !== "function") {
      this.close();
      return;
    }
    this._connect(true);
  }

  // -- polling -----------------------------------------------------------------------------

  _schedulePoll(delay) {
    if (this.transport !== "polling" || this._closed) return;
    if (this._polling) {
      // One poll at a time: a subscribe() meanwhile is asked about as soon as it ends.
      if (delay === 0) this._pollAgain = true;
      return;
    }
    clearTimeout(this._timer);
    this._timer = setTimeout(() => this._poll(), delay);
  }

  async _poll() {
    this._timer = null;
    const controller = new AbortController();
    const handle = { close: () => controller.abort() }; // what _teardown closes
    this._conn = this._polling = handle;
    const current = () => !this._closed && this._conn === handle;
    const fetchJson = (path, init) => this._fetchJson(path, { ...init, signal: controller.signal });
    let asked = false;
    try {
      const { ids } = this._pending();
      if (ids.length) {
        asked = true;
        const resp = await fetchJson("/api/v1/jobs/batch-status", {
          method: "POST",
          headers: { "content-type": "application/json" },
          body: JSON.stringify({ job_ids: ids.slice(0, 1000) }),
        });
        if (!current()) return;
        const moved = ids.filter((id) => {
          const s = resp.jobs[id];
          const job = this._jobs.get(id);
          if (!s || !job) return false;
          const reset = s.epoch && job.epoch && s.epoch !== job.epoch; // history began again
          return reset || s.seq > job.last;
        });
        for (const id of moved) {
          const job = this._jobs.get(id);
          if (!job) continue; // unsubscribed meanwhile
          const hist = await fetchJson(
            `/api/v1/jobs/${encodeURIComponent(id)}/history?since=${job.last}` +
              (job.epoch ? `&epoch=${encodeURIComponent(job.epoch)}` : ""),
          );
          if (!current()) return;
          if (hist.reset) this._reset(id, hist.epoch);
          for (const event of hist.events) this._deliver(event);
          if (!current()) return; // onEvent closed the client
        }
      }
      if (this._all) {
        asked = true;
        const listing = await fetchJson("/api/v1/jobs?limit=50");
        if (!current()) return;
        for (const job of listing.jobs.reverse()) this._announce(job.job_id, job);
        if (!current()) return;
      }
      this._opened(asked);
      this._pollEnded(handle, this.pollInterval);
    } catch (e) {
      if (!current()) return; // closed or let go: an abort is no failure
      this._failures += 1;
      if (e.status === 401 && typeof this.token !== "function") {
        // A fixed token will not become valid: stop, as on the other transports.
        this.onError({ code: "unauthenticated", message: e.said || e.message });
        this.close();
        return;
      }
      this._setStatus("reconnecting");
      this._checkReachable(describe(e));
      if (!current()) return;
      if (e.status === 401) await this._refreshToken(); // expired: a token function has a new one
      if (!current()) return;
      const delay = backoff(this._failures, this.pollInterval, this.backoffMax);
      this._pollAgain = false;
      this._pollEnded(handle, notBefore(e.retryAfter, delay));
    }
  }

  _pollEnded(handle, delay) {
    if (this._polling === handle) this._polling = null;
    this._schedulePoll(this._pollAgain ? 0 : delay);
    this._pollAgain = false;
  }

  async _fetchJson(path, init = {}) {
    const headers = { ...(init.headers || {}) };
    if (this._token) headers.authorization = `Bearer ${this._token}`;
    const resp = await this._fetch(this.baseUrl + path, { ...init, headers });
    if (!resp.ok) {
      const body = await resp.json().catch(() => null);
      const said = body && body.error && body.error.message;
      const error = new Error(`HTTP ${resp.status} on ${path}${said ? `: ${said}` : ""}`);
      error.status = resp.status;
      error.said = said; // the server's own words, for onError
      if (RETRYABLE_STATUS.has(resp.status)) error.retryAfter = resp.headers.get("retry-after");
      throw error;
    }
    return resp.json();
  }
}
