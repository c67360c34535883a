"""`jobwire.mint_token()`: the bearer tokens a jobwire server accepts, made in Python.

An app whose backend signs its users in usually hands its front end a short-lived token
for jobwire: a view returns `mint_token(user.id, user.org_id, ttl=300)`, and the browser
client's `token` function fetches it again at every reconnect (see README,
"Authentication and tenants"). Writing the claims by hand is where `tenant` goes missing
or `aud` is misspelt, and the server then answers 401 with no hint on the minting side;
this function writes the claims the server checks (`server/auth.py`), and refuses, with
the reason, what the server would refuse.

HS256 with `JOBWIRE_JWT_SECRET` only: with RS256/ES256 keys (`JOBWIRE_JWT_PUBLIC_KEY_FILE`,
`JOBWIRE_JWKS_FILE`) the private key is your identity provider's, and so is the minting.

It reads `jobwire.settings` and pyjwt, never the server's package: a Django or Flask
backend can mint without importing Starlette.
"""

from __future__ import annotations

import math
import time
import uuid
from collections.abc import Iterable, Mapping
from typing import Any

import jwt

from jobwire.settings import Settings

#: Claims `mint_token` writes from its own arguments, which `claims` may not override.
RESERVED_CLAIMS = frozenset({"sub", "tenant", "exp", "iat", "aud", "scope", "jobs", "jti"})

DEFAULT_TTL = 300  # seconds: a front end's token function fetches a new one at expiry


class TokenError(ValueError):
    """`mint_token` cannot make a token the server would accept; the message says why."""


def mint_token(
    sub: str,
    tenant: str | None = None,
    *,
    ttl: float = DEFAULT_TTL,
    secret: str | None = None,
    audience: str | None = None,
    admin: bool = False,
    jobs: Iterable[str] | None = None,
    claims: Mapping[str, Any] | None = None,
    settings: Settings | None = None,
) -> str:
    """An HS256 bearer token for `sub` in `tenant`, valid for `ttl` seconds.

    - `secret` and `audience` default to `JOBWIRE_JWT_SECRET` and `JOBWIRE_JWT_AUDIENCE`
      (from `settings`, else the environment), as the server reads them.
    - `tenant` may be None for an `admin` token, or when the server runs with
      `JOBWIRE_TENANCY=single` (read from the same settings); a multi-tenant server
      refuses a token without one, so minting one is refused here.
    - `admin`: the admin scope (every tenant's jobs, admin endpoints).
    - `jobs`: the only job ids the token may touch.
    - `claims`: more claims to carry (a name, say); they may not replace the ones above.

    Raises `TokenError` when there is no secret or an argument is wrong.
    """
    if not isinstance(sub, str) or not sub:
        raise TokenError(f"sub must be a non-empty string, got {sub!r}")
    if tenant is not None and (not isinstance(tenant, str) or not tenant):
        raise TokenError(f"tenant must be a non-empty string or None, got {tenant!r}")
    if isinstance(ttl, bool) or not isinstance(ttl, int | float) or not math.isfinite(ttl) or ttl <= 0:
        raise TokenError(f"ttl must be a positive number of seconds, got {ttl!r}")
    if not isinstance(admin, bool):
        raise TokenError(f"admin must be True or False, got {admin!r}")
    job_ids = _job_ids(jobs)
    extra = dict(claims or {})
    clash = sorted(RESERVED_CLAIMS & extra.keys())
    if clash:
        raise TokenError(f"claims may not set {clash}: pass them as mint_token's own arguments")
    if secret is None or audience is None or (tenant is None and not admin):
        settings = settings or Settings.from_env()
        secret = settings.jwt_secret if secret is None else secret
        audience = settings.jwt_audience if audience is None else audience
        if tenant is None and not admin and settings.tenancy != "single":
            raise TokenError(
                "tenant is required: the server refuses a token without one unless it runs "
                "with JOBWIRE_TENANCY=single (or the token is admin=True)"
            )
    if not isinstance(secret, str) or not secret:
        raise TokenError(
            "no secret to sign with: set JOBWIRE_JWT_SECRET (the server's HS256 secret) or pass secret="
        )
    now = time.time()
    body: dict[str, Any] = {
        **extra,
        "sub": sub,
        "iat": int(now),
        "exp": int(now + ttl),
        "jti": uuid.uuid4().hex,
    }
    if tenant is not None:
        body["tenant"] = tenant
    if audience:
        body["aud"] = audience
    if admin:
        body["scope"] = "admin"
    if job_ids is not None:
        body["jobs"] = job_ids
    return jwt.encode(body, secret, algorithm="HS256")


def _job_ids(jobs: Iterable[str] | None) -> list[str] | None:
    if jobs is None:
        return None
    if isinstance(jobs, str | bytes):  # one id passed bare would become a list of characters
        raise TokenError(f"jobs must be a list of job ids, not one string: jobs=[{jobs!r}]")
    ids = list(jobs)
    if not ids or not all(isinstance(j, str) and j for j in ids):
        raise TokenError(f"jobs must be a non-empty list of job ids (strings), got {ids!r:.80}")
    return ids
