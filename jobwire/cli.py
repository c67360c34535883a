"""`jobwire` console command: run the server; watch, submit and check jobs.

    jobwire serve [--host H] [--port P] [--forwarded-allow-ips IPS]   # the web server (JOBWIRE_* variables)
    jobwire serve --app main:app            # your ASGI app, with jobwire mounted in it
    jobwire serve --workers 4|auto          # one port, that many processes (env JOBWIRE_WORKERS)
    jobwire watch|submit|status …           # a client of a running server

Client exit codes: 0 SUCCESS, 1 FAILURE, 2 REVOKED, 3 job not found, 4 server unreachable
or refused the request, 130 interrupted. `serve` exits 2 on a configuration error.
"""

from __future__ import annotations

import argparse
import asyncio
import functools
import logging
import os
import socket
import sys
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import orjson
from rich.console import Console
from rich.progress import BarColumn, Progress, TaskProgressColumn, TextColumn, TimeElapsedColumn
from rich.table import Table

from jobwire.client import DEFAULT_URL, JobNotFound, Jobwire, JobwireError, watch

if TYPE_CHECKING:
    from jobwire.server.workers import Link
    from jobwire.settings import Settings

EXIT = {"SUCCESS": 0, "FAILURE": 1, "REVOKED": 2}
EXIT_NOT_FOUND, EXIT_UNREACHABLE = 3, 4

console = Console(stderr=True)
out = Console()


def _say_error(message: object) -> None:
    """One red line, as written: no markup (`jobwire[s3]` is text) and no wrapping."""
    console.print(f"jobwire: {message}", style="red", markup=False, soft_wrap=True)


def _kv(pairs: list[str]) -> dict[str, Any]:
    """`key=value` arguments; values are parsed as JSON when they can be (numbers, lists)."""
    kwargs: dict[str, Any] = {}
    for pair in pairs:
        key, sep, raw = pair.partition("=")
        if not sep or not key:
            raise SystemExit(f"jobwire: expected key=value, got {pair!r}")
        try:
            kwargs[key] = orjson.loads(raw)
        except orjson.JSONDecodeError:
            kwargs[key] = raw
    return kwargs


async def cmd_watch(
    url: str, job_id: str, since: int = 0, give_up_after: float | None = 30.0, token: str | None = None
) -> int:
    final = None
    with Progress(
        TextColumn("[bold]{task.fields[state]:<12}"),
        BarColumn(),
        TaskProgressColumn(),
        TextColumn("{task.description}"),
        TimeElapsedColumn(),
        console=console,
        transient=False,
    ) as progress:
        bar = progress.add_task("", total=100, state="…")
        async for event in watch(job_id, url, since=since, give_up_after=give_up_after, token=token):
            state, p = event["state"], event.get("progress") or {}
            percent = 100.0 if state == "SUCCESS" else p.get("percent", progress.tasks[0].completed)
            progress.update(bar, completed=percent, state=state, description=p.get("description", ""))
            progress.console.print(f"[dim]{event['seq']:>3}[/] {state}" + _detail(event))
            final = event
    assert final is not None
    if final["state"] == "SUCCESS":
        out.print_json(data={"job_id": job_id, "state": "SUCCESS", "result": final.get("result")})
    return EXIT.get(final["state"], 1)


def _detail(event: dict[str, Any]) -> str:
    if event.get("error"):
        return f"  [red]{event['error']['type']}: {event['error']['message']}[/]"
    p = event.get("progress") or {}
    if p.get("description"):
        step = f" ({p['step']}/{p['total']})" if "step" in p and "total" in p else ""
        return f"  {p['description']}{step}"
    return ""


async def cmd_submit(url: str, task: str, kwargs: dict[str, Any], then_watch: bool, token: str | None) -> int:
    async with Jobwire(url, token=token) as api:
        job_id = await api.submit(task, **kwargs)
    out.print(job_id)
    return await cmd_watch(url, job_id, token=token) if then_watch else 0


async def cmd_status(url: str, job_ids: list[str], as_json: bool, token: str | None) -> int:
    async with Jobwire(url, token=token) as api:
        jobs = await api.batch_status(job_ids)
    if as_json:
        out.print_json(data=jobs)
    else:
        table = Table("job id", "status", "seq", "ready")
        for job_id, s in jobs.items():
            table.add_row(job_id, s["status"], str(s["seq"]), "yes" if s["ready"] else "no")
        out.print(table)
    return EXIT_NOT_FOUND if any(s["status"] == "UNKNOWN" for s in jobs.values()) else 0


def cmd_serve(
    host: str,
    port: int,
    forwarded_allow_ips: str | None = None,
    asgi_app: str | None = None,
    workers: str | None = None,
) -> int:
    """Serve with uvicorn, as the Procfile's `web` does; settings from the environment.
    `asgi_app` (`module:attribute`): a host app with jobwire mounted in it, served instead.
    `workers` (a number or `auto`; else JOBWIRE_WORKERS; else 1): that many processes on
    the one port (see `jobwire.server.workers`); one is served in this process."""
    from jobwire.server.serving import Server, run, uvicorn_config
    from jobwire.server.workers import Supervisor
    from jobwire.settings import SettingsError
    from jobwire.tasks.attach import AttachError

    overrides = _serve_overrides(forwarded_allow_ips)
    try:
        count = _workers(workers)
        # here, not in uvicorn (nor in each worker): a bad setting is one clear line, not a traceback
        app, settings = _serve_app(asgi_app, overrides)
        metrics = _metrics_per_worker(settings, count)
    except (SettingsError, AttachError) as exc:
        _say_error(exc)
        return 2
    log_level = os.environ.get("JOBWIRE_LOG_LEVEL", "info").lower()
    config = uvicorn_config(app, settings, host=host, port=port, log_level=log_level)
    _log_like_uvicorn()
    _say_which_app(settings)
    if count == 1:
        run(Server(config))  # closes jobwire's clients with 1001 before uvicorn shuts down
        return 0
    if metrics is None:
        logging.getLogger("jobwire.cli").info(
            "/metrics on the main port answers for the worker that takes the scrape: set "
            "JOBWIRE_METRICS_ADDR to serve each worker's on a port of its own"
        )
    sock = config.bind_socket()  # the one port of every worker; uvicorn's line if it is taken
    sock.listen(config.backlog)  # connections queue from now on, while the workers start
    plan = _WorkerPlan(host, port, log_level, asgi_app, overrides, metrics)
    bound = sock.getsockname()[1]
    where = f"http://[{host}]:{bound}" if ":" in host else f"http://{host}:{bound}"
    try:
        return Supervisor(functools.partial(_serve_worker, plan), count, sock, where=where).run()
    finally:
        sock.close()


def _serve_overrides(forwarded_allow_ips: str | None) -> dict[str, str]:
    """Settings the command line gives, over the environment's."""
    overrides: dict[str, str] = {}
    if forwarded_allow_ips is not None:
        overrides["forwarded_allow_ips"] = forwarded_allow_ips
    elif not os.environ.get("JOBWIRE_FORWARDED_ALLOW_IPS") and os.environ.get("FORWARDED_ALLOW_IPS"):
        # uvicorn's own variable: a deployment that set it keeps its proxies trusted
        overrides["forwarded_allow_ips"] = os.environ["FORWARDED_ALLOW_IPS"]
    return overrides


def _workers(flag: str | None) -> int:
    """How many worker processes: `--workers`, else JOBWIRE_WORKERS, else 1."""
    from jobwire.server.workers import worker_count

    if flag is not None:
        return worker_count(flag, "--workers")
    variable = os.environ.get("JOBWIRE_WORKERS", "")
    return worker_count(variable, "JOBWIRE_WORKERS") if variable else 1


def _serve_app(asgi_app: str | None, overrides: dict[str, str]) -> tuple[Any, Settings]:
    """The app to serve and the settings uvicorn is configured from: jobwire's own, or the
    host app named `module:attribute` and the settings of the jobwire mounted in it (the
    proxies: as told here, if told)."""
    from jobwire.server.app import create_app
    from jobwire.settings import Settings

    settings = Settings.from_env(**overrides)
    if asgi_app is None:
        return create_app(settings), settings
    app, mounted = _host_app(asgi_app)
    trusted = settings.forwarded_allow_ips if overrides else mounted.forwarded_allow_ips
    return app, mounted.model_copy(update={"forwarded_allow_ips": trusted})


def _metrics_per_worker(settings: Settings, count: int) -> tuple[str, int] | None:
    """Where the first worker serves /metrics (JOBWIRE_METRICS_ADDR; each next worker on
    the next port), or None: on the main port. Refused when the ports run out."""
    from jobwire.settings import SettingsError

    listen = settings.metrics_listen
    if listen is not None and count > 1 and listen[1] + count - 1 > 65535:
        raise SettingsError(
            f"JOBWIRE_METRICS_ADDR {settings.metrics_addr}: {count} workers serve /metrics on "
            f"ports {listen[1]}-{listen[1] + count - 1}, past 65535"
        )
    return listen if count > 1 else None


@dataclass(frozen=True)
class _WorkerPlan:
    """What each worker process builds its server from (sent to it, so picklable)."""

    host: str
    port: int
    log_level: str
    asgi_app: str | None
    overrides: dict[str, str]
    metrics: tuple[str, int] | None  # the first worker's /metrics listener


def _serve_worker(plan: _WorkerPlan, index: int, sock: socket.socket, link: Link) -> None:
    """One worker of `jobwire serve --workers N`, in a process of its own: the server
    `jobwire serve` runs, on the supervisor's socket, with the same environment."""
    from jobwire.server.serving import Server, run, uvicorn_config
    from jobwire.server.workers import STARTUP_FAILURE
    from jobwire.settings import SettingsError
    from jobwire.tasks.attach import AttachError

    if plan.metrics is not None:  # each worker's own port, so that each can be scraped
        host, port = plan.metrics
        host = f"[{host}]" if ":" in host else host
        os.environ["JOBWIRE_METRICS_ADDR"] = f"{host}:{port + index}"
    # The supervisor built the same app from the same environment and has said its
    # warnings (the demo app served, JOBWIRE_AUTH=none) once: not once more per worker.
    logging.disable(logging.WARNING)
    try:
        app, settings = _serve_app(plan.asgi_app, plan.overrides)
    except (SettingsError, AttachError) as exc:  # the supervisor's checks passed: a file changed?
        _say_error(exc)
        raise SystemExit(STARTUP_FAILURE) from None
    finally:
        logging.disable(logging.NOTSET)
    config = uvicorn_config(app, settings, host=plan.host, port=plan.port, log_level=plan.log_level)
    _log_like_uvicorn()
    server = Server(config, on_started=link.serving)
    link.when_gone(lambda: setattr(server, "should_exit", True))  # the goodbye, then out
    run(server, sockets=[sock])


def _host_app(target: str) -> tuple[Any, Settings]:
    """The app named `module:attribute` (imported from the working directory, as uvicorn
    does), which must have jobwire mounted in it (`jobwire.mount`), and the settings that
    jobwire was built with."""
    import importlib

    from jobwire.server.celery_app import from_working_directory
    from jobwire.server.lifecycle import lifecycles_in
    from jobwire.settings import SettingsError

    module_name, sep, attr = target.partition(":")
    if not sep or not module_name or not attr:
        raise SettingsError(f"--app {target!r}: write it as module:attribute (e.g. main:app)")
    from_working_directory()
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        raise SettingsError(f"--app {target!r}: cannot import {module_name!r} ({exc})") from None
    app = getattr(module, attr, None)
    mounted = lifecycles_in(app) if app is not None else []
    if not mounted:
        raise SettingsError(
            f"--app {target!r}: {module_name}.{attr} has no jobwire mounted in it; call "
            "jobwire.mount(app, '/prefix') where the app is built"
        )
    return app, mounted[0].settings


def _log_like_uvicorn() -> None:
    """jobwire's own lines (a refused connection, the app it serves) through uvicorn's
    handler, at its level: left alone, only warnings would show, and unformatted."""
    uvicorn_log, jobwire_log = logging.getLogger("uvicorn"), logging.getLogger("jobwire")
    if not jobwire_log.handlers:
        for handler in uvicorn_log.handlers:
            jobwire_log.addHandler(handler)
    jobwire_log.setLevel(logging.getLogger("uvicorn.error").level)


#: Said at start when JOBWIRE_CELERY_APP is unset: an adopter who forgot it had every job
#: answer 404, with nothing saying that the demo app was served.
DEMO_WARNING = (
    "JOBWIRE_CELERY_APP is not set, so this server serves jobwire's demo app "
    "(jobwire.tasks.demo:app, on {redis}): jobs of your own app will answer 404. Set "
    "JOBWIRE_CELERY_APP to your Celery app as you pass it to `celery -A` (e.g. proj.celery "
    "or proj.celery:app)"
)


def _say_which_app(settings: Settings) -> None:
    """Warn when the demo app is served because nothing else was named; when it was named
    (`make run` names it), say so calmly."""
    from jobwire.settings import DEMO_APP

    log = logging.getLogger("jobwire.cli")
    if "celery_app" not in settings.model_fields_set:
        log.warning(DEMO_WARNING.format(redis=settings.redis_target.describe()))
    elif settings.celery_app == DEMO_APP:
        log.info("serving jobwire's demo app (JOBWIRE_CELERY_APP=%s)", DEMO_APP)


def cmd_cleanup_results() -> int:
    """Delete stored results that nothing refers to any more (see `jobwire.storage.cleanup`):
    safe in several processes at once (run it from cron, or a Celery beat task)."""
    from jobwire.redis_clients import sync_client
    from jobwire.server.celery_app import load_celery_app
    from jobwire.settings import Settings
    from jobwire.storage import cleanup, store_for
    from jobwire.tasks.results import result_exists_in

    settings = Settings.from_env()
    client = sync_client(settings.redis_target)
    deleted = cleanup(
        store_for(settings),
        lambda job_id: bool(client.exists(settings.keys.job(job_id))),
        max_age=settings.result_expires,
        result_exists=result_exists_in(load_celery_app(settings)),
    )
    out.print(f"deleted {deleted} stored result(s)")
    return 0


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="jobwire", description="Serve, watch and submit jobwire jobs.")
    p.add_argument(
        "--url", default=os.environ.get("JOBWIRE_URL", DEFAULT_URL), help="server (env JOBWIRE_URL)"
    )
    p.add_argument(
        "--token", default=os.environ.get("JOBWIRE_TOKEN"), help="bearer token (env JOBWIRE_TOKEN)"
    )
    sub = p.add_subparsers(dest="command", required=True)
    sub.add_parser("cleanup-results", help="delete stored results of expired jobs")
    sv = sub.add_parser("serve", help="run the web server (settings from JOBWIRE_* variables)")
    sv.add_argument(
        "--host", default=os.environ.get("HOST", "127.0.0.1"), help="default 127.0.0.1 (env HOST)"
    )
    sv.add_argument(
        "--port", type=int, default=int(os.environ.get("PORT", "8000")), help="default 8000 (env PORT)"
    )
    sv.add_argument(
        "--forwarded-allow-ips",
        metavar="IPS",
        help="reverse proxies whose X-Forwarded-For is believed: IPs or networks, comma-separated, "
        "or * (env JOBWIRE_FORWARDED_ALLOW_IPS; default: none)",
    )
    sv.add_argument(
        "--workers",
        metavar="N",
        help="serve the port from N processes, each with its own hub and limits; auto: one per "
        "usable core (env JOBWIRE_WORKERS; default 1: this process)",
    )
    sv.add_argument(
        "--app",
        metavar="MODULE:ATTR",
        help="serve your ASGI app, with jobwire mounted in it, as jobwire serves itself (keepalive, "
        "proxies, bounded heads, the 1001 goodbye)",
    )
    w = sub.add_parser("watch", help="follow a job until it ends; exit code tells how")
    w.add_argument("job_id")
    w.add_argument("--since", type=int, default=0, help="skip events up to this seq")
    s = sub.add_parser("submit", help="submit an allowed task")
    s.add_argument("task")
    s.add_argument("kwargs", nargs="*", metavar="key=value", help="task keyword arguments")
    s.add_argument("--watch", action="store_true", help="then watch it")
    st = sub.add_parser("status", help="status of one or more jobs")
    st.add_argument("job_ids", nargs="+")
    st.add_argument("--json", action="store_true", help="print JSON")
    return p


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    if args.command == "serve":
        return cmd_serve(args.host, args.port, args.forwarded_allow_ips, args.app, args.workers)
    if args.command == "cleanup-results":
        return cmd_cleanup_results()
    try:
        if args.command == "watch":
            coro = cmd_watch(args.url, args.job_id, args.since, token=args.token)
        elif args.command == "submit":
            coro = cmd_submit(args.url, args.task, _kv(args.kwargs), args.watch, args.token)
        else:
            coro = cmd_status(args.url, args.job_ids, args.json, args.token)
        return asyncio.run(coro)
    except JobNotFound as exc:
        _say_error(exc.message)
        return EXIT_NOT_FOUND
    except (JobwireError, ConnectionError, OSError) as exc:
        _say_error(exc)
        return EXIT_UNREACHABLE
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
