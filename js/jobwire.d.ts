// Types for jobwire.js, written by hand: the client stays plain JavaScript with no build
// step. It needs neither the DOM nor Node's types: the injectables (WebSocket, EventSource,
// fetch) are described by what the client uses of them.
//
// The contract's names (Op, Msg, Close, the error codes) mirror jobwire/protocol.py;
// tests/test_js_package.py compiles a check of these types against it.

// -- The contract ------------------------------------------------------------------------

/** What a client sends on `/ws`: `{"op": <Op>, ...}`. */
export declare const Op: Readonly<{
  SUBSCRIBE: "subscribe";
  UNSUBSCRIBE: "unsubscribe";
  SUBSCRIBE_ALL: "subscribe_all";
  UNSUBSCRIBE_ALL: "unsubscribe_all";
  PING: "ping";
  AUTH: "auth";
}>;
export type Op = (typeof Op)[keyof typeof Op];

/** The `type` of what the server sends, on `/ws` frames and SSE `event: control` data. */
export declare const Msg: Readonly<{
  WELCOME: "welcome";
  EVENT: "event";
  SUBSCRIBED: "subscribed";
  UNSUBSCRIBED: "unsubscribed";
  SUBSCRIBED_ALL: "subscribed_all";
  UNSUBSCRIBED_ALL: "unsubscribed_all";
  GAP: "gap";
  RESET: "reset";
  RESYNC: "resync";
  HEARTBEAT: "heartbeat";
  PONG: "pong";
  ERROR: "error";
  END: "end";
}>;
export type Msg = (typeof Msg)[keyof typeof Msg];

/** Websocket close codes (4000-4999 are jobwire's own). */
export declare const Close: Readonly<{
  /** The job's final event was sent. */
  NORMAL: 1000;
  /** The server is shutting down: reconnect (to another process) and resume. */
  GOING_AWAY: 1001;
  /** Refused by policy (e.g. the transport is turned off). */
  POLICY: 1008;
  /** A frame over the size limit. */
  TOO_BIG: 1009;
  /** A fault on the server's side (logged there). */
  INTERNAL_ERROR: 1011;
  /** Redis unreachable, or too many connections: back off and resume. */
  TRY_AGAIN_LATER: 1013;
  /** Malformed job id or since. */
  BAD_REQUEST: 4400;
  /** No token, a bad one, or it expired: get a new token first. */
  UNAUTHENTICATED: 4401;
  /** The token does not allow this (or the Origin is not allowed). */
  FORBIDDEN: 4403;
  /** No such job (or not yours). */
  NOT_FOUND: 4404;
}>;
export type Close = (typeof Close)[keyof typeof Close];

/** Close codes after which reconnecting cannot help. */
export declare const TERMINAL_CLOSE_CODES: ReadonlySet<number>;

/** States after which a job never changes again. */
export declare const FINAL_STATES: ReadonlySet<string>;

/** The message of the `unauthenticated` error that ends a stream at its token's `exp`. */
export declare const TOKEN_EXPIRED: "token expired";

/** The transports, best first. */
export declare const TRANSPORTS: readonly Transport[];

/** HTTP statuses that mean "later" (too many connections, overloaded), not "no". */
export declare const RETRYABLE_STATUS: ReadonlySet<number>;

/** Exponential backoff with jitter: the delay in ms before try `attempt` (from 0), between
 * 0.5 and 1.5 × min(max, min × 2^attempt). */
export declare function backoff(attempt: number, min: number, max: number): number;

/** `delay` (ms), or 1-1.5 × the server's `Retry-After` (seconds, as the header gives it)
 * if that is later. */
export declare function notBefore(retryAfter: string | number | null | undefined, delay: number): number;

// -- Events --------------------------------------------------------------------------------

/** Celery's states and the ones jobwire adds; a task's own custom states are any string. */
export type FinalState = "SUCCESS" | "FAILURE" | "REVOKED";
export type JobState =
  | "PENDING"
  | "STARTED"
  | "RETRY"
  | FinalState
  | "UNKNOWN"
  | "RUNNING"
  | "CALLBACK"
  | "RATE_LIMITED"
  | (string & {});

/** A custom state's progress: `update_state(meta=…)` or `report(step=, total=, …)`. A
 * group's or chord's is `{done, failed, total, percent}`; a job waiting for quota has
 * `{reason: "rate_limited", limit, retry_at, retry_in}`. */
export interface JobProgress {
  step?: number;
  total?: number;
  /** 0-100, derived once on the worker so every client shows the same number. */
  percent?: number;
  description?: string;
  /** A group's children that ended, and those of them that failed. */
  done?: number;
  failed?: number;
  [key: string]: unknown;
}

/** What a FAILURE, REVOKED or RETRY says went wrong (never a traceback). */
export interface JobErrorDetail {
  type: string;
  message: string;
}

/** A RETRY's schedule. */
export interface RetryInfo {
  attempt: number;
  /** Seconds until it runs again, when Celery said. */
  countdown: number | null;
  /** ISO 8601, when Celery said. */
  eta: string | null;
}

/** A result kept in the result store instead of the event: download it from
 * `GET /api/v1/jobs/{id}/result`. */
export interface StoredResult {
  type: "stored_result";
  storage: string;
  key: string;
  size_bytes: number;
  content_type: string;
  filename?: string;
  sha256: string;
  generated_at: number;
  /** Only on a result offloaded automatically: how Celery encoded it. */
  serializer?: string;
}

/** One job event, as every client receives it (see "The event" in jobwire's README). */
export interface JobEvent {
  job_id: string;
  /** Per job and epoch, 1, 2, 3 … with no gaps (coalesced progress counts in `coalesced`). */
  seq: number;
  /** This incarnation of the job's stream; changes only if its history was lost (then
   * onReset is called and seqs start again at 1). */
  epoch: string;
  state: JobState;
  progress: JobProgress | null;
  /** When the worker produced it (Unix seconds). */
  ts: number;
  /** True for SUCCESS, FAILURE, REVOKED: nothing follows. */
  final: boolean;
  /** Only when this client was behind: this many progress events of the same state, just
   * before this one, were never sent to it. */
  coalesced?: number;
  /** The task's name ("group" or "chord" for an aggregate job). */
  task?: string;
  /** On SUCCESS: the task's return value (a `StoredResult` when it was stored apart). */
  result?: unknown;
  error?: JobErrorDetail;
  retry?: RetryInfo;
  /** The group or chord this job is a child of. */
  parent?: string;
}

/** A job as the listing `GET /api/v1/jobs` gives it. */
export interface JobSummary {
  job_id: string;
  status: JobState;
  seq: number;
  epoch: string | null;
  final: boolean;
  task: string | null;
  created_at: number;
  updated_at: number;
  progress: JobProgress | null;
  parent?: string;
  result?: unknown;
  error?: JobErrorDetail;
  cursor?: number;
}

/** What announced a new job to onNewJob: its event on the all-jobs stream, or its listing
 * entry when polling. */
export type NewJobInfo = (JobEvent & { type?: "event"; stream?: "all" }) | JobSummary;

// -- Errors ----------------------------------------------------------------------------------

/** The error codes a jobwire server answers with (jobwire/protocol.py ERROR_STATUS). */
export type ServerErrorCode =
  | "bad_request"
  | "invalid_json"
  | "invalid_message"
  | "unknown_op"
  | "unauthenticated"
  | "forbidden"
  | "job_not_found"
  | "not_found"
  | "method_not_allowed"
  | "job_finished"
  | "no_result"
  | "result_gone"
  | "payload_too_large"
  | "headers_too_large"
  | "url_too_long"
  | "too_many_ids"
  | "too_many_jobs"
  | "invalid_request"
  | "invalid_job_id"
  | "task_not_allowed"
  | "unsupported_media_type"
  | "rate_limited"
  | "too_many_connections"
  | "internal_error"
  | "unavailable"
  | "redis_unavailable"
  | "broker_unavailable"
  | "transport_disabled";

/** The client's own: no transport could reach the server (see `onError`). */
export type ClientErrorCode = "unreachable";

export type ErrorCode = ServerErrorCode | ClientErrorCode;

/** What onError is given. */
export interface JobwireErrorInfo {
  code: ErrorCode;
  message: string;
  /** Set when the error is about one job (e.g. `job_not_found`). */
  job_id?: string;
}

// -- The client ------------------------------------------------------------------------------

export type Transport = "websocket" | "sse" | "polling";
export type ClientStatus = "connecting" | "live" | "reconnecting" | "closed";

export interface StatusChange {
  status: ClientStatus;
  transport: Transport;
}

/** A bearer token, or a function that fetches one (asked again before every connection). */
export type TokenSource = string | (() => string | Promise<string>);

/** A WebSocket constructor: the browser's, Node 22's, or `ws`'s (`import { WebSocket } from "ws"`). */
export type WebSocketConstructor = new (url: string) => object;
/** An EventSource constructor: the browser's, or e.g. the `eventsource` package's. */
export type EventSourceConstructor = new (url: string) => object;

/** What the client reads of a fetch response. */
export interface FetchResponse {
  readonly ok: boolean;
  readonly status: number;
  readonly headers: { get(name: string): string | null };
  json(): Promise<any>;
}
/** A fetch function: the runtime's (browsers, Node >= 18) or one of yours. It is called
 * with the URL and `{method?, headers, body?, signal}`. */
export type FetchFunction = (url: string, init?: any) => Promise<FetchResponse>;

export interface JobwireOptions {
  /** The jobwire server, `http(s)://host[:port][/prefix]` (default: this page's origin).
   * Required where there is no page (Node): without it the constructor throws a TypeError. */
  baseUrl?: string;
  /** A bearer token, or a function that fetches one: it is called again on every reconnect,
   * so a token that expired is replaced. A fixed token that is refused stops the client
   * (onError, then status "closed"). */
  token?: TokenSource;
  /** Allowed transports, in order of preference (default: websocket, sse, polling). One
   * whose constructor is missing here is left out; none left is a TypeError. */
  transports?: readonly Transport[];
  /** The WebSocket to use (default: globalThis.WebSocket). Node 20 has none: pass `ws`'s. */
  WebSocket?: WebSocketConstructor;
  /** The EventSource to use (default: globalThis.EventSource; Node has none). */
  EventSource?: EventSourceConstructor;
  /** The fetch to use for polling (default: globalThis.fetch). */
  fetch?: FetchFunction;
  /** A job event: per job in seq order, each once. */
  onEvent?: (event: JobEvent) => void;
  /** The connection's status or transport changed. */
  onStatus?: (change: StatusChange) => void;
  /** With subscribeAll(): a job appeared (`info.parent` marks a group's child). */
  onNewJob?: (jobId: string, info: NewJobInfo) => void;
  /** With subscribeAll(): the all-jobs stream is live (again); jobs created before that
   * were not announced, so list them now. Called on every (re)subscription and resync. */
  onAllSync?: () => void;
  /** An error from the server (`{code, message, job_id?}`), a token function that threw
   * (`unauthenticated`), or `unreachable`: nothing has ever opened and the last transport
   * has failed `failuresBeforeFallback` times in a row (told once; the client keeps trying
   * until close()). */
  onError?: (error: JobwireErrorInfo) => void;
  /** The job's history was lost and began again (Redis restarted without persistence):
   * forget its events; they come again. */
  onReset?: (jobId: string) => void;
  /** ms between polls (default 1000). */
  pollInterval?: number;
  /** Failed opens before moving to the next transport (default 3; 9 once one has worked). */
  failuresBeforeFallback?: number;
  /** ms between attempts to climb back to the best transport after a fallback (default
   * 30000; 0 disables). */
  upgradeInterval?: number;
  /** ms a websocket or event stream may take to open before it counts as a failed open
   * (default 10000; 0 waits as long as the browser or `ws` does). */
  connectTimeout?: number;
}

export declare class JobwireClient {
  /** Connects at once (status "connecting", then "live"). Throws a TypeError for a bad
   * option, a missing `baseUrl` outside a page, or no usable transport. */
  constructor(options?: JobwireOptions);

  /** The server, without a trailing slash. */
  readonly baseUrl: string;
  /** The transports this client may use, best first (those that can run here). */
  readonly transports: readonly Transport[];
  /** Where the connection stands; "closed" after close() (or a fixed token refused). */
  readonly status: ClientStatus;
  /** The transport in use (or being tried). */
  readonly transport: Transport;
  readonly token: TokenSource | undefined;
  readonly pollInterval: number;
  readonly failuresBeforeFallback: number;
  readonly upgradeInterval: number;
  readonly connectTimeout: number;

  // The callbacks, read at each call: a component sharing a client may wrap them.
  onEvent: (event: JobEvent) => void;
  onStatus: (change: StatusChange) => void;
  onNewJob: (jobId: string, info: NewJobInfo) => void;
  onAllSync: () => void;
  onError: (error: JobwireErrorInfo) => void;
  onReset: (jobId: string) => void;

  /** Watch jobs; `since` maps a job id to the last seq already seen (default 0: the whole
   * history). A job already watched is left as it is. */
  subscribe(jobIds: readonly string[], since?: Readonly<Record<string, number>>): void;
  /** Stop watching jobs: none of their events is delivered from now on. */
  unsubscribe(jobIds: readonly string[]): void;
  /** Be told (onNewJob) about jobs created anywhere; subscribe to those you want to watch. */
  subscribeAll(): void;
  /** No longer be told about new jobs (the jobs subscribed stay). */
  unsubscribeAll(): void;
  /** The last seq delivered for a job (0 if none). */
  lastSeq(jobId: string): number;
  /** Stop for good: connections closed, an in-flight poll aborted, every timer cleared; no
   * callback runs again after onStatus's "closed". Nothing is left to keep Node running.
   * Idempotent. */
  close(): void;
}
