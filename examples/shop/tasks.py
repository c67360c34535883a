"""The shop's tasks, written the way Celery documents custom states: no jobwire API here.

(This module is named `tasks`, like most Celery projects' — installing jobwire must not
shadow it.)
"""

import time

from celeryapp import app


@app.task(bind=True)
def long_running_task(self, data=None, delay=1.0):
    self.update_state(state="VALIDATING", meta={"step": 1, "total": 3, "description": "Validating input"})
    time.sleep(delay)
    self.update_state(state="PROCESSING", meta={"step": 2, "total": 3, "description": "Processing data"})
    time.sleep(delay)
    self.update_state(state="UPLOADING", meta={"step": 3, "total": 3, "description": "Uploading results"})
    time.sleep(delay)
    return {"status": "complete", "items": len(data or [])}


@app.task(bind=True)
def import_orders(self, count=10, delay=0.1):
    """celery-progress style: a PROGRESS state with current/total."""
    for done in range(count):
        self.update_state(state="PROGRESS", meta={"current": done, "total": count})
        time.sleep(delay)
    return {"imported": count}
