"""An application that never imports jobwire: jobwire follows it through its Redis result
backend only (JOBWIRE_CELERY_BACKENDS). Its own key prefix, its own Redis."""

import os

from celery import Celery

URL = os.environ.get("FOREIGN_REDIS_URL", "redis://127.0.0.1:6379/0")

app = Celery("foreign", broker=URL, backend=URL, set_as_current=False)
app.conf.update(
    task_track_started=True,
    result_extended=True,
    result_backend_transport_options={"global_keyprefix": "shop:"},
    task_default_queue="foreign",
)


def _work(task, gated):
    """The task's own work. Gated, each step waits until the test lets it go (a token on
    `shop:gate:<id>`), so watchers the test attached meanwhile provably see it live."""
    if gated:
        task.backend.client.blpop(f"shop:gate:{task.request.id}", timeout=30)


@app.task(bind=True, name="shop.crunch")
def crunch(self, steps=3, gated=False):
    for step in range(1, steps + 1):
        self.update_state(state="PROCESSING", meta={"current": step, "total": steps})
        _work(self, gated)
    self.update_state(state="UPLOADING", meta={"current": 1, "total": 1})
    _work(self, gated)
    return {"rows": steps * 10}


@app.task(bind=True, name="shop.broken")
def broken(self):
    self.update_state(state="PROCESSING", meta={"current": 1, "total": 2})
    raise RuntimeError("the shop's disk is full")
