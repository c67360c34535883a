"""jobwire: live progress of Celery jobs, fanned out over websockets, SSE and polling.

    import jobwire
    jobwire.attach(app)          # in your Celery app's module, after configuring it

    with jobwire.owner(tenant, sub):
        export_rows.delay(42)    # a job of that tenant's: its tokens see it

    jobwire.mint_token(sub, tenant)   # an HS256 token the server accepts

    app = jobwire.mount(app, "/progress")   # the server inside your ASGI app (FastAPI, Django…)

`attach`, `ProgressTask`, `mint_token` and `mount` are imported on first use, so `import jobwire`
(say, for the client) does not import Celery. `owner` is imported at once: its module is
the standard library only, and a lazy name would be shadowed by the submodule
`jobwire.owner` as soon as anything imported it.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from jobwire.owner import owner

__version__ = "0.3.0"
__all__ = ["attach", "ProgressTask", "AttachError", "owner", "mint_token", "TokenError", "mount"]

if TYPE_CHECKING:
    from jobwire.server.mount import mount
    from jobwire.tasks.attach import AttachError, attach
    from jobwire.tasks.progress import ProgressTask
    from jobwire.tokens import TokenError, mint_token


def __getattr__(name: str) -> Any:
    if name in ("attach", "AttachError"):
        from jobwire.tasks import attach as module

        return getattr(module, name)
    if name == "ProgressTask":
        from jobwire.tasks.progress import ProgressTask

        return ProgressTask
    if name in ("mint_token", "TokenError"):
        from jobwire import tokens

        return getattr(tokens, name)
    if name == "mount":
        from jobwire.server.mount import mount

        return mount
    raise AttributeError(f"module 'jobwire' has no attribute {name!r}")
