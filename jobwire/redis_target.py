"""Which Redis jobwire talks to: one server, a Redis Cluster, or a primary that Sentinel names.

`JOBWIRE_REDIS_URL` says it in one value, parsed here with no I/O so a wrong value is one
line at start (`Settings`), never a traceback from a client library later:

- one server: `redis://[user:password@]host:port[/db]`, `rediss://…`, `unix:///path?db=N`;
- a cluster (`JOBWIRE_REDIS_CLUSTER=1`): one node or several, so the server starts while
  any of them answers: `redis://[user:password@]host1:port1,host2:port2,…` (each part may
  also be a whole `redis://` URL);
- Sentinel: Celery's form, `sentinel://[:password@]host:port[/db];sentinel://host2:port2…`
  (commas work too), with the master's name in `JOBWIRE_REDIS_SENTINEL_MASTER`. As in
  Celery, the password is the primary's; the sentinels themselves are asked without one.

The clients built from a target live in `jobwire.redis_clients`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal
from urllib.parse import parse_qs, quote, unquote, urlsplit

Mode = Literal["single", "cluster", "sentinel"]

_SCHEMES = ("redis", "rediss", "unix", "sentinel")


@dataclass(frozen=True)
class RedisTarget:
    """A parsed `JOBWIRE_REDIS_URL` (see module docstring)."""

    mode: Mode
    url: str  # as given (for one server, what redis-py connects to)
    nodes: tuple[tuple[str, int], ...] = ()  # cluster seed nodes, or the sentinels
    master: str = ""  # Sentinel's name for the primary
    db: int = 0
    username: str | None = None
    password: str | None = None
    tls: bool = False

    def node_url(self, host: str, port: int) -> str:
        """A `redis://` URL for one node of a cluster, or Sentinel's current primary, with
        this target's credentials and database."""
        auth = ""
        if self.password is not None:
            auth = f"{quote(self.username or '', safe='')}:{quote(self.password, safe='')}@"
        elif self.username:
            auth = f"{quote(self.username, safe='')}@"
        return f"{'rediss' if self.tls else 'redis'}://{auth}{_host(host)}:{port}/{self.db}"

    def describe(self) -> str:
        """Where this points, for logs and errors (no password)."""
        where = ", ".join(f"{h}:{p}" for h, p in self.nodes)
        if self.mode == "cluster":
            return f"the Redis Cluster at {where}"
        if self.mode == "sentinel":
            return f"Sentinel's primary {self.master!r} (sentinels {where})"
        parts = urlsplit(self.url)
        port = f":{parts.port}" if parts.port else ""
        return f"{parts.scheme}://{parts.hostname or ''}{port}{parts.path}"


def parse_target(url: str, *, cluster: bool = False, sentinel_master: str = "") -> RedisTarget:
    """`url` as a `RedisTarget`; `ValueError` with one line that says what is wrong."""
    url = url.strip()
    scheme = url.split("://", 1)[0].lower() if "://" in url else ""
    if scheme not in _SCHEMES:
        raise ValueError(
            f"{_shown(url)!r} is not a Redis URL: use redis://host:port/db, rediss://…, unix://…, "
            "or sentinel://host:port;sentinel://host:port (with JOBWIRE_REDIS_SENTINEL_MASTER)"
        )
    if scheme == "sentinel":
        if cluster:
            raise ValueError(
                "a sentinel:// URL names a Sentinel setup, not a Redis Cluster: unset JOBWIRE_REDIS_CLUSTER"
            )
        if not sentinel_master:
            raise ValueError("a sentinel:// URL needs the primary's name in JOBWIRE_REDIS_SENTINEL_MASTER")
        return _many(url, "sentinel", sentinel_master, default_port=26379)
    if sentinel_master:
        raise ValueError("JOBWIRE_REDIS_SENTINEL_MASTER is set, but the URL is not a sentinel:// one")
    if cluster:
        if scheme == "unix":
            raise ValueError("a Redis Cluster is reached over TCP: give redis://host:port of its nodes")
        target = _many(url, "cluster", "", default_port=6379)
        if target.db != 0:
            raise ValueError(f"a Redis Cluster has database 0 only, not {target.db}")
        return target
    if len(_addresses(url)) > 1:
        raise ValueError(
            "several addresses are for a Redis Cluster (set JOBWIRE_REDIS_CLUSTER=1) or Sentinel "
            "(sentinel://…); one Redis takes one URL"
        )
    first = _split(url, default_port=6379)
    return RedisTarget("single", url, (), "", first.db, first.username, first.password, scheme == "rediss")


@dataclass(frozen=True)
class _Part:
    host: str
    port: int
    db: int
    username: str | None
    password: str | None


def _many(url: str, mode: Mode, master: str, *, default_port: int) -> RedisTarget:
    """A list of nodes: whole URLs or bare `host:port`s, separated by `,` or `;`; the
    credentials, TLS and database come from the first."""
    chunks = _addresses(url)
    scheme = url.split("://", 1)[0].lower()
    parts: list[_Part] = []
    for chunk in chunks:
        if "://" not in chunk:
            chunk = f"{scheme}://{chunk}"
        elif chunk.split("://", 1)[0].lower() != scheme:
            raise ValueError(f"{_shown(chunk)!r}: every address must use {scheme}://")
        parts.append(_split(chunk, default_port=default_port))
    first = parts[0]
    nodes = tuple(dict.fromkeys((p.host, p.port) for p in parts))
    return RedisTarget(mode, url, nodes, master, first.db, first.username, first.password, scheme == "rediss")


def _addresses(url: str) -> list[str]:
    """The addresses in `url`, split at `,` or `;`, except inside a password (which may
    hold either): an address's credentials end at its last `@` before the next scheme."""
    pieces: list[str] = []
    rest = url
    while rest:
        scheme = rest.find("://")
        following = rest.find("://", scheme + 3) if scheme >= 0 else -1
        at = rest.rfind("@", 0, following if following >= 0 else len(rest))
        cuts = [i for i in (rest.find(",", at + 1), rest.find(";", at + 1)) if i >= 0]
        cut = min(cuts, default=len(rest))
        pieces.append(rest[:cut])
        rest = rest[cut + 1 :]
    return [p.strip() for p in pieces if p.strip()]


def _split(url: str, *, default_port: int) -> _Part:
    try:
        parts = urlsplit(url)
        port = parts.port or default_port
    except ValueError:  # not the parser's words: they can quote a piece of the password
        host = url.partition("://")[2].rpartition("@")[2].split(":", 1)[0]
        raise ValueError(f"has an address with no valid port (host {host!r})") from None
    if parts.scheme == "unix":
        if not parts.path:
            raise ValueError(f"{_shown(url)!r} names no socket path")
        db_text = parse_qs(parts.query).get("db", ["0"])[0]
    else:
        if not parts.hostname:
            raise ValueError(f"{_shown(url)!r} names no host")
        db_text = parts.path.strip("/") or parse_qs(parts.query).get("db", ["0"])[0]
    if not db_text.isdigit():
        raise ValueError(f"{_shown(url)!r}: the database must be a number, not {db_text!r}")
    return _Part(
        parts.hostname or "",
        port,
        int(db_text),
        unquote(parts.username) if parts.username else None,
        unquote(parts.password) if parts.password is not None else None,
    )


def _host(host: str) -> str:
    return f"[{host}]" if ":" in host else host


def _shown(url: str) -> str:
    """`url` with any password masked, for error messages."""
    out = []
    for chunk in _addresses(url):
        scheme, sep, rest = chunk.partition("://")
        if "@" in rest:
            auth, _, tail = rest.rpartition("@")
            user = auth.split(":", 1)[0]
            chunk = f"{scheme}{sep}{user}:***@{tail}" if ":" in auth else chunk
        out.append(chunk)
    return ",".join(out)
