"""The contract every jobwire component reads: worker (`jobwire.tasks`), server
(`jobwire.server`) and clients (`jobwire.client`; `js/jobwire.js`, the npm package, mirrors it).

Everything two sides must agree on lives here and nowhere else: job states, the event
format, the messages and close codes of the client protocol, error codes and their HTTP
statuses, limits, and every Redis key and channel name. If each side kept its own copy
they would drift apart silently; one module makes that impossible.

Event format (one JSON object, produced once on the worker, forwarded byte-for-byte)::

    {"job_id": str, "seq": int, "epoch": str, "state": str, "progress": object | null, "ts": float,
     "final": bool, "task"?: str, "result"?: any, "error"?: {"type", "message"},
     "retry"?: {"attempt", "countdown", "eta"}}

`seq` is assigned inside Redis (see `scripts/record.lua`), so it is gap-free and strictly
increasing per job no matter how many processes report for the same job. `epoch` names
the incarnation of the job's stream: if the record is lost and recreated (Redis restarted
without persistence), seqs start again at 1 under a new epoch, and a client resuming from
the old one is told (`Msg.RESET`) and replayed from the start.
"""

from __future__ import annotations

import base64
import functools
import hashlib
import json
import math
import re
from dataclasses import dataclass
from decimal import Decimal
from typing import Any

import orjson

# Celery's own state names, plus the ones jobwire adds meaning to.
PENDING = "PENDING"
STARTED = "STARTED"
RETRY = "RETRY"
SUCCESS = "SUCCESS"
FAILURE = "FAILURE"
REVOKED = "REVOKED"
UNKNOWN = "UNKNOWN"

#: States after which a job never changes again; the record script refuses later events.
FINAL_STATES = frozenset({SUCCESS, FAILURE, REVOKED})

# -- The client protocol -------------------------------------------------------------------


class Op:
    """What a client sends on `/ws`: `{"op": <Op>, ...}`."""

    SUBSCRIBE = "subscribe"  # {"job_ids": [...], "since"?: {"<id>": seq}}
    UNSUBSCRIBE = "unsubscribe"  # {"job_ids": [...]}
    SUBSCRIBE_ALL = "subscribe_all"
    UNSUBSCRIBE_ALL = "unsubscribe_all"
    PING = "ping"
    AUTH = "auth"  # {"token": ...}: the first message, when the token is not in a header


class Msg:
    """The `type` of what the server sends, on `/ws` frames and SSE `event: control` data."""

    WELCOME = "welcome"  # after authentication: {"heartbeat": seconds}
    EVENT = "event"  # a job event; `"stream": "all"` marks the all-jobs stream
    SUBSCRIBED = "subscribed"  # {"job_id", "seq"}: history replayed, live from here
    UNSUBSCRIBED = "unsubscribed"  # {"job_ids"}
    SUBSCRIBED_ALL = "subscribed_all"
    UNSUBSCRIBED_ALL = "unsubscribed_all"
    GAP = "gap"  # {"job_id", "from", "to"}: seqs trimmed from history, never delivered
    RESET = "reset"  # {"job_id", "epoch"}: the job's history was lost and began again; forget its seqs
    RESYNC = "resync"  # {"scope": "all"}: refetch the job listing
    HEARTBEAT = "heartbeat"  # {"ts"}
    PONG = "pong"  # {"ts"}
    ERROR = "error"  # {"code", "message", "job_id"?}
    END = "end"  # SSE only: nothing more can follow on this stream; do not reconnect


class Close:
    """Websocket close codes (4000-4999 are jobwire's own)."""

    NORMAL = 1000  # the job's final event was sent
    GOING_AWAY = 1001  # the server is shutting down: reconnect (to another process) and resume
    POLICY = 1008  # refused by policy (e.g. the transport is turned off)
    TOO_BIG = 1009  # a frame over the size limit
    INTERNAL_ERROR = 1011  # a fault on the server's side (logged there)
    TRY_AGAIN_LATER = 1013  # Redis unreachable, or too many connections: back off and resume
    BAD_REQUEST = 4400  # malformed job id or since
    UNAUTHENTICATED = 4401  # no token, a bad one, or it expired: get a new token first
    FORBIDDEN = 4403  # the token does not allow this (or the Origin is not allowed)
    NOT_FOUND = 4404  # no such job (or not yours: the two are told apart by no one)


#: Why a stream ended at its token's `exp`: a websocket's close reason (4401), the message
#: of an SSE stream's last `unauthenticated` error. Come back with a new token and resume.
TOKEN_EXPIRED = "token expired"

#: Close codes after which reconnecting cannot help; every other code means "reconnect and
#: resume from the last seq".
TERMINAL_CLOSE_CODES = frozenset(
    {
        Close.NORMAL,
        Close.POLICY,
        Close.TOO_BIG,
        Close.BAD_REQUEST,
        Close.UNAUTHENTICATED,
        Close.FORBIDDEN,
        Close.NOT_FOUND,
    }
)


@dataclass(frozen=True)
class Disconnect:
    """Why the server ends a connection, as one value: the websocket close code and reason,
    whether reconnecting can help (`terminal`: it cannot), and the metric label it is
    counted under. Every transport closes with one of these (an SSE stream ends, saying
    the reason where it still can)."""

    code: int
    reason: str
    label: str

    @property
    def terminal(self) -> bool:
        return self.code in TERMINAL_CLOSE_CODES

    def because(self, reason: str) -> Disconnect:
        """The same disconnect, saying more precisely why."""
        return Disconnect(self.code, reason, self.label)


class Disconnects:
    """The disconnects jobwire uses (see `Disconnect`)."""

    JOB_FINISHED = Disconnect(Close.NORMAL, "job finished", "finished")
    CLOSED = Disconnect(Close.NORMAL, "", "closed")  # nothing more to say (the stream is over)
    GOING_AWAY = Disconnect(Close.GOING_AWAY, "server shutting down; reconnect", "going_away")
    TRANSPORT_OFF = Disconnect(Close.POLICY, "websockets are turned off here", "transport_off")
    TOO_MANY_MESSAGES = Disconnect(Close.POLICY, "too many messages", "too_many_messages")
    TOO_BIG = Disconnect(Close.TOO_BIG, "request head over the size limit", "too_big")
    INTERNAL = Disconnect(Close.INTERNAL_ERROR, "job store error", "internal")
    UNAVAILABLE = Disconnect(Close.TRY_AGAIN_LATER, "job store unavailable, reconnect", "unavailable")
    TOO_SLOW = Disconnect(Close.TRY_AGAIN_LATER, "client too slow; resume by seq", "too_slow")
    LOAD = Disconnect(Close.TRY_AGAIN_LATER, "too many connections; retry later", "load")
    BAD_REQUEST = Disconnect(Close.BAD_REQUEST, "bad request", "bad_request")
    UNAUTHENTICATED = Disconnect(Close.UNAUTHENTICATED, "unauthenticated", "unauthenticated")
    TOKEN_EXPIRED = Disconnect(Close.UNAUTHENTICATED, TOKEN_EXPIRED, "token_expired")
    FORBIDDEN = Disconnect(Close.FORBIDDEN, "origin not allowed", "forbidden")
    NOT_FOUND = Disconnect(Close.NOT_FOUND, "job not found", "not_found")


#: Every error code jobwire answers with, and the HTTP status it carries on REST and SSE.
#: On `/ws` the same codes arrive in `{"type": "error"}` messages.
ERROR_STATUS: dict[str, int] = {
    "bad_request": 400,
    "invalid_json": 400,
    "invalid_message": 400,
    "unknown_op": 400,
    "unauthenticated": 401,
    "forbidden": 403,
    "job_not_found": 404,
    "not_found": 404,
    "method_not_allowed": 405,
    "job_finished": 409,
    "no_result": 409,
    "result_gone": 410,
    "payload_too_large": 413,
    "headers_too_large": 431,
    "url_too_long": 414,
    "too_many_ids": 413,
    "too_many_jobs": 413,
    "invalid_request": 422,
    "invalid_job_id": 422,
    "task_not_allowed": 422,
    "unsupported_media_type": 415,
    "rate_limited": 429,
    "too_many_connections": 429,
    "internal_error": 500,
    "unavailable": 503,
    "redis_unavailable": 503,
    "broker_unavailable": 503,
    "transport_disabled": 503,
}


class JobwireError(Exception):
    """An error with a stable machine `code`, a human `message` and its HTTP `status`.

    Raised by the server's checks (and turned into `{"error": {"code", "message"}}` with
    the status, or a `{"type": "error"}` message on a websocket), and by the Python client
    for what a server answered.
    """

    def __init__(
        self, code: str, message: str, status: int | None = None, *, retry_after: float | None = None
    ) -> None:
        super().__init__(f"{code}: {message}")
        self.code, self.message = code, message
        self.status = status if status is not None else ERROR_STATUS.get(code, 400)
        self.retry_after = retry_after  # seconds, for a refusal that says "later" (429, 503)

    def as_message(self, **extra: Any) -> dict[str, Any]:
        """The error as a control message (same shape on every transport)."""
        return {"type": Msg.ERROR, "code": self.code, "message": self.message, **extra}


class JobNotFound(JobwireError):
    """No job with that id: never submitted, or expired."""

    def __init__(self, job_id: str, message: str | None = None) -> None:
        super().__init__(
            "job_not_found", message or f"no job with id {job_id!r} (never submitted, or expired)"
        )
        self.job_id = job_id


# -- Limits ----------------------------------------------------------------------------------

MAX_BODY_BYTES = 1 << 20  # a REST body: generous for task arguments and 1,000 ids
MAX_IDS_PER_MESSAGE = 1000  # job ids in one /ws subscribe or unsubscribe
MAX_GROUP_CHILDREN = 10_000  # tasks in one group or chord submit
MAX_JOBS_PER_STREAM = 200  # jobs on one multiplexed SSE stream (they travel in the URL)
SSE_RETRY_MS = 2000  # how soon EventSource reconnects after a drop

MAX_SEQ = 2**63 - 1  # Redis integers are signed 64-bit
MAX_JSON_DEPTH = 32  # nesting of task arguments: Celery's encoders fail far deeper than any real use

# Job ids are usually Celery UUIDs, but Celery takes any string (`apply_async(task_id=...)`),
# and every id it takes must work: the worker side never checks ids, and Redis keys and
# object-store paths carry an encoded form (`key_id`). What clients send is checked, for
# sanity only: 1-1024 characters, none of them a control character.
MAX_JOB_ID_CHARS = 1024
_CLIENT_JOB_ID = re.compile(rf"^[^\x00-\x1f\x7f]{{1,{MAX_JOB_ID_CHARS}}}$")
_SEQ = re.compile(r"^[0-9]{1,19}$")  # ASCII digits only: str.isdigit() also takes '²'

# Ids made of these characters (the usual UUIDs and slugs) are used as they are in keys;
# any other id is written as `~` + its base64url form, which no plain id can equal (a plain
# id never starts with `~`), so no two ids share a key. Dots may not lead: `..` would be a
# folder of its own in an object-store path.
_PLAIN_KEY_ID = re.compile(r"^[A-Za-z0-9_:-][A-Za-z0-9_.:-]{0,199}$")
_ENCODED = "~"


def check_job_id(value: object) -> str:
    """Return `value` if it is an acceptable job id from a client, else raise `JobwireError`
    (invalid_job_id)."""
    if not isinstance(value, str) or not _CLIENT_JOB_ID.match(value):
        raise JobwireError(
            "invalid_job_id",
            f"job id must be 1-{MAX_JOB_ID_CHARS} characters without control characters, got {value!r:.80}",
        )
    return value


@functools.lru_cache(maxsize=65536)  # per event and per key: ids repeat
def key_id(job_id: str) -> str:
    """The form of `job_id` used in Redis keys, channels and object-store paths: the id
    itself when it is plain, else `~<base64url>` (collision-free and reversible)."""
    if _PLAIN_KEY_ID.match(job_id):
        return job_id
    raw = job_id.encode("utf-8", "surrogatepass")
    return _ENCODED + base64.urlsafe_b64encode(raw).rstrip(b"=").decode("ascii")


@functools.lru_cache(maxsize=65536)
def id_from_key(encoded: str) -> str | None:
    """The job id a `key_id` stands for; None if `encoded` is not one."""
    if not encoded.startswith(_ENCODED):
        return encoded if _PLAIN_KEY_ID.match(encoded) else None
    body = encoded[1:]
    try:
        raw = base64.urlsafe_b64decode(body + "=" * (-len(body) % 4))
        job_id = raw.decode("utf-8", "surrogatepass")
    except (ValueError, UnicodeDecodeError):
        return None
    return job_id if key_id(job_id) == encoded else None


def parse_seq(value: object, *, field: str) -> int:
    """A seq from a client: a non-negative integer up to 2**63-1, or such a decimal string."""
    if isinstance(value, str) and _SEQ.match(value.strip()):
        value = int(value.strip())
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= MAX_SEQ:
        raise JobwireError("invalid_request", f"{field} must be a non-negative integer, got {value!r:.40}")
    return value


@dataclass(frozen=True)
class Keys:
    """Every Redis key and channel jobwire uses, under one prefix.

    A job's keys are `<prefix>{<id>}:job` and `<prefix>{<id>}:events`, with the id in its
    `key_id` form: the braces make it a hash tag, so one job's keys share a cluster slot
    (the record script touches one slot), and since the key form has no braces, no id can
    produce another job's key (an id `x}:events` would otherwise answer for job `x`). The
    prefix is the one handed to Celery as `global_keyprefix`, so jobwire data and Celery
    results sit side by side.
    """

    prefix: str = "jobwire:"

    def job(self, job_id: str) -> str:
        """Hash with the job's latest state, seq, progress, result/error, owner and metadata."""
        return f"{self.prefix}{{{key_id(job_id)}}}:job"

    def history(self, job_id: str) -> str:
        """Sorted set of the job's events scored by seq (bounded, newest kept)."""
        return f"{self.prefix}{{{key_id(job_id)}}}:events"

    def progress(self, job_id: str) -> str:
        """Sorted set of the seqs in the history that are progress (the trimmable ones)."""
        return f"{self.prefix}{{{key_id(job_id)}}}:progress"

    def event_ids(self, job_id: str) -> str:
        """Sorted set of the last event ids recorded with dedupe (see `server.bridge`)."""
        return f"{self.prefix}{{{key_id(job_id)}}}:eids"

    def children(self, job_id: str) -> str:
        """List of a group's or chord's child job ids, in submit order."""
        return f"{self.prefix}{{{key_id(job_id)}}}:children"

    def foreign_live(self, source: str) -> str:
        """Set of the jobs of a followed foreign backend that are not final yet."""
        return f"{self.prefix}foreign:{hashlib.sha1(source.encode()).hexdigest()[:12]}:live"

    @property
    def recent(self) -> str:
        """Sorted set of job ids scored by creation time, for listings."""
        return f"{self.prefix}jobs:recent"

    def tenant_recent(self, tenant: str) -> str:
        """The recent-jobs index of one tenant."""
        return f"{self.prefix}tenant:{tenant}:recent"

    def job_channel(self, job_id: str) -> str:
        """Pub/sub channel carrying one job's events."""
        return f"{self.prefix}{{{key_id(job_id)}}}:live"

    @property
    def all_channel(self) -> str:
        """Pub/sub channel carrying every job's events (admin dashboards)."""
        return f"{self.prefix}events"

    @property
    def tenant_channel_prefix(self) -> str:
        return f"{self.prefix}tenant-events:"

    def tenant_channel(self, tenant: str) -> str:
        """Pub/sub channel carrying the events of one tenant's jobs."""
        return self.tenant_channel_prefix + tenant

    def bucket(self, name: str) -> str:
        """A token bucket (see `jobwire.ratelimit`)."""
        return f"{self.prefix}bucket:{name}"

    def limit(self, name: str) -> str:
        """A task limit's settings {rate, capacity, spec}; its buckets share its slot."""
        return f"{self.prefix}{{limit:{name}}}"

    def limit_bucket(self, name: str, bucket: str) -> str:
        """One bucket of a limit: "" for the shared one, or a tenant's or user's."""
        return f"{self.prefix}{{limit:{name}}}:bucket:{bucket}"

    def limit_waiting(self, name: str) -> str:
        """Sorted set of jobs waiting on a limit, scored by when they run again."""
        return f"{self.prefix}{{limit:{name}}}:waiting"

    @property
    def celery_limits(self) -> str:
        """Hash of Celery task rate limits wanted on every worker (task name -> rate)."""
        return f"{self.prefix}celery-rate-limits"

    @property
    def limits(self) -> str:
        """Set of defined limit names (for listing)."""
        return f"{self.prefix}limits"

    def job_id_from_channel(self, channel: str) -> str | None:
        head, tail = f"{self.prefix}{{", "}:live"
        if channel.startswith(head) and channel.endswith(tail):
            return id_from_key(channel[len(head) : -len(tail)])
        return None


def error_from_celery(result: Any) -> dict[str, str]:
    """A failure as jobwire reports it, `{"type", "message"}`, from what Celery stores: an
    exception, or its JSON form `{"exc_type", "exc_message", ...}`."""
    if isinstance(result, BaseException):
        return {"type": type(result).__name__, "message": str(result)}
    if isinstance(result, dict) and "exc_type" in result:
        message = result.get("exc_message")
        if isinstance(message, (list, tuple)):
            message = " ".join(str(m) for m in message)
        return {"type": str(result["exc_type"]), "message": str(message or "")}
    return {"type": "Error", "message": str(result)}


def dumps(value: Any) -> bytes:
    """JSON-encode like every jobwire component does (compact, UTF-8, non-JSON as str).

    Never fails on what a task returns: orjson refuses integers past 64 bits, tuple keys
    and nesting past 254 levels, all of which Celery stores; those values take a slower
    path that writes other keys as `str(key)` and cuts nesting at `MAX_EVENT_DEPTH`.

    What it writes, orjson reads back (every jobwire reader uses it): integers past 64 bits
    are written as strings of their exact digits. As numbers, orjson read them as floats,
    rounded, and refused those past a double's range (10**400: "number is infinity"), so
    one such value in a progress meta or result made the job's status and history answer
    500 and broke its websocket. Celery's result backend keeps the integer itself.
    """
    try:
        return orjson.dumps(value, default=str, option=orjson.OPT_NON_STR_KEYS)
    except orjson.JSONEncodeError:
        return json.dumps(_plain(value, MAX_EVENT_DEPTH), separators=(",", ":"), ensure_ascii=False).encode()


MAX_EVENT_DEPTH = 200  # nesting kept in an event's JSON; deeper values become a marker string


def _plain(value: Any, depth: int) -> Any:
    """`value` as what the stdlib's JSON encoder takes (see `dumps`)."""
    if isinstance(value, str) or value is None or isinstance(value, bool):
        return value
    if isinstance(value, int):
        return value if -(2**63) <= value < 2**64 else _digits(value)
    if isinstance(value, float):
        return value if math.isfinite(value) else None  # as orjson writes NaN and infinities
    if depth <= 0:
        return f"<nested deeper than {MAX_EVENT_DEPTH} levels>"
    if isinstance(value, dict):
        return {_key(k): _plain(v, depth - 1) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v, depth - 1) for v in value]
    try:
        return orjson.loads(orjson.dumps(value, default=str, option=orjson.OPT_NON_STR_KEYS))
    except orjson.JSONEncodeError:
        return str(value)


def _digits(value: int) -> str:
    """An integer's exact decimal digits, past Python's limit on int-to-str conversion too
    (4300 digits, where `str` raises; `Decimal` has none)."""
    return str(Decimal(value))


def _key(key: Any) -> str:
    """A dict key as orjson's OPT_NON_STR_KEYS writes it on the fast path, else `str(key)`."""
    if isinstance(key, str):
        return key
    if key is None or isinstance(key, (bool, float)) or (isinstance(key, int) and abs(key) < 2**63):
        return orjson.dumps(key).decode()
    return _digits(key) if isinstance(key, int) else str(key)


def event_parts(job_id: str, body: dict[str, Any]) -> tuple[bytes, bytes]:
    """Split an event into the bytes before and after its `seq` value.

    The record script splices the seq it allocates between the two, so the event is
    serialised exactly once, by Python, and Lua never re-encodes JSON (cjson would turn
    `[]` into `{}` and round floats).
    """
    head = b'{"job_id":' + dumps(job_id) + b',"seq":'
    tail = b"," + dumps(body)[1:] if body else b"}"
    return head, tail


def progress_meta(
    step: int | None = None,
    total: int | None = None,
    description: str | None = None,
    percent: float | None = None,
    **extra: Any,
) -> dict[str, Any]:
    """Build the `progress` object of a custom-state event.

    `percent` is derived here, once, so every client renders the same number: step/total
    by default (step = units done). When `step` is instead the ordinal of the step now in
    progress, pass the honest `percent` of work completed, so a bar never shows 100% while
    the last step is still running.
    """
    if total is not None and (not isinstance(total, int) or total <= 0):
        raise ValueError(f"total must be a positive int, got {total!r}")
    if step is not None and (not isinstance(step, int) or step < 0):
        raise ValueError(f"step must be a non-negative int, got {step!r}")
    if step is not None and total is not None and step > total:
        raise ValueError(f"step {step} is past total {total}")
    meta: dict[str, Any] = dict(extra)
    if step is not None:
        meta["step"] = step
    if total is not None:
        meta["total"] = total
    if percent is not None:
        if isinstance(percent, bool) or not isinstance(percent, (int, float)) or not 0 <= percent <= 100:
            raise ValueError(f"percent must be a number from 0 to 100, got {percent!r}")
        meta["percent"] = round(float(percent), 2)
    elif step is not None and total is not None:
        meta["percent"] = round(100.0 * step / total, 2)
    if description is not None:
        meta["description"] = description
    return meta


def _count(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and value >= 0


def progress_from_meta(meta: Any) -> dict[str, Any] | None:
    """The `progress` of an event for a custom state stored with Celery's `update_state`.

    `meta` is kept as given; a `percent` is added when the meta has none and says how far
    along it is, in either convention in use: `step`/`total` (Celery's docs) or
    `current`/`total` (celery-progress). Never raises: plain Celery code must not fail
    because of what it chose to store. A meta that is not a dict is kept under `value`.
    """
    if meta is None:
        return None
    if not isinstance(meta, dict):
        return {"value": meta}
    progress = dict(meta)
    total = meta.get("total")
    done = meta.get("step", meta.get("current"))
    if "percent" not in meta and _count(total) and total > 0 and _count(done) and done <= total:
        progress["percent"] = round(100.0 * done / total, 2)
    return progress


# -- The record contract: names workers and servers share ----------------------------------
#
# What a job's Celery message carries and what the record script (`scripts/record.lua`)
# keys on, for every side that publishes jobs or records their events: the worker
# (`jobwire.tasks`), the server's submit path and its bridge (`jobwire.server`), and
# `jobwire.record`, which builds the script's call. Here so that the server can agree with
# the worker without importing the worker's package (and Celery's worker machinery with it).

#: Celery message headers naming a job's owner, set by whoever publishes the job (the
#: server's submit, a task that publishes more tasks) and recorded by the event that
#: creates the job; tasks a job publishes inherit them.
TENANT_HEADER = "jobwire_tenant"
SUBJECT_HEADER = "jobwire_sub"

#: Celery message headers naming the group or chord a job belongs to, and its role there.
PARENT_HEADER = "jobwire_parent"
ROLE_HEADER = "jobwire_role"

#: The roles: a child's final event counts in its group's done/failed aggregate; a chord's
#: callback ends the chord with its own outcome (the record script stores the role).
CHILD_ROLE = "child"
CALLBACK_ROLE = "callback"

#: The kinds of aggregate job, stored as the job's `task`: the record script takes a job
#: whose children are all in to its callback phase when the kind is a chord, else to its end.
GROUP_KIND = "group"
CHORD_KIND = "chord"

#: A group's or chord's state while its children run (its events carry
#: {done, failed, total, percent}), and a chord's once they are in and its callback runs.
RUNNING = "RUNNING"
CALLBACK = "CALLBACK"
