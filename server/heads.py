"""Request heads past jobwire's limits get a prompt JSON answer: 414 for a long URL, 431
for big headers, counted with the other refusals (`jobwire_refused_connections_total`).

Why here and not in a route: uvicorn's httptools protocol collects a URL and headers of
any size, and answers what its parser gives up on with a `text/plain` 400. A websocket
upgrade is worse: uvicorn hands it to websockets' handshake parser, which takes request
and header lines of at most 8,192 bytes and at most 128 headers, and past those answers
nothing at all, so the client waits for its own timeout (90 s, measured) outside any
accounting. `HttpProtocol` checks as the head arrives and answers itself; `HeadLimit`
(ASGI middleware) holds the same limits under any other server.
"""

from __future__ import annotations

from http import HTTPStatus
from typing import Any

import orjson
from websockets import http11

from jobwire.protocol import Disconnects, JobwireError
from jobwire.server.direct import TRANSPORT

try:
    from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol
except ImportError:  # pragma: no cover - no httptools: uvicorn's h11 and `HeadLimit` only
    HttpToolsProtocol = None  # type: ignore[assignment,misc]

LINGER = 2.0  # seconds a refused connection is read (and discarded) before it is closed


def url_too_long(limit: int) -> JobwireError:
    return JobwireError("url_too_long", f"request URL over {limit} bytes")


def headers_too_large(limit: int) -> JobwireError:
    return JobwireError("headers_too_large", f"request headers over {limit} bytes")


def _body(error: JobwireError) -> bytes:
    return orjson.dumps({"error": {"code": error.code, "message": error.message}})


def _count(app: Any, error: JobwireError) -> None:
    """Count the refusal in the app's metrics (the app found through uvicorn's and
    Starlette's wrappers); nothing before the lifespan has built them."""
    while app is not None and not hasattr(app, "state"):
        app = getattr(app, "app", None)
    services = getattr(getattr(app, "state", None), "jobwire", None)
    if services is not None:
        services.metrics.rejected.labels(error.code).inc()


class HeadLimit:
    """ASGI middleware: a request or websocket whose URL is over `max_url` bytes (414) or
    whose headers are over `max_headers` bytes (431) is answered with the JSON error,
    before the upgrade for a websocket. `HttpProtocol` answers these sooner under uvicorn;
    this holds under any server."""

    def __init__(self, app: Any, max_url: int, max_headers: int) -> None:
        self.app, self.max_url, self.max_headers = app, max_url, max_headers

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] in ("http", "websocket"):
            error = None
            if len(scope.get("raw_path") or b"") + len(scope.get("query_string", b"")) + 1 > self.max_url:
                error = url_too_long(self.max_url)
            elif sum(len(k) + len(v) + 4 for k, v in scope.get("headers", ())) > self.max_headers:
                error = headers_too_large(self.max_headers)
            if error is not None:
                _count(scope.get("app"), error)
                await _answer(scope, send, error)
                return
        await self.app(scope, receive, send)


async def _answer(scope: dict[str, Any], send: Any, error: JobwireError) -> None:
    body = _body(error)
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    prefix = "http"
    if scope["type"] == "websocket":
        if "websocket.http.response" not in scope.get("extensions", {}):
            # The server can say no more before the upgrade than a close (HTTP 403 to the client).
            too_big = Disconnects.TOO_BIG.because(error.message)
            await send({"type": "websocket.close", "code": too_big.code, "reason": too_big.reason})
            return
        prefix = "websocket.http"
    await send({"type": f"{prefix}.response.start", "status": error.status, "headers": headers})
    await send({"type": f"{prefix}.response.body", "body": body})


if HttpToolsProtocol is not None:

    class HttpProtocol(HttpToolsProtocol):  # type: ignore[misc,valid-type]
        """uvicorn's httptools protocol, answering heads past the limits with JSON at once.

        The URL is checked as it arrives (`on_url`), the headers as each one is complete,
        and the bytes of a head still arriving are bounded too (httptools buffers a header
        until it ends). A websocket upgrade is also checked against what websockets'
        handshake parser takes (past it, uvicorn would answer nothing). Any other request
        httptools cannot parse gets the JSON 400. A refused connection is half-closed after
        the answer and read for `LINGER` seconds, so a client still sending its head gets
        the answer rather than a reset. Each request's scope gets the connection's
        transport (`direct.TRANSPORT`), so a stream stalled behind a client that reads
        nothing can be cut off. Give uvicorn `HttpProtocol.limited(max_url, max_headers)`.
        """

        max_url = 64 * 1024
        max_headers = 16 * 1024

        @classmethod
        def limited(cls, max_url: int, max_headers: int) -> type[HttpProtocol]:
            """This protocol with these limits (uvicorn builds protocols from a class)."""
            return type(cls.__name__, (cls,), {"max_url": max_url, "max_headers": max_headers})

        def __init__(self, *args: Any, **kwargs: Any) -> None:
            super().__init__(*args, **kwargs)
            self._head_bytes, self._header_bytes, self._in_head = 0, 0, True
            self._refused: JobwireError | None = None  # answered: the connection is done
            self._stopped: JobwireError | None = None  # raised from a parser callback

        def data_received(self, data: bytes) -> None:
            if self._refused is not None:
                return  # the answer is out; what follows is discarded
            if self._in_head:
                self._head_bytes += len(data)
            super().data_received(data)
            bound = self.max_url + self.max_headers + 4096
            if self._refused is None and self._in_head and self._head_bytes > bound:
                self._refuse(headers_too_large(self.max_headers))

        def on_message_begin(self) -> None:
            super().on_message_begin()
            self._in_head, self._header_bytes = True, 0

        def on_url(self, url: bytes) -> None:
            super().on_url(url)
            if len(self.url) > self.max_url:
                self._stop(url_too_long(self.max_url))

        def on_header(self, name: bytes, value: bytes) -> None:
            self._header_bytes += len(name) + len(value) + 4
            if self._header_bytes > self.max_headers:
                self._stop(headers_too_large(self.max_headers))
            super().on_header(name, value)

        def on_headers_complete(self) -> None:
            self._in_head, self._head_bytes = False, 0
            # For a stream stalled behind a client that reads nothing (see routes.sse)
            self.scope[TRANSPORT] = self.transport  # type: ignore[literal-required]
            super().on_headers_complete()

        def _stop(self, error: JobwireError) -> None:
            """Stop parsing: httptools turns the exception into a parser error, which
            uvicorn answers through `send_400_response`, where `error` is answered."""
            self._stopped = error
            raise _Refused(error.message)

        def send_400_response(self, msg: str) -> None:
            # uvicorn's answer to any parser error, a limit of ours included
            self._refuse(self._stopped or JobwireError("bad_request", f"malformed HTTP request: {msg}"))

        def _refuse(self, error: JobwireError) -> None:
            if self._refused is not None:
                return
            self._refused = error
            if error.code != "bad_request":
                _count(self.app, error)
            self.transport.write(_response(error))
            if self.transport.can_write_eof():
                self.transport.write_eof()
            self.loop.call_later(LINGER, self.transport.close)

        def handle_websocket_upgrade(self) -> None:
            # What websockets' handshake parser takes: each line (CRLF included) of at most
            # MAX_LINE_LENGTH bytes, at most MAX_NUM_HEADERS headers.
            line = http11.MAX_LINE_LENGTH
            if len(self.scope["method"]) + len(self.url) + len(" HTTP/1.1\r\n") + 1 > line:
                self._refuse(JobwireError("url_too_long", f"websocket request line over {line} bytes"))
                return
            headers = self.scope["headers"]
            if len(headers) > http11.MAX_NUM_HEADERS or any(len(k) + len(v) + 4 > line for k, v in headers):
                message = f"websocket header line over {line} bytes, or over {http11.MAX_NUM_HEADERS} headers"
                self._refuse(JobwireError("headers_too_large", message))
                return
            super().handle_websocket_upgrade()

    class _Refused(Exception):
        """A head past a limit, raised from a parser callback (see `HttpProtocol._stop`)."""

    def _response(error: JobwireError) -> bytes:
        """The error as a whole HTTP/1.1 response, the connection closing after it."""
        body = _body(error)
        phrase = HTTPStatus(error.status).phrase.encode()
        head = b"HTTP/1.1 %d %s\r\ncontent-type: application/json\r\ncontent-length: %d\r\n" % (
            error.status,
            phrase,
            len(body),
        )
        return head + b"connection: close\r\n\r\n" + body

else:  # pragma: no cover
    HttpProtocol = None  # type: ignore[assignment,misc]

__all__ = ["HeadLimit", "HttpProtocol", "headers_too_large", "url_too_long"]
