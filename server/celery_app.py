"""The Celery app the server submits and revokes through: the user's, or the demo's.

`JOBWIRE_CELERY_APP` takes whatever `celery -A` takes, found by Celery's own rules
(`celery.app.utils.find_app` over kombu's `symbol_by_name`), so the value a project already
passes to its workers works here unchanged:

- `pkg.module:attr`: that attribute of that module.
- `pkg.module.attr`: the attribute `attr` of `pkg.module`; if there is no such attribute,
  the module `pkg.module.attr` (then searched, as below).
- `pkg.module` or a bare `module`: searched, in Celery's order: its attribute `app`, then
  `celery` (either skipped when it is a module), then, for a package, its `celery`
  submodule (`pkg.celery`, searched the same way), then the first Celery instance among
  the module's attributes.

What Celery would return but cannot run is refused here, at start, with one line that
names the variable, what was tried and what to write instead: an `app` that is not a
Celery app (a Flask app, say), a module named with `:`, or a factory function. `celery -A`
does not call factories either (its CLI reads the returned object's `user_options`), so a
factory is refused rather than called.

`find_app` takes the import function as an argument: the rules are tested on modules
built in memory, and the real import (from the working directory, as `celery -A` imports)
is `load_celery_app`'s.
"""

from __future__ import annotations

import importlib
import inspect
import os
import sys
from collections.abc import Callable
from types import ModuleType
from typing import Any, NoReturn

from celery import Celery

from jobwire.settings import DEMO_APP, Settings, SettingsError
from jobwire.tasks import registry
from jobwire.tasks.attach import attach

VARIABLE = "JOBWIRE_CELERY_APP"
#: What to write, said in every refusal.
FORMS = "write it as you pass it to `celery -A`: pkg.module, pkg.module:app or pkg.module.app"

Importer = Callable[[str], ModuleType]
_MISSING = object()


class CeleryAppError(SettingsError):
    """`JOBWIRE_CELERY_APP` names no Celery app; the message says what was tried and what
    to write instead."""


def from_working_directory() -> None:
    """Let imports find modules in the working directory, as `celery -A` and uvicorn do."""
    if os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())


def load_celery_app(settings: Settings) -> Celery:
    """The app `JOBWIRE_CELERY_APP` names (see the module docstring), attached if its module
    did not attach it. The demo app is built fresh for these settings."""
    if settings.celery_app == DEMO_APP:
        from jobwire.tasks.demo import create_demo_app

        return create_demo_app(settings)
    from_working_directory()
    app = find_app(settings.celery_app)
    if not registry.is_attached(app):
        attach(app, settings)
    return app


def find_app(name: str, import_module: Importer = importlib.import_module) -> Celery:
    """The Celery app `name` names, by `celery -A`'s rules; `CeleryAppError` if none.

    Exceptions a module raises while it is imported, other than an `ImportError`, are the
    module's own bug and go up as they are: their traceback says more than a line could."""
    _check_form(name)
    return _Search(name, import_module).find(name)


class _Search:
    """One resolution: what was tried so far, for the refusal's message."""

    def __init__(self, name: str, import_module: Importer) -> None:
        self.name, self._import_module = name, import_module
        self.tried: list[str] = []

    def find(self, name: str) -> Celery:
        if ":" in name:
            module_name, _, attr = name.partition(":")
            module = self._import(module_name)
            self.tried.append(name)
            found = getattr(module, attr, _MISSING)
            if found is _MISSING:
                self._fail(f"{module_name} has no attribute {attr!r}", module)
            if isinstance(found, ModuleType):
                self._fail(
                    f"{name} is a module, and with `:` it is not searched (as with `celery -A`); "
                    f"write {module_name}.{attr} to have it searched",
                    found,
                )
            return self._as_app(found, name, module)
        parent_name, _, attr = name.rpartition(".")
        if not parent_name:
            return self._search(name, self._import(name))
        parent = self._import(parent_name)
        found = getattr(parent, attr, _MISSING)
        if found is _MISSING or isinstance(found, ModuleType):
            # Not an attribute (or a submodule already imported): the module of that name.
            return self._search(name, self._import(name, parent=parent))
        self.tried.append(name)
        return self._as_app(found, name, parent)

    def _search(self, name: str, module: ModuleType) -> Celery:
        """Celery's search of a module named without `:`."""
        for attr in ("app", "celery"):
            found = getattr(module, attr, None)
            if found is not None and not isinstance(found, ModuleType):
                self.tried.append(f"{name}:{attr}")
                return self._as_app(found, f"{name}:{attr}", module)
        self.tried.append(f"{name}:app and {name}:celery (none)")
        if getattr(module, "__path__", None) is not None:  # a package: its `celery` submodule
            try:
                submodule = self._import_module(f"{name}.celery")
            except ImportError as exc:  # Celery moves on after any ImportError here, and so do we
                missing = isinstance(exc, ModuleNotFoundError) and exc.name == f"{name}.celery"
                why = "no such module" if missing else f"import failed: {exc}"
                self.tried.append(f"{name}.celery ({why})")
            else:
                return self._search(f"{name}.celery", submodule)
        apps = _apps_in(module)
        self.tried.append(f"any Celery app in {name} ({'none' if not apps else apps[0]})")
        if apps:
            return getattr(module, apps[0])  # type: ignore[no-any-return]
        self._fail(f"{name} holds no Celery app", module)

    def _import(self, module_name: str, *, parent: ModuleType | None = None) -> ModuleType:
        try:
            return self._import_module(module_name)
        except ModuleNotFoundError as exc:
            if exc.name is None or not _within(module_name, exc.name):
                self._fail(
                    f"importing {module_name!r} failed: it imports {exc.name!r}, which is not installed here",
                    instead="install it where the server runs",
                )
            if parent is not None:
                attr = module_name.rpartition(".")[2]
                self._fail(
                    f"{parent.__name__} has no attribute {attr!r}, and there is no module {module_name}",
                    parent,
                )
            self._fail(
                f"cannot import {module_name!r} ({exc})",
                instead="run the server where `celery -A` runs (its working directory is on the path, "
                f"as for Celery) or set PYTHONPATH; {FORMS}",
            )
        except ImportError as exc:
            self._fail(f"importing {module_name!r} failed: {exc}", instead="fix that import")

    def _as_app(self, found: Any, name: str, module: ModuleType) -> Celery:
        if isinstance(found, Celery):
            return found
        if callable(found):
            kind = "a class" if inspect.isclass(found) else "a function"
            self._fail(
                f"{name} is {kind}, not a Celery app (`celery -A` calls no factory, nor does jobwire)",
                module,
                instead="make the app at module level (app = create_app()) and name that",
            )
        self._fail(f"{name} is {type(found).__name__}, not a Celery app", module)

    def _fail(self, why: str, module: ModuleType | None = None, *, instead: str = FORMS) -> NoReturn:
        """Refuse, saying what was tried and what to write instead: the module's own Celery
        apps when it has some (the likeliest fix), else `instead`."""
        apps = _apps_in(module) if module is not None else []
        if module is not None and apps:
            named = ", ".join(f"{module.__name__}:{attr}" for attr in apps)
            instead = f"it holds {named}: write {VARIABLE}={module.__name__}:{apps[0]}"
        said = self.tried and self.tried != [self.name]  # naming the value again says nothing
        tried = f" (tried {', '.join(self.tried)})" if said else ""
        raise CeleryAppError(f"{VARIABLE}={self.name!r}: {why}{tried}; {instead}")


def _check_form(name: str) -> None:
    module_name, colon, attr = name.partition(":")
    parts = module_name.split(".") + ([attr] if colon else [])
    if not all(part.isidentifier() for part in parts):
        raise CeleryAppError(f"{VARIABLE}={name!r}: not a module path; {FORMS}")


def _within(module_name: str, missing: str) -> bool:
    """Whether the missing module is `module_name` or one of its parents (the name is
    wrong), rather than something it imports (a dependency is not installed)."""
    return module_name == missing or module_name.startswith(missing + ".")


def _apps_in(module: ModuleType) -> list[str]:
    """Names of the Celery apps among a module's attributes, in definition order."""
    return [attr for attr, value in vars(module).items() if isinstance(value, Celery)]
