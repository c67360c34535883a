"""`jobwire.attach(app)`: make any Celery app report its jobs to jobwire.

One call, made where the app is configured (`celery_app.py`, Django's `celery.py` …),
after its configuration is loaded. It touches that app only: no import side effects, no
`set_default()`, nothing for other apps in the same process.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from typing import Any

from celery import Celery
from celery.app.backends import by_url
from celery.backends.redis import RedisBackend, SentinelBackend
from redis.connection import parse_url

from jobwire.redis_target import parse_target
from jobwire.settings import Settings
from jobwire.tasks import registry, signals
from jobwire.tasks.backend import BACKEND_ALIASES, JobwireBackendMixin

log = logging.getLogger(__name__)


class AttachError(RuntimeError):
    """The app's configuration cannot be served by jobwire; the message says what to change."""


#: `attach(app, owner=...)`: asked at each publish that names no owner otherwise, in the
#: publishing thread and context; (tenant, sub), or None for a job without an owner.
OwnerSource = Callable[[], tuple[str, str] | None]


def attach(
    app: Celery,
    settings: Settings | None = None,
    *,
    allow_other_backend: bool = False,
    owner: OwnerSource | None = None,
) -> Celery:
    """Report `app`'s jobs to jobwire; return `app`.

    - Lifecycle events (PENDING at publish, STARTED, RETRY, SUCCESS, FAILURE, REVOKED) for
      every task of the app, from Celery's signals.
    - Custom states stored with plain `self.update_state(state=..., meta=...)` stream as
      progress, written with Celery's result in one Redis round trip.
    - `task_track_started` is turned on, so `AsyncResult(id).state` says STARTED when
      jobwire's stream does, unless the app's configuration sets it itself (kept; a
      warning says what that costs). No other setting is changed, and no backend is
      built and cached (a later change of `result_backend` is honoured everywhere).

    jobwire keeps its events in the Redis of the app's result backend. With no
    `settings`, they come from the environment, and `JOBWIRE_REDIS_URL` defaults to that
    backend's URL. Raises `AttachError` when the backend is not Redis (unless
    `allow_other_backend`), or is another Redis than `JOBWIRE_REDIS_URL`.

    `owner` derives a job's owner when it is published with none otherwise (no owner
    headers, no `jobwire.owner()` block, no parent task with one): say, the signed-in
    user of the web request publishing it. It is called in the publishing thread, so it
    may read that thread's request context; a callable that raises or answers something
    other than (tenant, sub) or None leaves that job without an owner, saying so in the
    log.
    """
    if owner is not None and not callable(owner):
        raise AttachError(f"owner must be a callable returning (tenant, sub) or None, got {owner!r:.80}")
    explicit_url = settings is not None or bool(os.environ.get("JOBWIRE_REDIS_URL"))
    settings = settings or Settings.from_env()
    backend_url = app.conf.result_backend
    backend_cls, _ = by_url(app.backend_cls or backend_url, app.loader)
    if issubclass(backend_cls, RedisBackend):
        aliases = dict(app.loader.override_backends)
        aliases.update(BACKEND_ALIASES)
        app.loader.override_backends = aliases
        if app._backend is not None and not isinstance(app._backend, JobwireBackendMixin):
            # Built before attach() (in this thread, or shared when thread-safe): replace it,
            # which caches nothing that was not cached already.
            app._backend = app._get_backend()
        settings = _same_redis(app, settings, backend_url, explicit_url)
    elif not allow_other_backend:
        raise AttachError(_other_backend_message(backend_url or "disabled", backend_cls))
    if _set_by_user(app, "task_track_started"):
        if not app.conf.task_track_started:
            log.warning(
                "jobwire: task_track_started=False is kept, as set: jobwire's stream says STARTED "
                "when a worker starts a job, but Celery's AsyncResult.state stays PENDING until it ends"
            )
    else:
        app.conf.task_track_started = True
    app.__dict__.pop("_jobwire_recorder", None)
    app._jobwire_owner = owner  # type: ignore[attr-defined]  # read by the publish signal
    registry.add(app, settings)
    signals.connect()
    return app


def _set_by_user(app: Celery, setting: str) -> bool:
    """Whether the app's configuration names `setting` itself (in any spelling Celery reads:
    new, old-style, or under a namespace), rather than leaving it to Celery's default."""
    suffix = setting.split("_", 1)[1].upper()  # TRACK_STARTED, in every spelling
    for mapping in app.conf.maps[:-1]:  # the last is Celery's defaults
        try:
            names = list(mapping.keys())
        except (AttributeError, TypeError):
            continue
        if any(isinstance(name, str) and name.upper().endswith(suffix) for name in names):
            return True
    return False


def _same_redis(app: Celery, settings: Settings, backend_url: str, explicit_url: bool) -> Settings:
    """jobwire's Redis must be the backend's: one script writes both, and a script sees
    one database of one server."""
    if settings.redis_cluster:  # jobwire's events on a cluster, Celery's results beside it
        return settings
    # A backend built for the check and dropped: `app.backend` would cache one in this
    # thread, and a later change of `result_backend` would then be ignored here alone.
    backend = app._get_backend()
    params: dict[str, Any] = getattr(backend, "connparams", {})
    if isinstance(backend, SentinelBackend):
        return _same_sentinel(app, settings, backend_url, explicit_url)
    if "host" not in params:  # a unix socket: trust the settings
        return settings
    if not explicit_url:
        return settings.model_copy(update={"redis_url": backend_url})
    ours = parse_url(settings.redis_url)
    mine = (_host(ours.get("host", "localhost")), int(ours.get("port", 6379)), int(ours.get("db", 0)))
    theirs = (_host(params["host"]), int(params.get("port") or 6379), int(params.get("db") or 0))
    if mine != theirs:
        raise AttachError(
            f"the app's result backend is Redis {theirs[0]}:{theirs[1]} db {theirs[2]}, but "
            f"JOBWIRE_REDIS_URL is {settings.redis_url!r} ({mine[0]}:{mine[1]} db {mine[2]}). jobwire "
            "writes each event together with Celery's result, in the backend's Redis, and its "
            "server reads them from JOBWIRE_REDIS_URL: point both at the same Redis database "
            "(or leave JOBWIRE_REDIS_URL unset where the worker runs)."
        )
    return settings


def _same_sentinel(app: Celery, settings: Settings, backend_url: str, explicit_url: bool) -> Settings:
    """A Sentinel backend: jobwire follows the same primary through the same sentinels
    (`JOBWIRE_REDIS_URL` defaults to the backend's URL, and the master's name comes from
    `result_backend_transport_options`), so the server finds the primary the workers use,
    before and after a failover."""
    master = str((app.conf.result_backend_transport_options or {}).get("master_name") or "")
    if not explicit_url:
        try:
            parse_target(backend_url, sentinel_master=master)
        except ValueError as exc:
            raise AttachError(f"the app's Sentinel result backend cannot be followed: {exc}") from None
        return settings.model_copy(update={"redis_url": backend_url, "redis_sentinel_master": master})
    ours = settings.redis_target
    db = int(getattr(app._get_backend(), "connparams", {}).get("db") or 0)
    if ours.mode != "sentinel" or ours.master != master or ours.db != db:
        raise AttachError(
            f"the app's result backend is Sentinel's primary {master!r} db {db}, but JOBWIRE_REDIS_URL names "
            f"{ours.describe()}. jobwire writes each event together with Celery's result: set "
            "JOBWIRE_REDIS_URL to the backend's sentinel:// URL and JOBWIRE_REDIS_SENTINEL_MASTER to "
            "its master_name (or leave both unset where the worker runs)."
        )
    return settings


def _host(host: str) -> str:
    return "127.0.0.1" if host in ("localhost", "::1") else host


def _other_backend_message(url: str, cls: type) -> str:
    shown = url.split("://", 1)[0] + "://…" if "://" in url else url
    return (
        f"the app's result backend is {shown} ({cls.__name__}), not Redis. jobwire keeps each "
        "event next to Celery's result in Redis; with another backend it still streams "
        "lifecycle events and report() progress (to JOBWIRE_REDIS_URL), but: plain "
        "update_state() calls do not stream (use ProgressTask.report()); each progress "
        "event costs two writes instead of one, and AsyncResult can lag the stream; a revoke "
        "from jobwire reaches Celery's stored state only through the worker. Set "
        "result_backend to a redis:// URL (the Redis of JOBWIRE_REDIS_URL), or call "
        "attach(app, allow_other_backend=True) to accept that."
    )
