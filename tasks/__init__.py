"""The Celery side of jobwire: `attach()`, `ProgressTask`, the event recorder, demo tasks."""
