"""Worker side of jobwire: the Celery app, the progress-reporting task base, examples."""
