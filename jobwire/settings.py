"""Configuration for the worker and the server, read from the environment once.

Tests build a `Settings` directly instead of patching `os.environ`.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field

from jobwire.protocol import Keys

DEFAULT_REDIS_URL = "redis://127.0.0.1:6379/0"
DEMO_APP = "jobwire.tasks.demo:app"
DEFAULT_TASKS = ("long_running_task", "report_steps", "failing_task", "retrying_task")
TRANSPORTS = ("websocket", "sse", "polling")


class SettingsError(ValueError):
    """An environment variable holds a value jobwire cannot use."""


def _int(env: Mapping[str, str], name: str, default: int, *, minimum: int = 0) -> int:
    raw = env.get(name)
    if raw is None or raw == "":
        return default
    try:
        value = int(raw)
    except ValueError:
        raise SettingsError(f"{name} must be an integer, got {raw!r}") from None
    if value < minimum:
        raise SettingsError(f"{name} must be >= {minimum}, got {value}")
    return value


def _float(env: Mapping[str, str], name: str, default: float) -> float:
    raw = env.get(name)
    if raw is None or raw == "":
        return default
    try:
        value = float(raw)
    except ValueError:
        raise SettingsError(f"{name} must be a number, got {raw!r}") from None
    if value <= 0:
        raise SettingsError(f"{name} must be > 0, got {value}")
    return value


@dataclass(frozen=True)
class Settings:
    """Everything jobwire can be configured with (see README, "Configuration")."""

    redis_url: str = DEFAULT_REDIS_URL
    broker_url: str = ""  # empty: same as redis_url
    key_prefix: str = "jobwire:"
    result_expires: int = 86400

    # Limits
    history_limit: int = 1000  # events kept per job; older ones are trimmed
    recent_limit: int = 10000  # jobs kept in the recent-jobs index
    batch_max_ids: int = 1000  # ids per batch-status call
    max_jobs_per_socket: int = 1000
    client_queue_limit: int = 1000  # events buffered per client before it is resynced
    redis_max_connections: int = 64  # server's pool for reads; requests queue beyond it

    # Timeouts
    record_retry_seconds: float = 20.0  # how long a worker retries a write while Redis is down
    heartbeat_interval: float = 15.0  # seconds between app-level heartbeats to clients
    subscribe_timeout: float = 5.0  # how long a subscribe waits for Redis to confirm

    # The Celery app the server submits and revokes through (`package.module:attribute`).
    celery_app: str = DEMO_APP
    # Tasks `POST /api/v1/jobs` may submit. None: the demo's tasks for the demo app, and
    # none at all for an app of yours until you name them.
    allowed_tasks: tuple[str, ...] | None = None
    # Which push transports the server offers (polling always works). Turning websocket
    # off behaves like a proxy that refuses the upgrade: clients fall back.
    transports: tuple[str, ...] = field(default=TRANSPORTS)

    @property
    def submittable(self) -> tuple[str, ...]:
        if self.allowed_tasks is not None:
            return self.allowed_tasks
        return DEFAULT_TASKS if self.celery_app == DEMO_APP else ()

    @property
    def effective_broker_url(self) -> str:
        return self.broker_url or self.redis_url

    @property
    def keys(self) -> Keys:
        return Keys(self.key_prefix)

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> Settings:
        env = os.environ if env is None else env
        tasks = env.get("JOBWIRE_ALLOWED_TASKS")
        prefix = env.get("JOBWIRE_KEY_PREFIX", "jobwire:")
        if not prefix:
            raise SettingsError("JOBWIRE_KEY_PREFIX must not be empty")
        transports = tuple(
            t.strip() for t in env.get("JOBWIRE_TRANSPORTS", ",".join(TRANSPORTS)).split(",") if t.strip()
        )
        unknown = set(transports) - set(TRANSPORTS)
        if unknown:
            raise SettingsError(
                f"JOBWIRE_TRANSPORTS has unknown {sorted(unknown)}; choose from {list(TRANSPORTS)}"
            )
        return cls(
            transports=transports,
            redis_url=env.get("JOBWIRE_REDIS_URL") or DEFAULT_REDIS_URL,
            broker_url=env.get("JOBWIRE_BROKER_URL", ""),
            key_prefix=prefix,
            result_expires=_int(env, "JOBWIRE_RESULT_EXPIRES", 86400, minimum=1),
            history_limit=_int(env, "JOBWIRE_HISTORY_LIMIT", 1000, minimum=1),
            recent_limit=_int(env, "JOBWIRE_RECENT_LIMIT", 10000, minimum=1),
            batch_max_ids=_int(env, "JOBWIRE_BATCH_MAX_IDS", 1000, minimum=1),
            max_jobs_per_socket=_int(env, "JOBWIRE_MAX_JOBS_PER_SOCKET", 1000, minimum=1),
            client_queue_limit=_int(env, "JOBWIRE_CLIENT_QUEUE_LIMIT", 1000, minimum=1),
            redis_max_connections=_int(env, "JOBWIRE_REDIS_MAX_CONNECTIONS", 64, minimum=2),
            record_retry_seconds=_float(env, "JOBWIRE_RECORD_RETRY_SECONDS", 20.0),
            heartbeat_interval=_float(env, "JOBWIRE_HEARTBEAT_INTERVAL", 15.0),
            subscribe_timeout=_float(env, "JOBWIRE_SUBSCRIBE_TIMEOUT", 5.0),
            celery_app=env.get("JOBWIRE_CELERY_APP") or DEMO_APP,
            allowed_tasks=(tuple(t.strip() for t in tasks.split(",") if t.strip()) if tasks is not None else None),
        )
