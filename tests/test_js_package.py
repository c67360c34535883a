"""The npm package `jobwire` (js/) as a user installs it: packed, installed, type-checked by
TypeScript, and run by Node against a real server and worker.

One scratch npm project per run holds the `npm pack` tarball, typescript@5, ws@8 and
@types/ws@8 (from the registry), and the consumers in tests/js/. What is checked:

- `tsc --strict` compiles a browser consumer (resolved through the package's `exports` and
  `types`, `jobwire/progress` included) and a Node one (nodenext, no DOM, `ws`'s WebSocket
  injected), and fails on `subscribe(42)` and `event.stat`, with those errors and no other;
  the types of `Op`, `Msg`, `Close` and the server's error codes equal jobwire/protocol.py's.
- Node watches a job to SUCCESS over `ws`, with no WebSocket by polling through fetch, and
  falling back from refused websockets, gap-free; it calls `close()` at the final event and
  must then exit by itself, at once.
- With nothing listening, onError says `unreachable` once; with a server that never
  answers, close() aborts what hangs; either way Node exits at once after close().
- Bad options are TypeErrors that say what to pass.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import shutil
import subprocess
import tarfile
import tomllib
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from jobwire import protocol
from jobwire.settings import Settings
from tests.clients import LIFECYCLE, assert_gap_free, submit
from tests.support import ROOT, Worker, free_port, run_server

PACKAGE = ROOT / "js"
CONSUMERS = ROOT / "tests" / "js"
NODE, NPM = shutil.which("node") or "", shutil.which("npm") or ""

if not (NODE and NPM):
    if os.environ.get("CI"):
        raise RuntimeError("CI must run the npm package's tests: install Node.js >= 20 with npm")
    pytest.skip("node or npm is not installed: the npm package is not tested", allow_module_level=True)
NODE_VERSION = subprocess.run([NODE, "--version"], capture_output=True, text=True, check=True).stdout.strip()
if int(NODE_VERSION.lstrip("v").split(".")[0]) < 20:
    # The package says `engines: {node: ">=20"}`: an older Node proves nothing about it.
    if os.environ.get("CI"):
        raise RuntimeError(f"CI must run the npm package's tests on Node >= 20, not {NODE_VERSION}")
    pytest.skip(f"Node {NODE_VERSION} is older than the package's Node >= 20", allow_module_level=True)

INSTALL = ["typescript@5", "ws@8", "@types/ws@8"]
EXIT_WITHIN = 30.0  # seconds a watch may take, to the job's end and the process's own exit
# How long Node may run on after close(): its exit, and a websocket's close handshake with a
# local server. A timer close() forgot is far longer (a 5 s heartbeat watchdog here, a 30 s
# climb back to WebSocket, a reconnect backoff of at least 400 ms).
LINGER_MS = 300

# Compiler settings per check: strict everywhere, and resolution through `exports`.
STRICT = {"strict": True, "noEmit": True, "target": "es2022", "types": [], "pretty": False}
BUNDLER = {**STRICT, "module": "esnext", "moduleResolution": "bundler"}
TSCONFIGS = {
    "browser": {
        "compilerOptions": {**BUNDLER, "lib": ["es2022", "dom"], "noUncheckedSideEffectImports": True},
        "files": ["consumer.ts", "contract.ts"],
    },
    "node": {
        "compilerOptions": {
            **STRICT,
            "module": "nodenext",
            "moduleResolution": "nodenext",
            "lib": ["es2022"],
        },
        "files": ["consumer-node.ts"],
    },
    "wrong": {
        "compilerOptions": {**BUNDLER, "lib": ["es2022"]},
        "files": ["bad_subscribe.ts", "bad_field.ts"],
    },
}


def run(*args: str, cwd: Path, timeout: float = 180) -> subprocess.CompletedProcess[str]:
    return subprocess.run(args, cwd=cwd, capture_output=True, text=True, timeout=timeout, check=False)


@pytest.fixture(scope="module")
def packed(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tarball `npm pack js/` makes."""
    out = tmp_path_factory.mktemp("pack")
    done = run(NPM, "pack", str(PACKAGE), "--json", "--pack-destination", str(out), cwd=out)
    assert done.returncode == 0, done.stderr
    return out / json.loads(done.stdout)[0]["filename"]


@pytest.fixture(scope="module")
def project(packed: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A scratch npm project with the tarball installed, as a user's would be."""
    root = tmp_path_factory.mktemp("consumer")
    (root / "package.json").write_text(json.dumps({"name": "consumer", "private": True, "type": "module"}))
    done = run(NPM, "install", str(packed), *INSTALL, "--no-audit", "--no-fund", cwd=root)
    assert done.returncode == 0, done.stderr
    for consumer in CONSUMERS.iterdir():
        shutil.copy(consumer, root / consumer.name)
    (root / "contract.ts").write_text(contract_check())
    for name, config in TSCONFIGS.items():
        (root / f"tsconfig.{name}.json").write_text(json.dumps(config))
    return root


def tsc(project: Path, config: str) -> tuple[int, list[str]]:
    done = run(
        str(project / "node_modules/.bin/tsc"), "-p", f"tsconfig.{config}.json", cwd=project, timeout=120
    )
    return done.returncode, [line for line in done.stdout.splitlines() if ": error TS" in line]


# -- the package ---------------------------------------------------------------------------------


def test_package_json_names_the_same_version_as_pyproject() -> None:
    manifest = json.loads((PACKAGE / "package.json").read_text())
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    assert (manifest["name"], manifest["version"]) == ("jobwire", pyproject["version"])
    assert manifest["type"] == "module" and manifest["license"] == "MIT"
    assert manifest["engines"] == {"node": ">=20"}
    assert not manifest.get("dependencies"), "the client has no runtime dependencies"
    assert manifest["exports"]["."] == {"types": "./jobwire.d.ts", "default": "./jobwire.js"}
    progress = {"types": "./jobwire-progress.d.ts", "default": "./jobwire-progress.js"}
    assert manifest["exports"]["./progress"] == progress
    assert manifest["sideEffects"] == ["./jobwire-progress.js"]


def test_the_tarball_holds_the_client_its_types_and_the_element_only(packed: Path) -> None:
    with tarfile.open(packed) as tar:
        files = sorted(name.removeprefix("package/") for name in tar.getnames())
    assert files == [
        "README.md",
        "jobwire-progress.d.ts",
        "jobwire-progress.js",
        "jobwire.d.ts",
        "jobwire.js",
        "package.json",
    ]


# -- types ---------------------------------------------------------------------------------------


def contract_check() -> str:
    """TypeScript that compiles only if jobwire.d.ts declares `Op`, `Msg` and `Close` with
    exactly protocol.py's names and values, and `ServerErrorCode` as its error codes."""
    lines = [
        'import { Close, Msg, Op, type ServerErrorCode } from "jobwire";',
        "type Same<A, B> =",
        "  (<T>() => T extends A ? 1 : 2) extends <T>() => T extends B ? 1 : 2 ? true : false;",
    ]
    for cls in (protocol.Op, protocol.Msg, protocol.Close):
        names = {n: v for n, v in vars(cls).items() if n.isupper()}
        every = " | ".join(json.dumps(n) for n in names)
        lines.append(f"export const {cls.__name__}_names: Same<keyof typeof {cls.__name__}, {every}> = true;")
        for name, value in names.items():
            check = f"Same<(typeof {cls.__name__})[{json.dumps(name)}], {json.dumps(value)}>"
            lines.append(f"export const {cls.__name__}_{name}: {check} = true;")
    codes = " | ".join(json.dumps(c) for c in protocol.ERROR_STATUS)
    lines.append(f"export const error_codes: Same<ServerErrorCode, {codes}> = true;")
    return "\n".join(lines) + "\n"


def test_strict_typescript_compiles_a_browser_consumer_and_the_contract(project: Path) -> None:
    """Through `exports` (bundler resolution), with `jobwire/progress` and the DOM: the
    consumer compiles, and so does the check that the types mirror jobwire/protocol.py."""
    code, errors = tsc(project, "browser")
    contract = (project / "contract.ts").read_text().splitlines()
    named = [
        f"{e}\n    {contract[int(e.split('(')[1].split(',')[0]) - 1]}" for e in errors if "contract.ts" in e
    ]
    assert (code, errors) == (0, []), "\n".join(named or errors)


def test_strict_typescript_compiles_a_node_consumer_without_the_dom(project: Path) -> None:
    """Node's own resolution (nodenext), no DOM types, `ws`'s WebSocket injected."""
    assert tsc(project, "node") == (0, [])


def test_strict_typescript_rejects_a_number_for_ids_and_a_misspelt_field(project: Path) -> None:
    code, errors = tsc(project, "wrong")
    located = sorted(e.split(":")[0] + " " + e.split("error ")[1].split(":")[0] for e in errors)
    assert code != 0
    # Exactly these two, so a setup broken for another reason (no types found) cannot pass.
    assert located == ["bad_field.ts(4,16) TS2551", "bad_subscribe.ts(4,18) TS2345"], errors


# -- Node ----------------------------------------------------------------------------------------


async def node(project: Path, *args: str, timeout: float = EXIT_WITHIN) -> tuple[int | None, list[Any], str]:
    """Run `node <args>` in the project: its exit code (None: still running at `timeout`,
    then killed), its stdout as JSON lines, and its stderr."""
    out, err = project / "node.out", project / "node.err"
    with out.open("wb") as stdout, err.open("wb") as stderr:
        proc = await asyncio.create_subprocess_exec(NODE, *args, cwd=project, stdout=stdout, stderr=stderr)
        try:
            code: int | None = await asyncio.wait_for(proc.wait(), timeout)
        except TimeoutError:
            proc.kill()
            await proc.wait()
            code = None
    lines = [json.loads(line) for line in out.read_text().splitlines() if line.strip()]
    return code, lines, err.read_text()


@pytest.mark.parametrize(
    ("mode", "served", "offered", "used", "delay"),
    [
        ("ws", None, ("websocket", "polling"), "websocket", 0.2),
        ("bare", None, ("polling", "polling"), "polling", 0.2),
        # Slower steps: the job still runs once polling is live, so the climb back is armed.
        ("ws", ("sse", "polling"), ("websocket", "polling"), "polling", 1.5),
    ],
    ids=["ws-injected", "no-websocket-polls", "websocket-refused-falls-back"],
)
async def test_node_watches_a_job_to_success_and_exits_after_close(
    project: Path,
    settings: Settings,
    worker: Worker,
    mode: str,
    served: tuple[str, ...] | None,
    offered: tuple[str, str],
    used: str,
    delay: float,
) -> None:
    """The packed client in Node: every event in order to SUCCESS, then close() and the
    process ends by itself at once (no process.exit: a timer or socket left alive would
    hold it). Without a WebSocket (Node 20) it polls through fetch; with websockets refused
    by the server it falls back to polling (and would climb back: that timer must go too)."""
    if served is not None:
        settings = settings.model_copy(update={"transports": served})
    async with run_server(settings) as srv:
        job_id = await submit(srv.url, "long_running_task", delay=delay)
        code, lines, stderr = await node(project, "watch.mjs", srv.url, job_id, mode)
    assert code == 0, f"node did not exit by itself after close() (code {code}): {lines[-3:]} {stderr}"
    [transports] = [line["transports"] for line in lines if "transports" in line]
    assert (transports[0], transports[-1]) == offered, transports
    events = [line["event"] for line in lines if "event" in line]
    assert_gap_free(events)
    assert [e["state"] for e in events] == LIFECYCLE  # transitions all: none coalesced
    assert {line["transport"] for line in lines if "event" in line} == {used}
    assert [line["error"] for line in lines if "error" in line] == []
    statuses = [line["status"]["status"] for line in lines if "status" in line]
    assert statuses[-1] == "closed"
    if served:  # (elsewhere "live" may never show: one poll can bring every event)
        assert "live" in statuses, "the job ended before polling was live: nothing armed a climb back"
    assert lines[-1]["lingered"] < LINGER_MS, f"the process lingered after close(): {lines[-1]}"


async def test_node_says_unreachable_once_and_exits_after_close(project: Path) -> None:
    """Nothing listens: websocket, then polling, each fail twice; onError gets one
    `unreachable` that says what to check, the client keeps polling, and close() clears
    the backoff timer armed for the next poll: Node exits at once."""
    base_url = f"http://127.0.0.1:{free_port()}"
    code, lines, stderr = await node(project, "unreachable.mjs", base_url)
    assert code == 0, f"node did not exit by itself after close(): {stderr}"
    [report] = lines
    [error] = report["errors"]
    assert error["code"] == "unreachable"
    for hint in (base_url, "websocket, then polling", "ECONNREFUSED", "JOBWIRE_ALLOWED_ORIGINS"):
        assert hint in error["message"]
    assert report["failed"] == report["toldAt"] + 2, "it kept trying after saying so"
    assert report["statuses"][-1] == ["closed", "polling"]
    assert report["lingered"] < LINGER_MS, report


@contextlib.asynccontextmanager
async def silent_server() -> AsyncIterator[str]:
    """A server that accepts connections, reads what comes, and never answers."""

    async def hold(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while await reader.read(65536):
            pass
        writer.close()

    server = await asyncio.start_server(hold, "127.0.0.1", 0)
    async with server:
        yield f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}"


@pytest.mark.parametrize("mode", ["poll", "ws"])
async def test_node_exits_after_close_with_a_connection_hanging(project: Path, mode: str) -> None:
    """close() aborts a poll waiting for its answer and drops a websocket waiting for its
    handshake, so a hung server cannot keep the process alive."""
    async with silent_server() as url:
        code, lines, stderr = await node(project, "silent.mjs", url, mode, timeout=15)
    assert code == 0, f"node did not exit by itself after close() (code {code}): {stderr}"
    [report] = lines
    assert report["status"] == "closed" and report["lingered"] < LINGER_MS, report


BAD_OPTIONS = """
const { JobwireClient } = await import(process.argv[1]);
const tries = {
  noBaseUrl: () => new JobwireClient({}),
  wsBaseUrl: () => new JobwireClient({ baseUrl: "ws://127.0.0.1:8000" }),
  noEventSource: () => new JobwireClient({ baseUrl: "http://127.0.0.1:9", transports: ["sse"] }),
  unknownTransport: () => new JobwireClient({ baseUrl: "http://127.0.0.1:9", transports: ["websockets"] }),
  badCallback: () => new JobwireClient({ baseUrl: "http://127.0.0.1:9", onEvent: "log" }),
  idsNotAnArray: () => {
    const client = new JobwireClient({ baseUrl: "http://127.0.0.1:9", transports: ["polling"] });
    try { client.subscribe("4c7f"); } finally { client.close(); }
  },
};
const told = {};
for (const [name, attempt] of Object.entries(tries)) {
  try { attempt(); told[name] = null; } catch (e) { told[name] = `${e.name}: ${e.message}`; }
}
console.log(JSON.stringify(told));
"""


def test_node_refuses_bad_options_with_a_type_error_that_says_what_to_do() -> None:
    """In Node there is no page: no `baseUrl` is a TypeError naming it; so is a transport
    that cannot run there, an unknown one, a callback that is not a function, and ids that
    are not an array. (The process ends: nothing was left running.)"""
    done = subprocess.run(
        [NODE, "--input-type=module", "-e", BAD_OPTIONS, (PACKAGE / "jobwire.js").as_uri()],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    told = json.loads(done.stdout)
    assert all(message and message.startswith("TypeError: JobwireClient: ") for message in told.values()), (
        told
    )
    assert "`baseUrl` is required" in told["noBaseUrl"] and "http://127.0.0.1:8000" in told["noBaseUrl"]
    assert "http: or https:" in told["wsBaseUrl"]
    assert "pass `WebSocket` (from the `ws` package)" in told["noEventSource"]
    assert 'unknown transport "websockets"' in told["unknownTransport"]
    assert "onEvent must be a function" in told["badCallback"]
    assert "subscribe() takes an array of job ids, got string" in told["idsNotAnArray"]


async def test_a_handshake_that_never_ends_counts_as_a_failed_open(project: Path) -> None:
    """A server (or a proxy) that accepts the socket and never answers the upgrade: after
    `connectTimeout` ms each try counts as a failed open, so the client says `unreachable`
    instead of "connecting" forever."""
    async with silent_server() as url:
        code, lines, stderr = await node(project, "held.mjs", url, timeout=15)
    assert code == 0, f"node did not exit by itself (code {code}): {stderr}"
    [report] = lines
    [error] = report["errors"]
    assert error["code"] == "unreachable" and "did not open within 200 ms" in error["message"], error
    assert "live" not in report["statuses"] and report["lingered"] < LINGER_MS, report
