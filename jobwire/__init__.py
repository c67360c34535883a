"""jobwire: live progress of Celery jobs, fanned out over websockets, SSE and polling.

    import jobwire
    jobwire.attach(app)          # in your Celery app's module, after configuring it

`attach` and `ProgressTask` are imported on first use, so `import jobwire` (say, for the
client) does not import Celery.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

__version__ = "0.3.0"
__all__ = ["attach", "ProgressTask", "AttachError"]

if TYPE_CHECKING:
    from jobwire.tasks.attach import AttachError, attach
    from jobwire.tasks.progress import ProgressTask


def __getattr__(name: str) -> Any:
    if name in ("attach", "AttachError"):
        from jobwire.tasks import attach as module

        return getattr(module, name)
    if name == "ProgressTask":
        from jobwire.tasks.progress import ProgressTask

        return ProgressTask
    raise AttributeError(f"module 'jobwire' has no attribute {name!r}")
