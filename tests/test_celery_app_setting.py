"""`JOBWIRE_CELERY_APP` takes what `celery -A` takes, found by Celery's own rules.

An adopter's `worker.celery` (the value their workers run with) failed with "No module
named 'worker.celery'", and a bare `worker` with "worker.app is NoneType", while Celery
found the app from both. Each form is tried here on real modules written to a temporary
directory, and the app found is compared with what `celery.app.utils.find_app` (the
function behind `celery -A`) finds for the same value. The rules alone run on modules built
in memory; refusals name the variable, what was tried and what to write instead.
"""

from __future__ import annotations

import importlib
import os
import subprocess
import sys
import textwrap
from collections.abc import Callable, Iterator
from pathlib import Path
from types import ModuleType

import pytest
import websockets
from celery import Celery
from celery.app import utils as celery_utils
from websockets.exceptions import InvalidStatus

from jobwire.server.celery_app import CeleryAppError, find_app, load_celery_app
from jobwire.settings import Settings, SettingsError
from jobwire.tasks import registry
from tests.support import RedisServer, free_port, until_serving, wait_until

APP = 'from celery import Celery\n{name} = Celery("{label}", broker="memory://", set_as_current=False)\n'

Write = Callable[[dict[str, str]], Path]


@pytest.fixture
def modules(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Write]:
    """Write modules (path -> source) under a directory on `sys.path`; whatever was imported
    from it is forgotten afterwards, so each test's names are its own."""
    monkeypatch.syspath_prepend(str(tmp_path))

    def write(files: dict[str, str]) -> Path:
        for path, source in files.items():
            target = tmp_path / path
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_text(textwrap.dedent(source))
        importlib.invalidate_caches()
        return tmp_path

    yield write
    for name, module in list(sys.modules.items()):
        if str(getattr(module, "__file__", None) or "").startswith(str(tmp_path)):
            del sys.modules[name]


def _app(name: str, label: str) -> str:
    return APP.format(name=name, label=label)


# -- every form, on real modules, as Celery finds it ---------------------------------------

FORMS = {
    # the adopter's project: worker.py holds `celery = Celery(...)`
    "worker.celery": "worker",  # pkg.module.attr
    "worker:celery": "worker",  # pkg.module:attr
    "worker": "worker",  # a bare module: `app`, then `celery`
    # a package whose app lives in its `celery` submodule, which __init__ does not import
    "proj": "proj",
    "proj.celery": "proj",
    "proj.celery:app": "proj",
    "proj.celery.app": "proj",
    # a module whose app has another name: the first Celery instance among its attributes
    "shop.tasks": "shop",
    "shop.tasks:the_app": "shop",
    # Django's layout: the package's __init__ imports `app as celery_app` from .celery
    "site_pkg": "site",
}


@pytest.fixture
def project(modules: Write) -> Path:
    return modules(
        {
            "worker.py": _app("celery", "worker"),
            "proj/__init__.py": "",
            "proj/celery.py": _app("app", "proj"),
            "shop/__init__.py": "",
            "shop/tasks.py": _app("the_app", "shop") + "def helper():\n    return 1\n",
            "site_pkg/__init__.py": "from .celery import app as celery_app\n",
            "site_pkg/celery.py": _app("app", "site"),
        }
    )


@pytest.mark.parametrize("value", list(FORMS))
def test_every_form_celery_takes_names_the_app_celery_finds(project: Path, value: str) -> None:
    found = find_app(value)
    assert isinstance(found, Celery) and found.main == FORMS[value]
    assert found is celery_utils.find_app(value)  # the same object `celery -A` would run


def test_app_is_preferred_to_celery_and_any_other_instance(modules: Write) -> None:
    modules(
        {
            "both.py": _app("other", "other") + _app("celery", "celery") + _app("app", "app"),
            "second.py": _app("other", "other") + _app("celery", "celery"),
        }
    )
    assert find_app("both").main == "app"
    assert find_app("second").main == "celery"


def test_the_server_loads_and_attaches_a_dotted_value(
    modules: Write, own_redis: RedisServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Through `load_celery_app`, as `jobwire serve` loads it: the app is attached."""
    modules(
        {
            "adopter_worker.py": f"""
                from celery import Celery
                celery = Celery("adopter", broker="{own_redis.url}", backend="{own_redis.url}",
                                set_as_current=False)
            """
        }
    )
    app = load_celery_app(Settings(redis_url=own_redis.url, celery_app="adopter_worker.celery"))
    assert app.main == "adopter" and registry.is_attached(app)
    app.close()


# -- refusals --------------------------------------------------------------------------------


def test_a_missing_module_says_where_the_server_looks(modules: Write) -> None:
    modules({})
    with pytest.raises(SettingsError) as err:
        find_app("no_such_module_here.celery")
    message = str(err.value)
    assert message.startswith("JOBWIRE_CELERY_APP='no_such_module_here.celery': cannot import")
    assert "No module named 'no_such_module_here'" in message
    assert "working directory" in message and "PYTHONPATH" in message and "celery -A" in message


def test_an_attribute_that_is_not_a_celery_app_names_the_one_there_is(modules: Write) -> None:
    """A Flask app called `app` beside a Celery app called `celery_app`: Celery itself
    returns the Flask app (and fails later); jobwire refuses at once and says which to name."""
    modules({"flaskish.py": "class Flask:\n    pass\n\napp = Flask()\n" + _app("celery_app", "f")})
    with pytest.raises(CeleryAppError) as err:
        find_app("flaskish")
    assert str(err.value) == (
        "JOBWIRE_CELERY_APP='flaskish': flaskish:app is Flask, not a Celery app (tried flaskish:app); "
        "it holds flaskish:celery_app: write JOBWIRE_CELERY_APP=flaskish:celery_app"
    )
    with pytest.raises(CeleryAppError) as err:
        find_app("flaskish:nope")
    assert str(err.value) == (
        "JOBWIRE_CELERY_APP='flaskish:nope': flaskish has no attribute 'nope'; "
        "it holds flaskish:celery_app: write JOBWIRE_CELERY_APP=flaskish:celery_app"
    )


def test_a_typo_in_a_dotted_value_names_the_app_there_is(project: Path) -> None:
    with pytest.raises(CeleryAppError) as err:
        find_app("worker.celry")
    assert str(err.value) == (
        "JOBWIRE_CELERY_APP='worker.celry': worker has no attribute 'celry', and there is no module "
        "worker.celry; it holds worker:celery: write JOBWIRE_CELERY_APP=worker:celery"
    )


def test_a_factory_is_refused_as_celery_refuses_it(modules: Write) -> None:
    """`celery -A mod:create_app` does not call it (the CLI then fails on the function's
    missing `user_options`), so neither does jobwire: it says to make the app at module level."""
    modules({"factory.py": "from celery import Celery\n\ndef create_app():\n    return Celery('f')\n"})
    for value in ("factory:create_app", "factory.create_app"):
        with pytest.raises(CeleryAppError) as err:
            find_app(value)
        assert f"{value} is a function, not a Celery app" in str(err.value)
        assert "make the app at module level (app = create_app())" in str(err.value)


def test_a_module_without_an_app_lists_what_was_tried(modules: Write) -> None:
    modules({"empty_pkg/__init__.py": "X = 1\n"})
    with pytest.raises(CeleryAppError) as err:
        find_app("empty_pkg")
    assert str(err.value) == (
        "JOBWIRE_CELERY_APP='empty_pkg': empty_pkg holds no Celery app (tried empty_pkg:app and "
        "empty_pkg:celery (none), empty_pkg.celery (no such module), any Celery app in empty_pkg (none)); "
        "write it as you pass it to `celery -A`: pkg.module, pkg.module:app or pkg.module.app"
    )


def test_a_dependency_missing_inside_the_module_is_named(modules: Write) -> None:
    modules({"needs_dep.py": "import not_installed_dependency_xyz\n"})
    with pytest.raises(CeleryAppError) as err:
        find_app("needs_dep:app")
    assert str(err.value) == (
        "JOBWIRE_CELERY_APP='needs_dep:app': importing 'needs_dep' failed: it imports "
        "'not_installed_dependency_xyz', which is not installed here; install it where the server runs"
    )


@pytest.mark.parametrize("value", ["worker celery", "worker:", ":app", "a:b:c", "worker/celery.py"])
def test_a_value_that_is_no_module_path_is_refused_before_any_import(value: str) -> None:
    with pytest.raises(CeleryAppError, match="not a module path; write it as you pass it to `celery -A`"):
        find_app(value, import_module=_no_import)


def _no_import(name: str) -> ModuleType:
    raise AssertionError(f"imported {name}")


# -- the rules alone, on modules built in memory ---------------------------------------------


def _importer(tree: dict[str, dict[str, object]]) -> Callable[[str], ModuleType]:
    """An import function over modules built from `tree` (name -> attributes); a name with
    children is a package, as Python's import sees one."""
    built: dict[str, ModuleType] = {}
    for name, attrs in tree.items():
        module = built[name] = ModuleType(name)
        vars(module).update(attrs)
        if any(other.startswith(name + ".") for other in tree):
            module.__path__ = []

    def import_module(name: str) -> ModuleType:
        for end in range(1, name.count(".") + 2):
            prefix = ".".join(name.split(".")[:end])
            if prefix not in built:
                raise ModuleNotFoundError(f"No module named {prefix!r}", name=prefix)
        return built[name]

    return import_module


APP_A = Celery("a", broker="memory://", set_as_current=False)
APP_B = Celery("b", broker="memory://", set_as_current=False)


@pytest.mark.parametrize(
    ("tree", "value", "expected"),
    [
        ({"m": {"app": APP_A, "celery": APP_B}}, "m", APP_A),
        ({"m": {"app": ModuleType("x"), "celery": APP_B}}, "m", APP_B),  # a module `app` is skipped
        ({"m": {"x": 1, "mine": APP_B}}, "m", APP_B),
        ({"p": {}, "p.celery": {"app": APP_A}}, "p", APP_A),
        ({"p": {"other": APP_B}, "p.celery": {"app": APP_A}}, "p", APP_A),  # the submodule first
        ({"p": {}, "p.sub": {"celery": APP_B}}, "p.sub", APP_B),
        ({"p": {}, "p.sub": {"celery": APP_B}}, "p.sub.celery", APP_B),
        ({"p": {}, "p.sub": {"celery": APP_B}}, "p.sub:celery", APP_B),
    ],
)
def test_rules(tree: dict[str, dict[str, object]], value: str, expected: Celery) -> None:
    assert find_app(value, import_module=_importer(tree)) is expected


def test_rules_refuse_a_module_named_with_a_colon() -> None:
    tree: dict[str, dict[str, object]] = {"p": {}, "p.celery": {"app": APP_A}}
    import_module = _importer(tree)
    vars(import_module("p"))["celery"] = import_module("p.celery")
    with pytest.raises(CeleryAppError) as err:
        find_app("p:celery", import_module=import_module)
    assert "p:celery is a module" in str(err.value) and "write p.celery to have it searched" in str(err.value)
    assert "write JOBWIRE_CELERY_APP=p.celery:app" in str(err.value)


# -- `jobwire serve` ----------------------------------------------------------------------------


def test_jobwire_serve_imports_from_its_working_directory_and_refuses_in_one_line(modules: Write) -> None:
    """As `celery -A` does, the server imports from the directory it runs in (the console
    script, not `python -m`, which would put it on the path itself); a value naming no app
    exits 2 with the one line, no traceback."""
    where = modules({"flaskish_srv.py": "class Flask:\n    pass\n\napp = Flask()\n" + _app("celery", "f")})
    env = {k: v for k, v in os.environ.items() if not k.startswith(("JOBWIRE_", "PYTHONPATH"))}
    env.update(JOBWIRE_CELERY_APP="flaskish_srv")
    done = subprocess.run(
        [str(Path(sys.executable).parent / "jobwire"), "serve", "--port", "1"],
        cwd=where,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 2, done.stderr
    assert "Traceback" not in done.stderr
    assert "flaskish_srv:app is Flask, not a Celery app" in done.stderr
    assert "write JOBWIRE_CELERY_APP=flaskish_srv:celery" in done.stderr


# -- the demo app, said ------------------------------------------------------------------------


async def _serve_briefly(env: dict[str, str], tmp_path: Path, *, origin: str | None = None) -> str:
    """Run `jobwire serve` until it is ready (and, with `origin`, refuses a websocket from
    it); its output, as a user sees it."""
    port = free_port()
    out = tmp_path / f"serve-{port}.log"
    with out.open("wb") as sink:
        proc = subprocess.Popen(
            [sys.executable, "-m", "jobwire.cli", "serve", "--port", str(port)],
            env=env,
            stdout=sink,
            stderr=subprocess.STDOUT,
        )
        try:
            await until_serving(proc, port)
            if origin is not None:
                with pytest.raises(InvalidStatus):
                    await websockets.connect(f"ws://127.0.0.1:{port}/ws", origin=origin)
                await wait_until(lambda: "refused (forbidden)" in out.read_text(), what="the refusal is said")
        finally:
            proc.terminate()
            proc.wait(timeout=15)
    return out.read_text()


def _env(**extra: str) -> dict[str, str]:
    return {**{k: v for k, v in os.environ.items() if not k.startswith("JOBWIRE_")}, **extra}


async def test_serving_the_demo_by_default_is_one_warning_at_start(
    own_redis: RedisServer, tmp_path: Path
) -> None:
    """An adopter who forgot JOBWIRE_CELERY_APP had every job answer 404, and nothing said
    that the demo app was served. And jobwire's own lines reach the same output as
    uvicorn's, at its level: a refused Origin shows as INFO's neighbours do."""
    output = await _serve_briefly(
        _env(JOBWIRE_REDIS_URL=own_redis.url), tmp_path, origin="https://page.example"
    )
    warnings = [line for line in output.splitlines() if "JOBWIRE_CELERY_APP is not set" in line]
    assert warnings == [
        f"WARNING:  JOBWIRE_CELERY_APP is not set, so this server serves jobwire's demo app "
        f"(jobwire.tasks.demo:app, on {own_redis.url}): jobs of your own app will answer 404. Set "
        "JOBWIRE_CELERY_APP to your Celery app as you pass it to `celery -A` (e.g. proj.celery "
        "or proj.celery:app)"
    ], output
    assert output.index("JOBWIRE_CELERY_APP is not set") < output.index("Application startup complete")
    refused = [line for line in output.splitlines() if "websocket refused (forbidden)" in line]
    assert len(refused) == 1 and refused[0].startswith(
        "WARNING:  websocket refused (forbidden) from 127.0.0.1"
    )
    assert "JOBWIRE_ALLOWED_ORIGINS" in refused[0]


async def test_the_demo_named_on_purpose_is_said_calmly(own_redis: RedisServer, tmp_path: Path) -> None:
    """`make run` names the demo app (it serves it on purpose): one INFO line, no warning."""
    env = _env(JOBWIRE_REDIS_URL=own_redis.url, JOBWIRE_CELERY_APP="jobwire.tasks.demo:app")
    output = await _serve_briefly(env, tmp_path)
    assert "JOBWIRE_CELERY_APP is not set" not in output
    assert "INFO:     serving jobwire's demo app (JOBWIRE_CELERY_APP=jobwire.tasks.demo:app)" in output
