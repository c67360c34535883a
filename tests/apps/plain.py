"""A user's Celery app with no jobwire import: the server attaches it (JOBWIRE_CELERY_APP)."""

import os

from celery import Celery

app = Celery(
    "plain",
    broker=os.environ.get("PLAIN_REDIS_URL", "redis://127.0.0.1:6379/0"),
    backend=os.environ.get("PLAIN_REDIS_URL", "redis://127.0.0.1:6379/0"),
    set_as_current=False,
)


@app.task(bind=True, name="plain.seed")
def seed(self, delay=0.0):
    self.update_state(state="VALIDATING", meta={"step": 1, "total": 2, "description": "Validating input"})
    return "ok"
