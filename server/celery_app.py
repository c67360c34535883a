"""The Celery app the server submits and revokes through: the user's, or the demo's."""

from __future__ import annotations

import importlib
import os
import sys

from celery import Celery

from jobwire.settings import DEMO_APP, Settings, SettingsError
from jobwire.tasks import registry
from jobwire.tasks.attach import attach


def load_celery_app(settings: Settings) -> Celery:
    """Import `JOBWIRE_CELERY_APP` (`package.module:attribute`), as `celery -A` would, and
    attach it if its module did not. The demo app is built fresh for these settings."""
    if settings.celery_app == DEMO_APP:
        from jobwire.tasks.demo import create_demo_app

        return create_demo_app(settings)
    module_name, _, attr = settings.celery_app.partition(":")
    if os.getcwd() not in sys.path:  # `celery -A` imports from the working directory too
        sys.path.insert(0, os.getcwd())
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise SettingsError(
            f"JOBWIRE_CELERY_APP={settings.celery_app!r}: cannot import {module_name!r} ({exc}); "
            "run the server where that module is importable, or fix the name"
        ) from None
    app = getattr(module, attr or "app", None)
    if not isinstance(app, Celery):
        raise SettingsError(
            f"JOBWIRE_CELERY_APP={settings.celery_app!r}: {module_name}.{attr or 'app'} is "
            f"{type(app).__name__}, not a Celery app; name it as package.module:attribute"
        )
    if not registry.is_attached(app):
        attach(app, settings)
    return app
