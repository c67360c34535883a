"""Who is asking: bearer JWTs, checked with pyjwt, and what they may see.

A token carries `sub`, `tenant` and `exp`; optionally `aud`, `scope` (with `admin`: every
tenant's jobs) and `jobs` (the only job ids it may touch). With `JOBWIRE_TENANCY=single`
there is one tenant: `tenant` may be left out, and every caller sees every job, the ones
published with no owner included (`Principal.single_tenant`); the admin scope still guards
admin endpoints, and `jobs` still narrows a token to its jobs. Keys: HS256 with
`JOBWIRE_JWT_SECRET`, or RS256/ES256 with a PEM public key or a JWKS file. Only the
configured algorithms are accepted, so `alg: none` and algorithm confusion are refused by
construction.

Single-job link tokens are minted here (HS256, `kid: jobwire-link`, with the link secret):
a page can be handed a token that watches one job and nothing else, for a few minutes.

Another tenant's job is answered exactly as an unknown id: `Principal.may_see()` is the
one rule, and every read, watch and revoke goes through it.
"""

from __future__ import annotations

import asyncio
import logging
import re
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jwt
from starlette.requests import HTTPConnection

from jobwire.protocol import JobwireError
from jobwire.settings import Settings

log = logging.getLogger(__name__)

LINK_KID = "jobwire-link"
_ASYMMETRIC = ["RS256", "RS384", "RS512", "ES256", "ES384", "ES512"]


@dataclass(frozen=True, slots=True)
class Principal:
    """The caller: a subject in a tenant, maybe an admin, maybe limited to some jobs."""

    subject: str
    tenant: str | None
    admin: bool = False
    jobs: frozenset[str] | None = None  # a single-job (link) token: these and nothing else
    expires: float | None = None
    single_tenant: bool = False  # JOBWIRE_TENANCY=single: every job is everyone's

    @property
    def sees_every_tenant(self) -> bool:
        """Whether owners do not limit this caller (listings and the all-jobs stream read
        every job's index and channel): an admin, or anyone on a single-tenant server."""
        return self.admin or self.single_tenant

    def may_see(self, job_id: str, owner_tenant: str | None) -> bool:
        if self.jobs is not None and job_id not in self.jobs:
            return False
        if self.sees_every_tenant:
            return True
        return owner_tenant is not None and owner_tenant == self.tenant


#: Everyone, in `JOBWIRE_AUTH=none` (development): sees every job.
DEVELOPER = Principal("developer", None, admin=True)


def unauthenticated(message: str) -> JobwireError:
    return JobwireError("unauthenticated", message)


def at_expiry(principal: Principal, callback: Callable[[], object]) -> asyncio.TimerHandle | None:
    """Call `callback` in the running loop when `principal`'s token expires; None for a
    principal without one (no auth, a token without `exp`). The caller cancels the handle
    when its stream ends. One timer per stream, no task: an idle stream costs little.

    Every stream ends there, whatever its transport (websockets close 4401, SSE streams
    end with an `unauthenticated` error), so a token cannot be used past its `exp` by
    holding a connection open. A token accepted within the verification leeway is
    already expired: its stream ends at once.
    """
    if principal.expires is None:
        return None
    loop = asyncio.get_running_loop()
    # `exp` is wall-clock time; the loop's clock is monotonic: convert once, now.
    return loop.call_at(loop.time() + principal.expires - time.time(), callback)


class Auth:
    """Verifies tokens and mints link tokens for one server (see module docstring)."""

    def __init__(self, settings: Settings) -> None:
        self.enabled = settings.auth == "jwt"
        self.single_tenant = settings.tenancy == "single"
        self.audience = settings.jwt_audience or None
        self.link_ttl = settings.link_token_ttl
        self._link_secret = settings.link_secret or settings.jwt_secret
        self._key: Any = None
        self._jwks: jwt.PyJWKSet | None = None
        self._algorithms: list[str] = []
        if settings.jwt_secret:
            self._key, self._algorithms = settings.jwt_secret, ["HS256"]
        elif settings.jwt_public_key_file:
            self._key, self._algorithms = Path(settings.jwt_public_key_file).read_text(), _ASYMMETRIC
        elif settings.jwks_file:
            self._jwks, self._algorithms = (
                jwt.PyJWKSet.from_json(Path(settings.jwks_file).read_text()),
                _ASYMMETRIC,
            )
        if not self.enabled:
            log.warning(
                "jobwire: JOBWIRE_AUTH=none: anyone who reaches this server can read, watch, submit "
                "and revoke every job. For development only; never expose it."
            )

    def verify(self, token: str) -> Principal:
        """The principal a token speaks for; `JobwireError` (unauthenticated) otherwise."""
        if not isinstance(token, str) or not token or len(token) > 8192:
            raise unauthenticated("a bearer token is required")
        try:
            header = jwt.get_unverified_header(token)
            if header.get("kid") == LINK_KID and self._link_secret:
                claims = self._decode(token, self._link_secret, ["HS256"])
                if not claims.get("jobs"):
                    raise unauthenticated("a link token names its job")
            else:
                key = (
                    self._jwks[header["kid"]].key if self._jwks is not None and "kid" in header else self._key
                )
                claims = self._decode(token, key, self._algorithms)
        except (jwt.PyJWTError, KeyError, ValueError) as exc:
            raise unauthenticated(f"invalid token: {_reason(exc)}") from None
        return _principal(claims, single_tenant=self.single_tenant)

    def _decode(self, token: str, key: Any, algorithms: list[str]) -> dict[str, Any]:
        if key is None:
            raise jwt.InvalidKeyError("no key for this token")
        return jwt.decode(  # type: ignore[no-any-return]
            token,
            key,
            algorithms=algorithms,
            audience=self.audience,
            options={"require": ["exp", "sub"], "verify_aud": self.audience is not None},
            leeway=5,
        )

    def principal(self, conn: HTTPConnection) -> Principal | None:
        """The caller of a request or websocket, from `Authorization: Bearer` or `?token=`;
        None when no token came (a websocket may still send one in its first message)."""
        if not self.enabled:
            return DEVELOPER
        token = bearer(conn.headers.get("authorization")) or conn.query_params.get("token")
        return self.verify(token) if token else None

    def require(self, conn: HTTPConnection) -> Principal:
        principal = self.principal(conn)
        if principal is None:
            raise unauthenticated("a bearer token is required (Authorization: Bearer …, or ?token=)")
        return principal

    def require_admin(self, conn: HTTPConnection) -> Principal:
        """The caller, who must hold the admin scope (a link token never does: it speaks
        for one job). 401 without a token, 403 with another one."""
        principal = self.require(conn)
        if not principal.admin or principal.jobs is not None:
            raise JobwireError("forbidden", "this needs the admin scope")
        return principal

    def mint_link(self, principal: Principal, job_id: str) -> tuple[str, float]:
        """A token that may watch `job_id` only, for `link_token_ttl` seconds.

        It speaks for the minter, narrowed to the job: the minter's tenant, or the admin
        scope of an admin (who may have no tenant), and `jobs`, which every check reads
        first (`may_see`, listings, actions, the all-jobs stream, admin endpoints), so an
        admin's link reaches its job and nothing else.
        """
        if not self._link_secret:
            raise JobwireError("forbidden", "link tokens need JOBWIRE_LINK_SECRET on this server", 403)
        expires = time.time() + self.link_ttl
        claims: dict[str, Any] = {
            "sub": principal.subject,
            "jobs": [job_id],
            "exp": int(expires),
            "jti": uuid.uuid4().hex,
        }
        if principal.tenant is not None:
            claims["tenant"] = principal.tenant
        if principal.admin:
            claims["scope"] = "admin"
        if self.audience:
            claims["aud"] = self.audience
        token = jwt.encode(claims, self._link_secret, algorithm="HS256", headers={"kid": LINK_KID})
        return token, float(int(expires))


def bearer(header: str | None) -> str | None:
    if header and header[:7].lower() == "bearer ":
        return header[7:].strip() or None
    return None


def _principal(claims: dict[str, Any], *, single_tenant: bool = False) -> Principal:
    sub, tenant = claims.get("sub"), claims.get("tenant")
    scope = claims.get("scope", "")
    scopes = set(scope.split()) if isinstance(scope, str) else set(scope if isinstance(scope, list) else [])
    admin = "admin" in scopes
    if not isinstance(sub, str) or not sub:
        raise unauthenticated("invalid token: `sub` must be a string")
    if tenant is not None and (not isinstance(tenant, str) or not tenant):
        raise unauthenticated("invalid token: `tenant` must be a non-empty string")
    if tenant is None and not admin and not single_tenant:
        raise unauthenticated("invalid token: `tenant` is required (or JOBWIRE_TENANCY=single on the server)")
    jobs = claims.get("jobs")
    if jobs is not None and (not isinstance(jobs, list) or not all(isinstance(j, str) for j in jobs)):
        raise unauthenticated("invalid token: `jobs` must be a list of job ids")
    exp = claims.get("exp")
    return Principal(
        sub,
        tenant,
        admin,
        frozenset(jobs) if jobs is not None else None,
        float(exp) if exp else None,
        single_tenant,
    )


def _reason(exc: Exception) -> str:
    return {
        jwt.ExpiredSignatureError: "it has expired",
        jwt.InvalidAudienceError: "wrong audience",
        jwt.InvalidSignatureError: "bad signature",
        jwt.InvalidAlgorithmError: "algorithm not allowed",
    }.get(type(exc), str(exc) or type(exc).__name__)


_TOKEN_IN_QUERY = re.compile(r"([?&]token=)[^&\s]*")


class RedactTokens(logging.Filter):
    """Keeps `?token=` values out of the access log (SSE and links carry tokens there)."""

    def filter(self, record: logging.LogRecord) -> bool:
        if isinstance(record.args, tuple):
            record.args = tuple(
                _TOKEN_IN_QUERY.sub(r"\1[redacted]", a) if isinstance(a, str) else a for a in record.args
            )
        return True
