"""The shop's Celery app. RabbitMQ (or Redis) broker, Redis results, and one line for jobwire.

Nothing here comes from the jobwire repository but the installed `jobwire` package.
"""

import os

from celery import Celery

import jobwire

app = Celery(
    "shop",
    broker=os.environ.get("SHOP_BROKER_URL", "amqp://guest:guest@127.0.0.1:5672//"),
    backend=os.environ.get("SHOP_RESULT_BACKEND", "redis://127.0.0.1:6379/0"),
    include=["tasks"],
)
app.conf.update(
    task_serializer="json",
    result_serializer="json",
    accept_content=["json"],
    task_default_queue=os.environ.get("SHOP_QUEUE", "shop"),
    worker_prefetch_multiplier=1,
    broker_connection_retry_on_startup=True,
)

jobwire.attach(app)  # after the configuration: lifecycle events + streaming update_state
