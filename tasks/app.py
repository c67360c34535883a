"""The worker's Celery app, configured from the environment (`celery -A tasks.app worker`)."""

from tasks.factory import create_celery_app

app = create_celery_app()
