"""The demo Celery app: what `make run` serves and the test suite's worker runs.

`celery -A jobwire.tasks.demo worker`. It is one ordinary user of `jobwire.attach()`; your
own app needs none of this module.
"""

from __future__ import annotations

import os

from celery import Celery

from jobwire.settings import Settings
from jobwire.tasks.attach import attach


def create_demo_app(settings: Settings | None = None) -> Celery:
    """A Celery app with jobwire's demo tasks: Redis broker and backend, JSON, shared key
    prefix, and `attach()`ed. `JOBWIRE_DEMO_QUEUE` names its queue (tests give each
    broker run a queue of its own)."""
    settings = settings or Settings.from_env()
    # Celery's Redis backend does not support Redis Cluster: with jobwire's events on a
    # cluster, the demo keeps Celery's results on its broker's (standalone) Redis.
    backend = settings.effective_broker_url if settings.redis_cluster else settings.redis_url
    app = Celery("jobwire-demo", broker=settings.effective_broker_url, backend=backend)
    # With Sentinel, Celery finds the primary by the same name jobwire does.
    master = settings.redis_sentinel_master
    sentinel = {"master_name": master} if master else {}
    app.conf.update(
        task_serializer="json",
        result_serializer="json",
        accept_content=["json"],
        result_expires=settings.result_expires,
        result_backend_transport_options={"global_keyprefix": settings.key_prefix, **sentinel},
        broker_transport_options=sentinel if settings.effective_broker_url.startswith("sentinel") else {},
        task_default_queue=os.environ.get("JOBWIRE_DEMO_QUEUE", "celery"),
        # One task at a time per process: progress jobs are long, and prefetching would
        # leave submitted jobs sitting PENDING behind a busy process.
        worker_prefetch_multiplier=1,
        broker_connection_retry_on_startup=True,
        worker_hijack_root_logger=False,
    )
    from jobwire.tasks.examples import register

    register(app)
    return attach(app, settings)


app = create_demo_app()
