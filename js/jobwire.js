// jobwire.js — a small browser client for jobwire. Plain ES module, no build step.
//
//   import { JobwireClient } from "/jobwire.js";
//   const client = new JobwireClient({
//     onEvent: (event) => render(event),          // events in seq order per job, each once
//     onStatus: ({ status, transport }) => show(status, transport),
//   });
//   client.subscribe(["4c7f…"]);
//
// Transports, in order: WebSocket, then Server-Sent Events, then polling. The client moves
// down when a transport cannot be opened `failuresBeforeFallback` times in a row, and says
// which one it is on through onStatus. On every reconnect it resumes each job from the last
// seq it delivered, so across drops, restarts and fallbacks no transition is missed and no
// event is delivered twice. When the client falls behind, the server coalesces progress:
// an event with `coalesced: n` stands for itself and the n progress events before it, which
// were never sent (its progress is the newest).

const TRANSPORTS = ["websocket", "sse", "polling"];

// The protocol's names, mirrored from jobwire/protocol.py (the one contract module; change
// them there first). Only what this client reads is here.
const Op = { SUBSCRIBE: "subscribe", UNSUBSCRIBE: "unsubscribe", SUBSCRIBE_ALL: "subscribe_all", AUTH: "auth" };
const Msg = {
  EVENT: "event",
  ERROR: "error",
  END: "end",
  RESET: "reset",
  SUBSCRIBED_ALL: "subscribed_all",
  RESYNC: "resync",
};
const Close = { TRY_AGAIN_LATER: 1013, UNAUTHENTICATED: 4401, FORBIDDEN: 4403 };

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

/** Statuses that mean "later" (too many connections, overloaded), not "no". */
export const RETRYABLE_STATUS = new Set([408, 429, 502, 503, 504]);

export class JobwireClient {
  /**
   * @param {object} [options]
   * @param {string} [options.baseUrl]  the jobwire server (default: this page's origin)
   * @param {string|(() => string|Promise<string>)} [options.token]  a bearer token, or a
   *        function that fetches one: it is called again on every reconnect, so a token
   *        that expired is replaced (at expiry the server closes a websocket 4401, ends an
   *        SSE stream with an `unauthenticated` error and answers polls 401; the client
   *        then asks the function again and resumes every job from its seq)
   * @param {string[]} [options.transports]  allowed transports, in order of preference
   * @param {(event: object) => void} [options.onEvent]  a job event, ordered and deduplicated
   * @param {(s: {status: string, transport: string}) => void} [options.onStatus]
   *        status: "connecting" | "live" | "reconnecting" | "closed"
   * @param {(jobId: string, info: object) => void} [options.onNewJob]  with subscribeAll(): a
   *   job appeared (`info`: its event or listing entry; `info.parent` marks a group's child)
   * @param {() => void} [options.onAllSync]  with subscribeAll(): the all-jobs stream is live
   *        (again); jobs created before that were not announced, so list them now (the
   *        dashboard reloads its listing). Called on every (re)subscription and resync.
   * @param {(error: object) => void} [options.onError]  {code, message, job_id?} from the server
   * @param {(jobId: string) => void} [options.onReset]  the job's history was lost and began
   *        again (Redis restarted without persistence): forget its events; they come again
   * @param {number} [options.pollInterval]  ms between polls (default 1000)
   * @param {number} [options.failuresBeforeFallback]  failed opens before moving on (default 3)
   * @param {number} [options.upgradeInterval]  ms between attempts to climb back to a better
   *        transport after a fallback (default 30000; 0 disables)
   */
  constructor(options = {}) {
    this.baseUrl = (options.baseUrl || window.location.origin).replace(/\/$/, "");
    this.transports = (options.transports || TRANSPORTS).filter((t) => TRANSPORTS.includes(t));
    this.onEvent = options.onEvent || (() => {});
    this.onStatus = options.onStatus || (() => {});
    this.onNewJob = options.onNewJob || (() => {});
    this.onAllSync = options.onAllSync || (() => {});
    this.onError = options.onError || (() => {});
    this.onReset = options.onReset || (() => {});
    this.pollInterval = options.pollInterval || 1000;
    this.failuresBeforeFallback = options.failuresBeforeFallback || 3;
    this.upgradeInterval = options.upgradeInterval ?? 30000;
    this.token = options.token;
    this._token = typeof this.token === "string" ? this.token : null;
    this.backoffMin = 250;
    this.backoffMax = 10000;

    this._jobs = new Map(); // jobId -> {last: seq delivered, final: bool}
    this._all = false;
    this._known = new Set(); // jobs announced through onNewJob
    this._level = 0; // index into this.transports
    this._failures = 0; // consecutive failed opens on the current transport
    this._refusals = 0; // sockets closed "try again later" (1013) before anything arrived
    this._everOpened = false;
    this._conn = null; // the current transport's handle
    this._timer = null;
    this._closed = false;
    this.status = "connecting";
    this.transport = this.transports[0];
    this._connect();
  }

  /** Watch jobs; `since` maps job id to the last seq already seen (default: all history). */
  subscribe(jobIds, since = {}) {
    const added = [];
    for (const id of jobIds) {
      if (!this._jobs.has(id)) {
        this._jobs.set(id, { last: since[id] || 0, final: false, epoch: null });
        added.push(id);
      }
    }
    if (added.length) this._changed(added);
  }

  unsubscribe(jobIds) {
    for (const id of jobIds) this._jobs.delete(id);
    if (this.transport === "websocket") this._wsSend({ op: Op.UNSUBSCRIBE, job_ids: jobIds });
    else if (this.transport === "sse") this._restart();
  }

  /** Be told (onNewJob) about jobs created anywhere; subscribe to those you want to watch. */
  subscribeAll() {
    if (this._all) return;
    this._all = true;
    this._changed([], true);
  }

  /** The last seq delivered for a job (0 if none). */
  lastSeq(jobId) {
    const job = this._jobs.get(jobId);
    return job ? job.last : 0;
  }

  close() {
    this._closed = true;
    clearTimeout(this._upgradeTimer);
    this._teardown();
    this._setStatus("closed");
  }

  // -- delivery ------------------------------------------------------------------------

  _deliver(event) {
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

  /** A job this client has seen events of, now "not found": its record was lost (Redis
   * restarted without persistence) and the worker's next event recreates it. Retry for a
   * minute before believing it is gone. */
  _lostForNow(error) {
    const job = error.code === "job_not_found" && this._jobs.get(error.job_id);
    if (!job || !job.epoch) return false;
    job.lostSince = job.lostSince || Date.now();
    return Date.now() - job.lostSince < 60000;
  }

  _retryLost(jobId) {
    setTimeout(() => {
      if (this._closed || !this._jobs.has(jobId)) return;
      if (this.transport === "websocket") this._wsSubscribe([jobId]);
    }, 1000);
  }

  /** The job's history began again under `epoch`: its seqs count from 0 once more. */
  _reset(jobId, epoch) {
    const job = this._jobs.get(jobId);
    if (!job || job.epoch === epoch) return;
    job.last = 0;
    job.final = false;
    job.epoch = epoch;
    this.onReset(jobId);
  }

  /** `info` is what announced the job: its event or listing entry (`parent` says it is a
   * group's child). */
  _announce(jobId, info = {}) {
    if (this._all && !this._jobs.has(jobId) && !this._known.has(jobId)) {
      this._known.add(jobId);
      this.onNewJob(jobId, info);
    }
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
    if (status === this.status && this._shownTransport === this.transport) return;
    this.status = status;
    this._shownTransport = this.transport;
    this.onStatus({ status, transport: this.transport });
  }

  // -- connection management -------------------------------------------------------------

  _connect(quietly = false) {
    if (this._closed) return;
    this.transport = this.transports[this._level];
    if (!quietly) this._setStatus(this._everOpened ? "reconnecting" : "connecting");
    this._refreshToken().then(() => {
      if (this._closed) return;
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
      this.onError({ code: "unauthenticated", message: `token function failed: ${e}` });
    }
  }

  _withToken(url) {
    if (!this._token) return url;
    return url + (url.includes("?") ? "&" : "?") + `token=${encodeURIComponent(this._token)}`;
  }

  _opened() {
    this._failures = 0;
    this._everOpened = true;
    this._setStatus("live");
    this._scheduleUpgrade();
  }

  /** After a fallback, now and then check whether a better transport works again. */
  _scheduleUpgrade() {
    if (this._upgradeTimer || this._level === 0 || !this.upgradeInterval) return;
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
        if (conn) conn.onopen = conn.onerror = conn.onclose = null;
        try {
          conn && conn.close();
        } catch (e) {
          /* ignore */
        }
        resolve(ok);
      };
      try {
        if (transport === "websocket") {
          conn = new WebSocket(this.baseUrl.replace(/^http/, "ws") + "/ws");
        } else if (transport === "sse") {
          conn = new EventSource(this._withToken(`${this.baseUrl}/api/v1/events`));
        } else {
          resolve(true);
          return;
        }
      } catch (e) {
        resolve(false);
        return;
      }
      conn.onopen = () => done(true);
      conn.onerror = conn.onclose = () => done(false);
    });
  }

  /** The connection dropped or could not be opened: retry with backoff, or fall back. */
  _lost(neverOpened) {
    this._teardown();
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
    // A refusal for load counts toward the delay, not toward a fallback: the next
    // transport would be refused the same way.
    const delay = backoff(this._failures + this._refusals, this.backoffMin, this.backoffMax);
    this._timer = setTimeout(() => this._connect(), delay);
  }

  /** Reopen with the current job set (SSE carries it in the URL). */
  _restart() {
    this._teardown();
    this._connect(true);
  }

  _teardown() {
    clearTimeout(this._timer);
    clearTimeout(this._watchdog);
    this._timer = null;
    const conn = this._conn;
    this._conn = null;
    if (conn) {
      conn.onopen = conn.onmessage = conn.onerror = conn.onclose = null;
      try {
        conn.close();
      } catch (e) {
        /* already closed */
      }
    }
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
    try {
      ws = new WebSocket(this.baseUrl.replace(/^http/, "ws") + "/ws");
    } catch (e) {
      this._lost(true);
      return;
    }
    this._conn = ws;
    ws.onopen = () => {
      opened = true;
      this._opened();
      // Browsers cannot set headers on a websocket: the token goes in the first message.
      if (this._token) ws.send(JSON.stringify({ op: Op.AUTH, token: this._token }));
      const { ids } = this._pending();
      if (ids.length) this._wsSubscribe(ids);
      if (this._all) this._wsSend({ op: Op.SUBSCRIBE_ALL });
    };
    ws.onmessage = (msg) => {
      let data;
      try {
        data = JSON.parse(msg.data);
      } catch (e) {
        return;
      }
      this._refusals = 0; // served, not just accepted
      this._armWatchdog(data.heartbeat);
      if (data.type === Msg.EVENT && data.stream === "all") this._announce(data.job_id, data);
      else if (data.type === Msg.EVENT) this._deliver(data);
      else if (data.type === Msg.RESET) this._reset(data.job_id, data.epoch);
      else if (data.type === Msg.SUBSCRIBED_ALL || data.type === Msg.RESYNC) this.onAllSync();
      else if (data.type === Msg.ERROR && this._lostForNow(data)) this._retryLost(data.job_id);
      else if (data.type === Msg.ERROR) this.onError(data);
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
      this._lost(!opened);
    };
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
    if (this.transport === "websocket" && ws && ws.readyState === WebSocket.OPEN) {
      ws.send(JSON.stringify(message));
    } // otherwise onopen sends the whole state
  }

  /** No frame for 2.5 heartbeats means a dead link the browser has not noticed: reconnect. */
  _armWatchdog(heartbeat) {
    if (heartbeat) this._heartbeat = heartbeat * 1000;
    if (!this._heartbeat) return;
    clearTimeout(this._watchdog);
    this._watchdog = setTimeout(() => this._lost(false), this._heartbeat * 2.5);
  }

  // -- Server-Sent Events ------------------------------------------------------------------

  _openEventSource() {
    const { ids, since } = this._pending();
    if (!ids.length && !this._all) {
      // Nothing to follow: hold no stream until subscribe() or subscribeAll() (_changed).
      this._opened();
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
    const es = new EventSource(`${this.baseUrl}/api/v1/events?${params}`);
    this._conn = es;
    es.onopen = () => {
      opened = true;
      this._opened();
      if (this._all) this.onAllSync(); // the server subscribed before it answered
    };
    es.onmessage = (msg) => this._deliver(JSON.parse(msg.data));
    es.addEventListener("all", (msg) => {
      if (this._conn !== es) return;
      const event = JSON.parse(msg.data);
      this._announce(event.job_id, event);
    });
    es.addEventListener("control", (msg) => {
      if (this._conn !== es) return; // a stream already let go (its events may still be queued)
      const data = JSON.parse(msg.data);
      if (data.type === Msg.ERROR && data.code === "unauthenticated") this._expired(data);
      else if (data.type === Msg.ERROR) this.onError(data);
      else if (data.type === Msg.RESET) this._reset(data.job_id, data.epoch);
      else if (data.type === Msg.RESYNC) this.onAllSync();
      else if (data.type === Msg.END) this._teardown(); // every job ended: do not reconnect
    });
    // EventSource would reconnect to the same URL with stale `since`; resume ourselves.
    es.onerror = () => this._lost(!opened);
  }

  /** The stream's token expired (the server ends it, as a websocket closes 4401): a token
   * function is asked for a new one and every job resumes from its seq at once; a fixed
   * token will not become valid, so the client stops. */
  _expired(error) {
    if (this._closed) return; // told once: a closed client reports nothing more
    this.onError(error);
    this._teardown();
    if (typeof this.token !== "function") {
      this.close();
      return;
    }
    this._connect(true);
  }

  // -- polling -----------------------------------------------------------------------------

  _schedulePoll(delay) {
    clearTimeout(this._timer);
    if (this.transport !== "polling" || this._closed) return;
    this._timer = setTimeout(() => this._poll(), delay);
  }

  async _poll() {
    try {
      const { ids } = this._pending();
      if (ids.length) {
        const resp = await this._fetchJson("/api/v1/jobs/batch-status", {
          method: "POST",
          headers: { "content-type": "application/json" },
          body: JSON.stringify({ job_ids: ids.slice(0, 1000) }),
        });
        const moved = ids.filter((id) => {
          const s = resp.jobs[id];
          const job = this._jobs.get(id);
          const reset = s && s.epoch && job.epoch && s.epoch !== job.epoch; // history began again
          return s && (reset || s.seq > this.lastSeq(id));
        });
        for (const id of moved) {
          const epoch = this._jobs.get(id).epoch;
          const hist = await this._fetchJson(
            `/api/v1/jobs/${encodeURIComponent(id)}/history?since=${this.lastSeq(id)}` +
              (epoch ? `&epoch=${epoch}` : ""),
          );
          if (hist.reset) this._reset(id, hist.epoch);
          for (const event of hist.events) this._deliver(event);
        }
      }
      if (this._all) {
        const listing = await this._fetchJson("/api/v1/jobs?limit=50");
        for (const job of listing.jobs.reverse()) this._announce(job.job_id, job);
      }
      this._opened();
      this._schedulePoll(this.pollInterval);
    } catch (e) {
      this._failures += 1;
      this._setStatus("reconnecting");
      if (e.status === 401) await this._refreshToken(); // expired: a token function has a new one
      const delay = backoff(this._failures, this.pollInterval, this.backoffMax);
      this._schedulePoll(notBefore(e.retryAfter, delay));
    }
  }

  async _fetchJson(path, init = {}) {
    const headers = { ...(init.headers || {}) };
    if (this._token) headers.authorization = `Bearer ${this._token}`;
    const resp = await fetch(this.baseUrl + path, { ...init, headers });
    if (!resp.ok) {
      const error = new Error(`${path}: HTTP ${resp.status}`);
      error.status = resp.status;
      if (RETRYABLE_STATUS.has(resp.status)) error.retryAfter = resp.headers.get("retry-after");
      throw error;
    }
    return resp.json();
  }
}
