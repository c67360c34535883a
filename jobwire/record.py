"""The record contract: how a writer calls `scripts/record.lua`, and what it does with the reply.

Every jobwire event is one call of the record script. Two writers make it: the worker's
recorder (`jobwire.tasks.recorder`, synchronous, for jobs of apps that attached jobwire)
and the server's bridge (`jobwire.server.bridge`, asynchronous, for Celery apps that never
imported jobwire), and a later one (a direct REST write, say) will make it too. The script
reads its 28 arguments by position. They were a list kept in step with it by hand, where
a misplaced value records a wrong event without any error; and the steps around the call
were the recorder's methods, which the bridge copied in part: it never counted a group's
child that it heard end, so such a group never ended.

So the contract lives here, once, and pure (no Redis I/O, no Celery: the server imports it
without the worker's package):

- `RecordCall` names every KEYS entry and ARGV value; `ARGV` and `KEYS` give their order,
  written once, and `RecordCall.keys()`/`.argv()` render the lists the script reads. The
  field names are the script's own local names, so tests/test_record_contract.py reads
  the script's `local ... = ARGV[n]` lines and holds them to `ARGV`: neither side can be
  reordered without the other.
- `record_call` builds the call from what a writer knows, by keyword.
- `parse_reply` reads the script's reply (seq, whether this event created the job, the
  group or chord a final event counts in), or None when the script refused the event.
- The steps around a call, which every writer takes: `index_commands` (a job the call
  created joins the recent-jobs indexes) and `parent_call` (a final event of a group's
  child counts in the group; a chord's callback ends the chord).

Each writer runs the calls with its own client: a sync or an async script object, and a
pipeline for the indexes (see `Recorder.record` and `Bridge._record_event`).
"""

from __future__ import annotations

import time
import uuid
from dataclasses import dataclass
from typing import Any

from jobwire.protocol import (
    CALLBACK_ROLE,
    CHILD_ROLE,
    FINAL_STATES,
    RUNNING,
    SUBJECT_HEADER,
    SUCCESS,
    TENANT_HEADER,
    dumps,
    event_parts,
)
from jobwire.settings import Settings

#: Stands for "no result given" (a result may be None, which is recorded as null).
MISSING: Any = object()

#: What a child's final event adds to its group's aggregate (the script's `outcome`).
CHILD_OK, CHILD_FAILED = "ok", "failed"

#: Celery's own result write, riding in the same call: sent only with the Celery key.
CELERY_ARGV: tuple[str, ...] = ("celery_value", "celery_ttl")

#: The script's ARGV, in order: `ARGV[1]` is `job_id`. The one place the order is written
#: (record.lua's header lists the same names; tests/test_record_contract.py checks both).
ARGV: tuple[str, ...] = (
    "job_id",
    "state",
    "final",
    "head",
    "tail",
    "progress",
    "result",
    "err",
    "task",
    "ts",
    "limit",
    "ttl",
    "only_new",
    "chan_job",
    "chan_all",
    "event_id",
    "owner_tenant",
    "owner_sub",
    "tenant_chan",
    "new_epoch",
    "sharded",
    "history_max",
    "dedupe",
    "parent",
    "role",
    "outcome",
    *CELERY_ARGV,
)

#: The script's KEYS, in order; the last, Celery's result key, is optional.
KEYS: tuple[str, ...] = ("job_key", "history_key", "progress_key", "event_ids_key", "celery_key")


@dataclass(frozen=True)
class Owner:
    """Who a job belongs to: recorded when it is created, checked on every read."""

    tenant: str
    subject: str

    def headers(self) -> dict[str, str]:
        """The Celery message headers that carry it from the publisher."""
        return {TENANT_HEADER: self.tenant, SUBJECT_HEADER: self.subject}


@dataclass(frozen=True)
class Parent:
    """The group or chord a job belongs to, and its part there (a child or the callback)."""

    job_id: str
    role: str = CHILD_ROLE


@dataclass(frozen=True)
class CeleryMeta:
    """Celery's result key and encoded value, to be written alongside the event."""

    key: bytes | str
    value: bytes | str
    ttl: int | None


@dataclass(frozen=True, kw_only=True)
class RecordCall:
    """One call of the record script, every value named (see `scripts/record.lua` for what
    each does). Values keep their Python types (flags are bools, `ts` a float); `argv()`
    writes them as the script reads them. Keyword-only: the field order here means nothing,
    `ARGV` and `KEYS` alone say where each value goes."""

    # KEYS: every one in the job's hash slot (Celery's key is the job's own too).
    job_key: str
    history_key: str
    progress_key: str  # the seqs in the history that are progress, i.e. trimmable
    event_ids_key: str  # the last event ids recorded with dedupe
    celery_key: bytes | str | None = None  # Celery's result key, when its write rides along

    # ARGV: the event.
    job_id: str
    state: str
    final: bool
    head: bytes  # the event's JSON up to its seq, which the script allocates (`event_parts`)
    tail: bytes  # ... and after it
    progress: bytes | str = ""  # JSON, or "" for none (each of the three)
    result: bytes | str = ""
    err: bytes | str = ""
    task: str = ""
    ts: float
    # ARGV: where and how long it is kept.
    limit: int  # history length past which progress events are trimmed
    ttl: int  # seconds every key of the job lives after its last event
    only_new: bool = False  # refuse the event if the job exists (registration at publish)
    chan_job: str
    chan_all: str
    event_id: str  # a retry of the job's last event gets the same seq back
    owner_tenant: str = ""  # the owner, set only by the event that creates the job
    owner_sub: str = ""
    tenant_chan: str  # prefix of the tenant channels
    new_epoch: str  # the epoch, if this event creates the job record
    sharded: bool  # publish on the job's shard channel (Redis Cluster)
    history_max: int  # history length past which even transitions go
    dedupe: bool = False  # refuse an event id seen among the job's last 256
    parent: str = ""  # the group or chord, set only by the event that creates the job
    role: str = ""
    outcome: str = ""  # CHILD_OK/CHILD_FAILED: this call counts a child in its group instead
    # ARGV, only with celery_key: Celery's encoded meta and its expiry (0: none).
    celery_value: bytes | str = ""
    celery_ttl: int = 0

    def keys(self) -> list[Any]:
        """The script's KEYS, in `KEYS` order (the Celery key only when there is one)."""
        names = KEYS if self.celery_key is not None else KEYS[:-1]
        return [getattr(self, name) for name in names]

    def argv(self) -> list[Any]:
        """The script's ARGV, in `ARGV` order, as it reads them: flags as '1'/'0', `ts` as
        its repr (the script splices it into the event's JSON), the Celery write only with
        its key."""
        names = ARGV if self.celery_key is not None else ARGV[: -len(CELERY_ARGV)]
        return [_wire(getattr(self, name)) for name in names]


def _wire(value: Any) -> Any:
    if isinstance(value, bool):
        return "1" if value else "0"
    if isinstance(value, float):
        return repr(value)
    return value


def record_call(
    settings: Settings,
    job_id: str,
    state: str,
    *,
    progress: dict[str, Any] | None = None,
    result: Any = MISSING,
    error: dict[str, str] | None = None,
    retry: dict[str, Any] | None = None,
    task: str | None = None,
    only_if_new: bool = False,
    celery_meta: CeleryMeta | None = None,
    event_id: str | None = None,
    owner: Owner | None = None,
    parent: Parent | None = None,
    dedupe: bool = False,
    outcome: str = "",
) -> RecordCall:
    """The record script's call for one event of `job_id`, stamped now.

    The event's JSON is serialised here, once (the script splices in the seq and epoch).
    Without `event_id` the event gets a fresh one, so only a retry of this very call can
    be told apart as one. `outcome` makes the call a group's aggregate step instead of an
    event of its own (see `parent_call`).
    """
    keys = settings.keys
    ts = time.time()
    final = state in FINAL_STATES
    body: dict[str, Any] = {"state": state, "progress": progress, "ts": ts, "final": final}
    if task:
        body["task"] = task
    if result is not MISSING:
        body["result"] = result
    if error is not None:
        body["error"] = error
    if retry is not None:
        body["retry"] = retry
    head, tail = event_parts(job_id, body)
    celery = (
        {"celery_key": celery_meta.key, "celery_value": celery_meta.value, "celery_ttl": celery_meta.ttl or 0}
        if celery_meta is not None
        else {}
    )
    return RecordCall(
        job_key=keys.job(job_id),
        history_key=keys.history(job_id),
        progress_key=keys.progress(job_id),
        event_ids_key=keys.event_ids(job_id),
        job_id=job_id,
        state=state,
        final=final,
        head=head,
        tail=tail,
        progress=dumps(progress) if progress is not None else "",
        result=dumps(result) if result is not MISSING else "",
        err=dumps(error) if error is not None else "",
        task=task or "",
        ts=ts,
        limit=settings.history_limit,
        ttl=settings.result_expires,
        only_new=only_if_new,
        chan_job=keys.job_channel(job_id),
        chan_all=keys.all_channel,
        event_id=event_id or uuid.uuid4().hex,
        owner_tenant=owner.tenant if owner else "",
        owner_sub=owner.subject if owner else "",
        tenant_chan=keys.tenant_channel_prefix,
        new_epoch=uuid.uuid4().hex[:12],
        sharded=settings.redis_cluster,
        history_max=max(settings.history_max, settings.history_limit),
        dedupe=dedupe,
        parent=parent.job_id if parent else "",
        role=parent.role if parent else "",
        outcome=outcome,
        **celery,
    )


@dataclass(frozen=True)
class RecordReply:
    """What the script says of an event it recorded."""

    seq: int
    created: bool  # this event created the job record: the writer indexes it (`index_commands`)
    parent: Parent | None  # a final event's group or chord, to count it in (`parent_call`)


def parse_reply(reply: Any) -> RecordReply | None:
    """The script's reply `{seq, created (1/0), parent, role}` (parent and role '' unless
    the event is final and the job has a parent), or None when the script refused the
    event: the job is final already, `only_if_new` was asked and the job exists, or the
    event id was recorded already with `dedupe`."""
    if not reply:
        return None
    parent_id = _text(reply[2])
    return RecordReply(
        int(reply[0]), bool(int(reply[1])), Parent(parent_id, _text(reply[3])) if parent_id else None
    )


def index_commands(pipe: Any, settings: Settings, job_id: str, ts: float, owner: Owner | None) -> None:
    """Queue on `pipe` (sync or async) what adds a job the script just created to the
    recent-jobs indexes: once per job, when a reply says `created`.

    Not in the record script: an index spans every job, so on a cluster it lives in another
    slot than the job. A job whose indexing fails is still streamed and readable by id;
    only listings miss it.
    """
    keys = settings.keys
    indexes = [keys.recent] + ([keys.tenant_recent(owner.tenant)] if owner else [])
    for index in indexes:
        pipe.zadd(index, {job_id: ts})
        pipe.zremrangebyrank(index, 0, -(settings.recent_limit + 1))


def parent_call(
    settings: Settings,
    reply: RecordReply,
    state: str,
    *,
    result: Any = MISSING,
    error: dict[str, str] | None = None,
    owner: Owner | None = None,
) -> RecordCall | None:
    """The call that counts a recorded event in the job's group or chord, when the reply
    names one (a final event of a group's child); None otherwise. `state`, `result` and
    `error` are the event's own, as given to `record_call`.

    A child adds one done (SUCCESS) or failed (any other end) to its group, whose event
    the script then writes from the counters, so a group of any size costs one call per
    child and counts only rise however children race. A chord's callback ends the chord
    with its own outcome. A group and its children have one owner (the children's
    headers carry the group's), so the owner goes along; it only matters if the group's
    record was lost and this call recreates it.

    The writer runs the call like its own, indexing the job if the reply says it was
    created. Groups do not nest (a group or chord is created without a parent), so the
    call's own reply never names a parent to count in.
    """
    if reply.parent is None:
        return None
    if reply.parent.role == CALLBACK_ROLE:
        return record_call(settings, reply.parent.job_id, state, result=result, error=error, owner=owner)
    outcome = CHILD_OK if state == SUCCESS else CHILD_FAILED
    return record_call(settings, reply.parent.job_id, RUNNING, outcome=outcome, owner=owner)


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value or "")
