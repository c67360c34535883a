"""Which Celery apps are attached to jobwire in this process, with their settings."""

from __future__ import annotations

from weakref import WeakKeyDictionary

from celery import Celery
from celery import _state as celery_state

from jobwire.settings import Settings

_attached: WeakKeyDictionary[Celery, Settings] = WeakKeyDictionary()


def add(app: Celery, settings: Settings) -> None:
    _attached[app] = settings


def is_attached(app: Celery) -> bool:
    return app in _attached


def settings_for(app: Celery) -> Settings:
    """The settings `attach()` was given for `app`; the environment's for other apps."""
    settings = _attached.get(app)
    return settings if settings is not None else Settings.from_env()


def publishing_app() -> Celery | None:
    """The attached app publishing from this thread, if any.

    Celery's publish signal does not say which app publishes. Celery's own answer is the
    thread's current app (`app.set_current()`, done by `Celery()` in the thread that built
    the app, and by workers); a thread with none falls back to the default app
    (`app.set_default()`). When neither is an attached app of ours, and only one app is
    attached in this process, that one is meant (a web app publishing from a request
    thread); with several attached apps, make the right one current before publishing.
    """
    app = celery_state._tls.current_app
    if app is None:
        app = celery_state.default_app
        if app is not None and app in _attached:
            return app
        return next(iter(_attached.keys())) if len(_attached) == 1 else None
    return app if app in _attached else None
