"""Builds jobwire-configured Celery apps (the worker's, the server's, each test's)."""

from __future__ import annotations

from celery import Celery

from jobwire.settings import Settings


def create_celery_app(settings: Settings | None = None) -> Celery:
    """A Celery app wired for jobwire: Redis broker and backend, JSON, shared key prefix.

    Importing `tasks.progress` connects the lifecycle signals, and `tasks.examples`
    registers the demo tasks, so any process holding this app reports events.
    """
    settings = settings or Settings.from_env()
    app = Celery(
        "jobwire",
        broker=settings.effective_broker_url,
        backend=settings.redis_url,
        include=["tasks.examples"],
    )
    app.conf.update(
        task_serializer="json",
        result_serializer="json",
        accept_content=["json"],
        result_expires=settings.result_expires,
        result_backend_transport_options={"global_keyprefix": settings.key_prefix},
        task_track_started=True,
        # One task at a time per process: progress jobs are long, and prefetching would
        # leave submitted jobs sitting PENDING behind a busy process.
        worker_prefetch_multiplier=1,
        broker_connection_retry_on_startup=True,
        worker_hijack_root_logger=False,
    )
    app.jobwire_settings = settings  # type: ignore[attr-defined]
    # `before_task_publish` does not say which app publishes, so its handler uses
    # `current_app`, which is thread-local: without a process-wide default, a publish from
    # a thread pool (the server's submit) would find Celery's unconfigured fallback app.
    app.set_default()
    # Connect the lifecycle signals, and register the demo tasks in every process (the
    # server lists their docstrings), not only in workers that honour `include`.
    import tasks.examples  # noqa: F401
    import tasks.progress  # noqa: F401

    return app
