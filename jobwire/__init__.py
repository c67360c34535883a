"""jobwire: live progress of Celery jobs, fanned out over websockets, SSE and polling."""

__version__ = "0.1.0"
