"""Celery's own `rate_limit`, managed: changed at run time, scaled, restored, remembered.

What Celery does (its source, `celery/worker/control.py` and the consumer's buckets): a
task's `rate_limit` is enforced per worker *node*, in memory; `control.rate_limit()`
reaches only the workers up at that moment; and `"0/m"` means no limit at all. So this
manager:

- keeps the wanted limits in Redis, and every attached app's worker applies them when it
  becomes ready (`worker_ready`), so a worker started later obeys the change too;
- scales by a factor through `jobwire.rates`, which never rounds a limit into "unlimited";
- restores the limits the code declares.
"""

from __future__ import annotations

from typing import Any

from celery import Celery

from jobwire.protocol import JobwireError
from jobwire.rates import parse_rate
from jobwire.tasks.recorder import Recorder


class CeleryRateLimits:
    """Celery task rate limits for one app (see module docstring)."""

    def __init__(self, app: Celery) -> None:
        self.app = app
        recorder = Recorder.for_app(app)
        self._redis, self._key = recorder.client, recorder.keys.celery_limits

    def declared(self) -> dict[str, str | None]:
        """What the code declares (`@task(rate_limit=...)`), per user task."""
        return {
            name: task.rate_limit for name, task in self.app.tasks.items() if not name.startswith("celery.")
        }

    def wanted(self) -> dict[str, str]:
        return {k.decode(): v.decode() for k, v in self._redis.hgetall(self._key).items()}

    def listing(self) -> list[dict[str, Any]]:
        wanted = self.wanted()
        return [
            {"task": name, "declared": declared, "rate": wanted.get(name, declared)}
            for name, declared in sorted(self.declared().items())
        ]

    def set(self, task: str, rate: str, *, destination: list[str] | None = None) -> str:
        """Set `task`'s limit on every worker (or those in `destination`); remembered for
        workers that start later (only when it applies to all)."""
        if task not in self.declared():
            raise JobwireError(
                "invalid_request", f"unknown task {task!r}; known: {', '.join(sorted(self.declared()))}"
            )
        value = str(parse_rate(rate, field=f"rate for {task}"))
        if destination is None:
            self._redis.hset(self._key, task, value)
        self.app.control.rate_limit(task, value, destination=destination)
        return value

    def scale(self, factor: float) -> dict[str, str]:
        """Every declared limit × `factor` (under load: 0.5), never rounded into no limit."""
        scaled = {
            task: str(parse_rate(declared).scaled(factor))
            for task, declared in self.declared().items()
            if declared
        }
        for task, value in scaled.items():
            self.set(task, value)
        return scaled

    def restore(self) -> dict[str, str | None]:
        """Back to what the code declares, everywhere."""
        declared = self.declared()
        for task in self.wanted():
            if task in declared:
                self.app.control.rate_limit(task, declared[task] or 0)  # 0: Celery's "no limit"
        self._redis.delete(self._key)
        return {task: declared[task] for task in declared if declared[task]}


def apply_wanted(consumer: Any) -> None:
    """On `worker_ready`: apply the remembered limits to this worker, which may have
    started after they were broadcast."""
    app = consumer.app
    wanted = CeleryRateLimits(app).wanted()
    for task, rate in wanted.items():
        if task in app.tasks:
            app.tasks[task].rate_limit = rate
    if wanted:
        consumer.reset_rate_limits()
