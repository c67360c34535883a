"""Celery apps that know nothing of jobwire, as users' projects would be."""
