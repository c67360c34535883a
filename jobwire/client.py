"""Python client for other services: watch jobs over websockets, submit and poll over HTTP.

    async for event in watch(job_id, url="http://jobwire:8000"):
        print(event["state"], event["progress"])

`watch()` reconnects by itself with capped exponential backoff and jitter, resuming from
the last seq it yielded, so a dropped connection or a server restart costs no transition
and repeats no event (progress the server coalesced for a slow reader comes as the newest
event, with `coalesced: n`). It ends after the job's final event. If the job's history was lost and
began again (Redis restarted without persistence), the new history's events follow: seq
starts at 1 again, under a new `epoch`.

Tokens expire, and a stream ends at its token's `exp` (close 4401 "token expired"). Give
`token` as a function (sync or async) instead of a string and it is asked again before
every connection, so `watch()` comes back at once with a new token and resumes from its
last seq; a fixed string cannot be renewed, and its expiry raises.
"""

from __future__ import annotations

import asyncio
import email.utils
import inspect
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from typing import Any, TypeAlias
from urllib.parse import quote

import httpx
import orjson
import websockets
from websockets.exceptions import ConnectionClosed, InvalidHandshake, InvalidStatus

from jobwire.backoff import backoff, not_before
from jobwire.protocol import TOKEN_EXPIRED, Close, JobNotFound, JobwireError, Msg

__all__ = ["DEFAULT_URL", "JobNotFound", "Jobwire", "JobwireError", "Token", "watch"]

DEFAULT_URL = "http://127.0.0.1:8000"
#: Refusals that mean "later" (too many connections, overloaded): retried, after the
#: server's `Retry-After` when it sends one. Any other 4xx refuses the websocket for good.
RETRYABLE_STATUS = frozenset({408, 429, 502, 503, 504})


#: A bearer token, or a function (sync or async) that returns the current one: asked again
#: before every websocket connection and every REST call, so it should hand out a cached
#: token until that one is about to expire.
Token: TypeAlias = str | Callable[[], str | Awaitable[str]] | None


async def _bearer(token: Token) -> dict[str, str] | None:
    value = token() if callable(token) else token
    if inspect.isawaitable(value):
        value = await value
    return {"Authorization": f"Bearer {value}"} if value else None


def _expired(reason: str) -> bool:
    """A 4401 for a token past its `exp`: at expiry mid-stream, or already at the upgrade."""
    return reason == TOKEN_EXPIRED or reason.endswith("has expired")


def _ws_url(url: str) -> str:
    url = url.rstrip("/")
    if url.startswith("https://"):
        return "wss://" + url[len("https://") :]
    if url.startswith("http://"):
        return "ws://" + url[len("http://") :]
    return url


async def watch(
    job_id: str,
    url: str = DEFAULT_URL,
    *,
    since: int = 0,
    token: Token = None,
    # Timeouts
    open_timeout: float = 5.0,
    backoff_min: float = 0.2,
    backoff_max: float = 10.0,
    give_up_after: float | None = None,
    lost_grace: float = 60.0,
) -> AsyncIterator[dict[str, Any]]:
    """Yield `job_id`'s events after `since`, in order, once each, until the final one.

    `token` is a bearer token (a link token for this job will do), or a function (sync
    or async) that returns one, asked again before each connection: when the token
    expires mid-job the server closes 4401 "token expired", and `watch()` asks for a new
    one and resumes from its last seq at once. Raises `JobNotFound` if the server does
    not know the job (or it is not the token's), `JobwireError` for a token it refuses (a
    fixed token's expiry included), or any other refusal for good (an Origin, websockets
    turned off),
    and `ConnectionError` if it cannot be reached, or keeps refusing, for `give_up_after`
    seconds (default: keep trying). A refusal for load (HTTP 429 or 503 before the
    upgrade, a close 1013 after it) means "later": it is retried with the backoff, and
    not before the server's `Retry-After`.
    """
    last, epoch = since, None
    lost_since: float | None = None
    delays = backoff(backoff_min, backoff_max)
    loop = asyncio.get_running_loop()
    failing_since: float | None = None
    while True:
        close_code, close_reason, retry_after, served = None, "", None, False
        headers = await _bearer(token)
        try:
            async with websockets.connect(
                f"{_ws_url(url)}/ws/jobs/{_path(job_id)}?since={last}" + (f"&epoch={epoch}" if epoch else ""),
                open_timeout=open_timeout,
                additional_headers=headers,
            ) as ws:
                try:
                    async for frame in ws:
                        served = True
                        if failing_since is not None:
                            # Served, not just accepted (a socket closed 1013 at once, for
                            # load, is a failure to back off from): the next outage
                            # starts from the shortest delay again.
                            failing_since, delays = None, backoff(backoff_min, backoff_max)
                        msg = orjson.loads(frame)
                        if msg.get("type") == Msg.RESET:  # history lost and begun again
                            last, epoch = 0, msg.get("epoch")
                            continue
                        if msg.get("type") != Msg.EVENT or msg["seq"] <= last:
                            continue
                        last, epoch = msg["seq"], msg.get("epoch", epoch)
                        del msg["type"]
                        yield msg
                        if msg["final"]:
                            return
                finally:
                    close_code, close_reason = ws.close_code, ws.close_reason or ""
        except InvalidStatus as exc:
            status = exc.response.status_code
            if status in RETRYABLE_STATUS:  # "later": too many connections, overloaded
                retry_after = _retry_after(exc.response.headers.get("Retry-After"))
            elif 400 <= status < 500:  # refused for good (e.g. websockets turned off, an Origin)
                raise JobwireError(
                    "websocket_refused", f"server refused the websocket: HTTP {status}", status
                ) from None
        except (OSError, TimeoutError, ConnectionClosed, InvalidHandshake):
            pass  # down, restarting or unreachable: retry below
        if close_code == Close.NOT_FOUND:
            # A job this client has seen events of can vanish for a while: Redis restarted
            # without persistence, and the worker's next event recreates it (a new epoch).
            # Keep trying for `lost_grace` seconds before believing it is gone.
            now = loop.time()
            lost_since = lost_since if lost_since is not None else now
            if epoch is None or now - lost_since > lost_grace:
                raise JobNotFound(job_id, close_reason or None)
        else:
            lost_since = None
        if close_code == Close.BAD_REQUEST:
            raise JobwireError("invalid_request", close_reason)
        if close_code == Close.UNAUTHENTICATED and callable(token) and _expired(close_reason):
            if served:
                continue  # the token ran out mid-stream: a new one, and resume, at once
            # else: the function handed out an expired token; ask again after the backoff
        elif close_code in (Close.UNAUTHENTICATED, Close.FORBIDDEN):
            code = "unauthenticated" if close_code == Close.UNAUTHENTICATED else "forbidden"
            raise JobwireError(code, close_reason)
        now = loop.time()
        failing_since = failing_since if failing_since is not None else now
        if give_up_after is not None and now - failing_since > give_up_after:
            raise ConnectionError(f"jobwire at {url} unreachable for {give_up_after}s")
        await asyncio.sleep(not_before(retry_after, next(delays)))


class Jobwire:
    """HTTP calls to a jobwire server: submit, status, batch status, revoke."""

    def __init__(self, url: str = DEFAULT_URL, *, token: Token = None, timeout: float = 10.0) -> None:
        """`token`: a bearer token, or a function (sync or async) asked for one before
        each call (see `Token`)."""
        self.url = url.rstrip("/")
        self._token = token
        self._http = httpx.AsyncClient(base_url=self.url, timeout=timeout)

    async def __aenter__(self) -> Jobwire:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        await self._http.aclose()

    async def _call(self, method: str, path: str, **kwargs: Any) -> Any:
        try:
            resp = await self._http.request(method, path, headers=await _bearer(self._token), **kwargs)
        except httpx.TransportError as exc:
            raise ConnectionError(f"jobwire at {self.url} unreachable: {exc}") from None
        body = orjson.loads(resp.content) if resp.content else None
        if resp.is_error:
            err = (body or {}).get("error", {}) if isinstance(body, dict) else {}
            code, message = err.get("code", "http_error"), err.get("message", resp.text)
            if code == "job_not_found":
                raise JobNotFound(path.rsplit("/", 1)[-1], message)
            retry_after = _retry_after(resp.headers.get("Retry-After"))  # when a 429/503 says
            raise JobwireError(code, message, resp.status_code, retry_after=retry_after)
        return body

    async def submit(self, task: str, *args: Any, **kwargs: Any) -> str:
        """Submit an allowed task; return its job id."""
        body = await self._call(
            "POST", "/api/v1/jobs", json={"task": task, "args": list(args), "kwargs": kwargs}
        )
        return str(body["job_id"])

    async def status(self, job_id: str) -> dict[str, Any]:
        return await self._call("GET", f"/api/v1/jobs/{_path(job_id)}")  # type: ignore[no-any-return]

    async def batch_status(self, job_ids: Sequence[str]) -> dict[str, dict[str, Any]]:
        body = await self._call("POST", "/api/v1/jobs/batch-status", json={"job_ids": list(job_ids)})
        return body["jobs"]  # type: ignore[no-any-return]

    async def revoke(self, job_id: str) -> dict[str, Any]:
        return await self._call("DELETE", f"/api/v1/jobs/{_path(job_id)}")  # type: ignore[no-any-return]

    async def link_token(self, job_id: str) -> dict[str, Any]:
        """A short-lived token (and links) that may watch `job_id` and nothing else."""
        return await self._call("POST", f"/api/v1/jobs/{_path(job_id)}/token")  # type: ignore[no-any-return]

    async def tasks(self) -> list[dict[str, str]]:
        return (await self._call("GET", "/api/v1/tasks"))["tasks"]  # type: ignore[no-any-return]


def _retry_after(value: str | None) -> float | None:
    """`Retry-After` in seconds: a number of seconds, or an HTTP date."""
    if not value:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(0.0, when.timestamp() - time.time())


def _path(job_id: str) -> str:
    """A job id as one URL path segment: any id Celery takes, '/' included."""
    return quote(job_id, safe="")
