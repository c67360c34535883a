"""A user's Celery app for the contract tests: results Celery stores that jobwire must not
change, by serializer (CONTRACT_SERIALIZER: json or pickle)."""

import math

from celery import Celery

import jobwire


def make_app(serializer: str, url: str) -> Celery:
    app = Celery(f"contract-{serializer}", broker=url, backend=url, set_as_current=False)
    app.conf.update(
        task_serializer=serializer,
        result_serializer=serializer,
        accept_content=[serializer],
        result_accept_content=[serializer],
        task_default_queue=f"contract-{serializer}",
    )

    @app.task(name="contract.big", shared=False)
    def big(size: int) -> str:
        return "x" * size

    @app.task(name="contract.factorial", shared=False)
    def factorial(n: int) -> int:
        return math.factorial(n)

    @app.task(name="contract.tuple_keys", shared=False)
    def tuple_keys() -> dict:
        return {(1, 2): "pair", ("a",): [1, 2]}

    @app.task(name="contract.deep", shared=False)
    def deep(levels: int) -> list:
        value: list = []
        for _ in range(levels):
            value = [value]
        return value

    @app.task(bind=True, name="contract.huge", shared=False)
    def huge(self, digits: int) -> int:  # type: ignore[no-untyped-def]
        """Integers past what a JSON reader takes as a number (a double's range)."""
        self.update_state(state="COUNTING", meta={"step": 1, "total": 2, "count": 10**digits})
        return -(10**digits) - 7

    @app.task(name="contract.add", shared=False)
    def add(x: int, y: int) -> int:
        return x + y

    @app.task(name="contract.total", shared=False)
    def total(values: list) -> int:
        return sum(len(v) if isinstance(v, str) else v for v in values)

    @app.task(bind=True, name="contract.steps", shared=False)
    def steps(self, n: int) -> str:  # type: ignore[no-untyped-def]
        for i in range(n):
            self.update_state(state="STEPPING", meta={"step": i + 1, "total": n})
        return "done"

    return jobwire.attach(app)
