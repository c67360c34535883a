"""Configuration for the worker and the server: `JOBWIRE_*` environment variables.

Parsed by pydantic-settings; `from_env()` turns its errors into one line per variable that
names it, the value and what was expected. Tests build a `Settings` with keyword
arguments (which win over the environment) instead of patching `os.environ`.
"""

from __future__ import annotations

import functools
import importlib.util
import ipaddress
from typing import Annotated, Any, Literal

from pydantic import Field, ValidationError, field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

from jobwire.protocol import Keys
from jobwire.redis_target import RedisTarget, parse_target

#: Said where the S3 store is asked for and boto3 is missing (it is the `s3` extra).
S3_MISSING = (
    "JOBWIRE_RESULT_STORE=s3 needs boto3, which is not installed: "
    "pip install 'jobwire[s3]' where the server and the workers run"
)

DEFAULT_REDIS_URL = "redis://127.0.0.1:6379/0"
DEMO_APP = "jobwire.tasks.demo:app"
DEFAULT_TASKS = (
    "long_running_task",
    "report_steps",
    "failing_task",
    "retrying_task",
    "charge_customer",
    "send_push_notification",
    "generate_report",
    "export_rows",
    "plain_sum",
)
TRANSPORTS = ("websocket", "sse", "polling")

ENV_PREFIX = "JOBWIRE_"


class SettingsError(ValueError):
    """An environment variable holds a value jobwire cannot use."""


CommaList = Annotated[tuple[str, ...], NoDecode]  # "a, b,c" in the environment


class Settings(BaseSettings):
    """Everything jobwire can be configured with (see README, "Configuration")."""

    model_config = SettingsConfigDict(
        env_prefix=ENV_PREFIX, frozen=True, extra="ignore", env_ignore_empty=True
    )

    # One Redis, the nodes of a Redis Cluster, or sentinels (see `jobwire.redis_target`).
    redis_url: str = DEFAULT_REDIS_URL
    # JOBWIRE_REDIS_URL names nodes of a Redis Cluster: jobwire's keys and events live on
    # the cluster (sharded pub/sub per job), Celery's results stay on its own Redis.
    redis_cluster: bool = False
    # Sentinel's name for the primary, with a sentinel:// JOBWIRE_REDIS_URL.
    redis_sentinel_master: str = ""
    broker_url: str = ""  # empty: same as redis_url
    key_prefix: Annotated[str, Field(min_length=1)] = "jobwire:"
    result_expires: Annotated[int, Field(ge=1)] = 86400

    # Limits
    history_limit: Annotated[int, Field(ge=1)] = 1000  # events kept per job; past it, old progress goes
    history_max: Annotated[int, Field(ge=1)] = 10000  # past it, old transitions go too (said as a gap)
    recent_limit: Annotated[int, Field(ge=1)] = 10000  # jobs kept in the recent-jobs index
    batch_max_ids: Annotated[int, Field(ge=1)] = 1000  # ids per batch-status call
    max_jobs_per_socket: Annotated[int, Field(ge=1)] = 1000
    client_queue_limit: Annotated[int, Field(ge=1)] = 1000  # events buffered per client before a resync
    send_buffer_bytes: Annotated[int, Field(ge=1024)] = 1 << 20  # queued for one client before 1013
    # Seconds a client may accept nothing (a send blocked, or a websocket ping unanswered)
    # before it is closed 1013. uvicorn's own ping timeout is set past it (see
    # `server.serving`), so a stalled client is always jobwire's to close.
    stall_timeout: Annotated[float, Field(gt=0)] = 15.0
    # The kernel's send buffer per websocket (SO_SNDBUF; 0 leaves it to the kernel, which
    # grows it to megabytes): what a slow reader has not taken waits in jobwire's queue,
    # where progress is coalesced, not in the kernel as a stale backlog.
    socket_send_buffer: Annotated[int, Field(ge=0)] = 64 * 1024
    # Which websocket protocol serves: "lean", jobwire's own (`server.lean_ws`: what an idle
    # websocket holds, and no more), or "uvicorn", uvicorn's websockets-sansio (a fallback).
    ws_protocol: Literal["lean", "uvicorn"] = "lean"
    redis_max_connections: Annotated[int, Field(ge=2)] = (
        64  # server's pool for reads; requests queue beyond it
    )

    # Timeouts
    record_retry_seconds: Annotated[float, Field(gt=0)] = 20.0  # a worker retries a write this long
    heartbeat_interval: Annotated[float, Field(gt=0)] = 15.0  # seconds between heartbeats to clients
    subscribe_timeout: Annotated[float, Field(gt=0)] = 5.0  # how long a subscribe waits for Redis

    # The Celery app the server submits and revokes through (`package.module:attribute`).
    celery_app: str = DEMO_APP
    # Tasks `POST /api/v1/jobs` may submit. None: the demo's tasks for the demo app, and
    # none at all for an app of yours until you name them.
    allowed_tasks: Annotated[tuple[str, ...] | None, NoDecode] = None
    # Result backends of Celery apps that never imported jobwire, followed through what
    # Celery publishes: `redis://host:port/db#prefix=<global_keyprefix>&tenant=<owner>`.
    celery_backends: CommaList = ()
    # Which push transports the server offers (polling always works). Turning websocket
    # off behaves like a proxy that refuses the upgrade: clients fall back.
    transports: CommaList = TRANSPORTS

    # Authentication (see README, "Authentication"). "none" is for development only.
    auth: Literal["none", "jwt"] = "none"
    jwt_secret: str = ""  # HS256
    jwt_public_key_file: str = ""  # a PEM public key: RS256 or ES256
    jwks_file: str = ""  # a JWKS document: keys chosen by the token's `kid`
    jwt_audience: str = ""  # when set, tokens must carry it in `aud`
    # "single": one tenant, so a token needs no `tenant` and every authenticated caller
    # sees every job (owner-less ones too); admin endpoints still need the admin scope.
    tenancy: Literal["multi", "single"] = "multi"
    link_secret: str = ""  # signs single-job link tokens (default: jwt_secret)
    link_token_ttl: Annotated[int, Field(ge=10)] = 600  # seconds a link token lives
    auth_timeout: Annotated[float, Field(gt=0)] = 5.0  # seconds a /ws client has to authenticate
    allowed_origins: CommaList = ()  # browser origins besides the server's own

    # Large results (see README, "Large results")
    result_store: Literal["file", "s3"] = "file"
    result_dir: str = ".run/results"  # the file store's directory: server and workers share it
    result_offload_bytes: Annotated[int, Field(ge=1)] = 256 * 1024  # results bigger than this are stored
    result_url_ttl: Annotated[int, Field(ge=10)] = 300  # seconds a presigned download URL lives
    s3_bucket: str = ""
    s3_prefix: str = "jobwire/"
    s3_endpoint_url: str = ""  # any S3-compatible service
    s3_region: str = ""
    s3_access_key_id: str = ""
    s3_secret_access_key: str = ""

    # Abuse limits
    max_connections_per_user: Annotated[int, Field(ge=1)] = 200
    max_connections_per_address: Annotated[int, Field(ge=1)] = 500
    new_connections_per_second: Annotated[float, Field(gt=0)] = 20.0  # per address, bursts of twice that
    submits_per_minute: Annotated[int, Field(ge=1)] = 60  # per user
    ws_messages_per_second: Annotated[float, Field(gt=0)] = 20.0  # per socket, bursts of twice that
    max_frame_bytes: Annotated[int, Field(ge=1024)] = 64 * 1024  # a websocket message
    max_header_bytes: Annotated[int, Field(ge=4096)] = 16 * 1024  # an HTTP request's headers (431)
    # A request's URL (414): room for a multiplexed SSE stream of 200 jobs with seqs and epochs.
    # A websocket upgrade's request line is held to websockets' 8,192 bytes as well.
    max_url_bytes: Annotated[int, Field(ge=1024)] = 64 * 1024

    # Addresses of reverse proxies whose X-Forwarded-For / X-Forwarded-Proto are believed
    # (IPs or networks, comma-separated; `*` trusts everyone). Empty: none, so no client
    # can spoof its address past the per-address limits.
    forwarded_allow_ips: CommaList = ()

    # Where `/metrics` is served instead of the main port: `host:port` (`[::1]:9100` for
    # IPv6), for operators' scrapers, on an interface clients cannot reach. Empty: on the
    # main port, for the admin scope when authentication is on.
    metrics_addr: str = ""

    @model_validator(mode="after")
    def _redis_target(self) -> Settings:
        try:
            self.redis_target  # noqa: B018 (parsed now: a wrong URL is one line at start)
        except ValueError as exc:
            raise ValueError(f"JOBWIRE_REDIS_URL {exc}") from None
        return self

    @model_validator(mode="after")
    def _s3_has_a_bucket(self) -> Settings:
        if self.result_store == "s3" and not self.s3_bucket:
            raise ValueError("JOBWIRE_RESULT_STORE=s3 needs JOBWIRE_S3_BUCKET")
        if self.result_store == "s3" and importlib.util.find_spec("boto3") is None:
            raise ValueError(S3_MISSING)
        return self

    @model_validator(mode="after")
    def _auth_has_a_key(self) -> Settings:
        if self.auth == "jwt" and not (self.jwt_secret or self.jwt_public_key_file or self.jwks_file):
            raise ValueError(
                "JOBWIRE_AUTH=jwt needs a key: JOBWIRE_JWT_SECRET (HS256), "
                "JOBWIRE_JWT_PUBLIC_KEY_FILE (RS256/ES256) or JOBWIRE_JWKS_FILE"
            )
        return self

    @field_validator("celery_backends")
    @classmethod
    def _backend_urls(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        from jobwire.foreign import ForeignBackend  # checks each one now, at start

        for spec in value:
            ForeignBackend.parse(spec)
        return value

    @field_validator(
        "allowed_tasks",
        "transports",
        "allowed_origins",
        "celery_backends",
        "forwarded_allow_ips",
        mode="before",
    )
    @classmethod
    def _comma_separated(cls, value: Any) -> Any:
        if isinstance(value, str):
            return tuple(t.strip() for t in value.split(",") if t.strip())
        return value

    @field_validator("transports")
    @classmethod
    def _known_transports(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        unknown = set(value) - set(TRANSPORTS)
        if unknown:
            raise ValueError(f"has unknown {sorted(unknown)}; choose from {list(TRANSPORTS)}")
        return value

    @field_validator("forwarded_allow_ips")
    @classmethod
    def _addresses(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        for item in value:
            if item != "*":
                try:
                    ipaddress.ip_network(item, strict=False)
                except ValueError:
                    raise ValueError(f"has {item!r}, which is no IP address or network (or *)") from None
        return value

    @field_validator("metrics_addr")
    @classmethod
    def _host_port(cls, value: str) -> str:
        if value:
            split_address(value)
        return value

    @property
    def metrics_listen(self) -> tuple[str, int] | None:
        """`metrics_addr` as (host, port), or None: `/metrics` on the main port."""
        return split_address(self.metrics_addr) if self.metrics_addr else None

    @property
    def submittable(self) -> tuple[str, ...]:
        if self.allowed_tasks is not None:
            return self.allowed_tasks
        return DEFAULT_TASKS if self.celery_app == DEMO_APP else ()

    @property
    def effective_broker_url(self) -> str:
        return self.broker_url or self.redis_url

    @property
    def redis_target(self) -> RedisTarget:
        """`redis_url` parsed: one Redis, a cluster's seed nodes, or Sentinel's primary."""
        return _target(self.redis_url, self.redis_cluster, self.redis_sentinel_master)

    @property
    def keys(self) -> Keys:
        return Keys(self.key_prefix)

    @classmethod
    def from_env(cls, **overrides: Any) -> Settings:
        """The environment's settings (with `overrides`); `SettingsError` names what is wrong."""
        try:
            return cls(**overrides)
        except ValidationError as exc:
            raise SettingsError("; ".join(_explain(e) for e in exc.errors())) from None


@functools.lru_cache(maxsize=16)
def _target(url: str, cluster: bool, master: str) -> RedisTarget:
    return parse_target(url, cluster=cluster, sentinel_master=master)


def split_address(value: str) -> tuple[str, int]:
    """`host:port` (`[v6]:port`) as (host, port); ValueError saying what was expected."""
    host, sep, port = value.rpartition(":")
    host = host[1:-1] if host.startswith("[") and host.endswith("]") else host
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"must be host:port (e.g. 127.0.0.1:9100), got {value!r}")
    return host, int(port)


def _explain(error: Any) -> str:
    """One pydantic error as the line a user sees: the variable, the value, the rule."""
    if not error["loc"]:  # a rule across variables: its message names them
        return str((error.get("ctx") or {}).get("error", error["msg"]))
    name = ENV_PREFIX + str(error["loc"][0]).upper()
    value, ctx, kind = error.get("input"), error.get("ctx") or {}, error["type"]
    if kind == "int_parsing":
        return f"{name} must be an integer, got {value!r}"
    if kind == "float_parsing":
        return f"{name} must be a number, got {value!r}"
    if kind in ("greater_than_equal", "greater_than"):
        sign, bound = (">=", ctx["ge"]) if "ge" in ctx else (">", ctx["gt"])
        return f"{name} must be {sign} {bound:g}, got {value}"
    if kind == "string_too_short":
        return f"{name} must not be empty"
    if kind == "value_error":
        return f"{name} {ctx['error']}"
    return f"{name}: {error['msg']}, got {value!r:.80}"
