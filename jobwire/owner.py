"""`with jobwire.owner(tenant, sub):`: jobs published inside the block belong to that owner.

With authentication on, a tenant's token sees its tenant's jobs only, and a job's owner is
what its Celery message says (`jobwire_tenant` / `jobwire_sub` headers, set once, when the
job is created). Code that publishes with `.delay()` sets no headers, so its jobs had no
owner and every user's token was told `job_not_found` for them. Passing the headers at
every publish is easy to forget and impossible for a group or chord built elsewhere; one
block around the publishing code is neither.

The owner lives in a `ContextVar`, read by the publish signal (`jobwire.tasks.signals`)
where the message's headers are set, so every way Celery publishes in the block carries
it: `.delay()`, `.apply_async()`, `send_task()`, and a group's or chord's header tasks. It
follows the rules of context variables: an asyncio task sees the owner of the code that
created it, `asyncio.to_thread()` and `contextvars.copy_context().run()` carry it to a
thread, and a thread started with `threading.Thread` or a `ThreadPoolExecutor` starts
with no owner (Python gives a new thread an empty context), so two threads or two
requests never see each other's owner. Headers a publish names itself win over the
block, and nesting restores the outer owner on leaving the inner block.

This module imports nothing but the standard library: `import jobwire` stays light.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from contextvars import ContextVar

#: (tenant, subject) of the jobs published in this context; None outside any block.
_current: ContextVar[tuple[str, str] | None] = ContextVar("jobwire_owner", default=None)


def owner(tenant: str, sub: str = "") -> contextlib.AbstractContextManager[None]:
    """A block in which every job published belongs to `tenant` (and subject `sub`).

        with jobwire.owner(user.org_id, user.id):
            export_rows.delay(42)

    Raises `ValueError` at once (not at the first publish) for a tenant that is not a
    non-empty string or a subject that is not a string.
    """
    check_owner(tenant, sub)
    return _owned(tenant, sub)


@contextlib.contextmanager
def _owned(tenant: str, sub: str) -> Iterator[None]:
    token = _current.set((tenant, sub))
    try:
        yield
    finally:
        _current.reset(token)


def current_owner() -> tuple[str, str] | None:
    """(tenant, subject) of the innermost `jobwire.owner()` block here, or None."""
    return _current.get()


def check_owner(tenant: object, sub: object) -> None:
    """`ValueError` naming what is wrong with an owner, or nothing."""
    if not isinstance(tenant, str) or not tenant:
        raise ValueError(f"a job owner's tenant must be a non-empty string, got {tenant!r}")
    if not isinstance(sub, str):
        raise ValueError(f"a job owner's subject (sub) must be a string, got {sub!r}")
