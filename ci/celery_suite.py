"""Celery's own integration suite, plain and with jobwire attached: same outcome, test by test.

    make celery-suite                     # or: .venv/bin/python ci/celery_suite.py
    .venv/bin/python ci/celery_suite.py --runs plain,attached --keep -- -k chord

What it does (issue 16, "Celery's own suite in CI"):

1. Downloads the source distribution of the *installed* Celery from PyPI (`pip download
   --no-binary :all:`) into .cache/celery-sdist/ (reused when there) and extracts its
   `t/integration`, with the `t/__init__.py`, `t/skip.py` and `t/canvas_helpers.py` it
   imports, into a scratch folder, with Celery's own pytest settings (its pyproject's markers
   and `xfail_strict`). Celery's files are used as they come.
2. Runs MODULES (less DESELECT) three times, all side by side, each run in SHARDS pytest
   processes (test_canvas in one, the rest in the other), each process against a redis-server
   of its own on a free port (broker and backend; never 6379), started here and waited for
   with PING, and with the suite's own worker (`celery_session_worker`: a worker thread in
   the test process, with a prefork pool). The suite waits on its worker and on timeouts
   nearly all the time (~10% of a core per process), so side by side costs little:
   - plain:    Celery as installed;
   - attached: `jobwire.attach()` on every app of the suite, in the test process and so in
               the worker and its pool children (ci/jobwire_attach_plugin.py, `-p`);
   - offload:  attached, with JOBWIRE_RESULT_OFFLOAD_BYTES=1024, so Celery's own tests go
               through jobwire's large-result path (files in a temporary JOBWIRE_RESULT_DIR).
   ci/celery_suite_harness.py drives all three alike (see there: the manager fixture's idle
   check, at most MAX_RERUNS reruns of Celery's flaky tests, a deadline); every other test
   that fails gets RERUNS more try, in every run alike (Celery's suite has flakes of its own).
3. Compares the outcome of every test (pytest's --junitxml) with the plain run's. Tests that
   fail on plain Celery are listed, not hidden; any difference, a run that did not complete,
   or an attached run in which jobwire was not attached exits 1.

Left out, to stay within ~6 minutes on 2 cores: the tests in DESELECT (below, with why:
each waits out timeouts by design), and the other modules of t/integration: test_inspect
and test_worker (remote control, no results), test_serialization (worker subprocesses of its
own), test_backend, test_cache_backend, test_database_backend (other backends, skipped
without their services), test_beat, test_loader, test_security, test_logfile_format,
test_upgrade, test_connection_recovery, test_request_backend_down and the memory-leak tests.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tarfile
import tempfile
import threading
import time
import tomllib
import xml.etree.ElementTree as ET
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
CI_DIR = Path(__file__).resolve().parent
CACHE = ROOT / ".cache" / "celery-sdist"
# In the order `pytest t/integration` runs them (Celery's CI): the order matters to tests
# that count Redis pub/sub channels left over by earlier ones.
MODULES = ("test_canvas", "test_group_chains", "test_redis_backend", "test_tasks")
# Tests of those modules left out, with their seconds on plain Celery here: each waits out
# timeouts by design. Together they are ~8 of the ~14 minutes the four modules take.
DESELECT = {
    # 7 or 10 chord headers each, and for each an errback that must *not* run, waited for 10 s
    "test_canvas.py::test_chord::test_disabling_flag_allow_error_cb_on_chord_header": 148,
    "test_canvas.py::test_chord::test_enabling_flag_allow_error_cb_on_chord_header": 85,
    "test_canvas.py::test_chord::test_flag_allow_error_cb_on_chord_header_on_upgraded_chord": 67,
    "test_canvas.py::test_chord::test_nested_chord_header_link_error": 21,
    # xfail with a Redis backend (Celery issue #6437): waits its whole 60 s get() timeout
    "test_canvas.py::test_chord::test_error_propagates_from_chord": 61,
    # xfail, waits out its timeout
    "test_canvas.py::test_chord::test_redis_subscribed_channels_leak": 11,
    # one second per header task; sizes 3 and 4 stay
    "test_canvas.py::test_chord::test_generator[5]": 5,
    "test_canvas.py::test_chord::test_generator[6]": 6,
    "test_canvas.py::test_chord::test_generator[7]": 7,
    "test_canvas.py::test_chord::test_generator[8]": 8,
    "test_canvas.py::test_chord::test_generator[9]": 9,
    # an ETA of 10 s (test_tasks' test_eta keeps ETAs covered)
    "test_canvas.py::test_chain::test_chain_error_handler_with_eta": 10,
    # a join that must time out
    "test_canvas.py::test_result_set::test_join_exhausted_timeout": 5,
    # revoking by stamped headers (no result path): ~20 s, and rerun as flaky on plain Celery
    "test_tasks.py::test_tasks::test_revoked_by_headers_complex_canvas": 36,
}
RUNS = ("plain", "attached", "offload")
OFFLOAD_BYTES = 1024
# Files of the sdist's t/ the integration suite imports besides t/integration itself.
T_FILES = ("t/__init__.py", "t/skip.py", "t/canvas_helpers.py")
DEADLINE = 480  # seconds into a run after which its remaining tests are skipped, as not run
RUN_TIMEOUT = DEADLINE + 420  # then the run is stopped (a test hung past its own timeout)
TEST_TIMEOUT = 180  # pytest-timeout for tests without a timeout mark of Celery's own
MAX_RERUNS = 2  # for the tests Celery marks flaky(reruns=5)
RERUNS = 1  # for every other test: Celery's own flakes (seen: a frozen chord's second body)
SHARDS = 2  # pytest processes per run, each with its own Redis and worker, side by side
# Seconds per module on plain Celery here (less DESELECT), to share them out among shards.
WEIGHT = {"test_canvas": 230, "test_tasks": 110, "test_group_chains": 5, "test_redis_backend": 5}
NOT_RUN = "not-run"

_print_lock = threading.Lock()
_live: set[subprocess.Popen[bytes]] = set()  # the pytest processes running, for an interrupt


def say(*parts: object) -> None:
    with _print_lock:
        print("celery-suite:", *parts, flush=True)


# --- the suite ---------------------------------------------------------------------------


def celery_sdist(version: str) -> Path:
    """The sdist of celery==version, from the cache or from PyPI."""
    CACHE.mkdir(parents=True, exist_ok=True)
    ignore = CACHE.parent / ".gitignore"  # the cache ignores itself: nothing to commit there
    if not ignore.exists():
        ignore.write_text("*\n")
    path = CACHE / f"celery-{version}.tar.gz"
    if path.exists() and tarfile.is_tarfile(path):
        say(f"using the cached {path.relative_to(ROOT)}")
        return path
    path.unlink(missing_ok=True)
    say(f"downloading the source distribution of celery=={version} from PyPI")
    for attempt in (1, 2, 3):  # an index that blinks in CI gets two more tries
        done = subprocess.run(
            [sys.executable, "-m", "pip", "download", "--quiet", "--no-binary", ":all:", "--no-deps",
             "--dest", str(CACHE), f"celery=={version}"],
        )  # fmt: skip
        if done.returncode == 0 or attempt == 3:
            break
        say(f"pip download failed (exit {done.returncode}); trying again")
        time.sleep(5 * attempt)
    if not path.exists():
        raise SystemExit(f"celery-suite: pip download left no {path.name} in {CACHE}")
    return path


def extract_suite(sdist: Path, dest: Path) -> None:
    """t/integration and what it imports from t/, plus a pytest.ini of Celery's settings."""
    with tarfile.open(sdist) as tar:
        top = tar.getnames()[0].split("/", 1)[0]
        wanted = [
            m
            for m in tar.getmembers()
            if m.name.split("/", 1)[-1] in T_FILES or m.name.startswith(f"{top}/t/integration/")
        ]
        pyproject = tar.extractfile(f"{top}/pyproject.toml")
        assert pyproject is not None
        ini = tomllib.loads(pyproject.read().decode())["tool"]["pytest"]["ini_options"]
        for m in wanted:
            m.name = m.name.split("/", 1)[1]
        tar.extractall(dest, members=wanted, filter="data")
    missing = [f for f in (*T_FILES, "t/integration/conftest.py") if not (dest / f).exists()]
    if missing:
        raise SystemExit(f"celery-suite: the sdist has no {', '.join(missing)}")
    # Celery's own pytest settings, less testpaths (t/unit).
    lines = ["[pytest]", f"addopts = {ini.get('addopts', '')}"]
    for key in ("python_classes", "xfail_strict"):
        if key in ini:
            value = ini[key]
            lines.append(f"{key} = {str(value).lower() if isinstance(value, bool) else value}")
    lines.append("markers =")
    lines += [f"    {m}" for m in ini.get("markers", [])]
    (dest / "pytest.ini").write_text("\n".join(lines) + "\n")


# --- Redis -------------------------------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _ping(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=1) as s:
            s.sendall(b"PING\r\n")
            return s.recv(64).startswith(b"+PONG")
    except OSError:
        return False


class RedisServer:
    """A redis-server of our own on a free port, stopped when the run ends."""

    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        self.proc: subprocess.Popen[bytes] | None = None
        self.port = 0

    def __enter__(self) -> RedisServer:
        exe = shutil.which("redis-server")
        if exe is None:
            raise RuntimeError("needs redis-server on the PATH (apt-get install redis-server)")
        for _attempt in range(5):  # a free port can be taken between the check and the bind
            self.port = _free_port()
            with open(self.workdir / f"redis-{self.port}.log", "wb") as log:
                self.proc = subprocess.Popen(
                    [exe, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "",
                     "--appendonly", "no", "--dir", str(self.workdir)],
                    stdout=log, stderr=subprocess.STDOUT,
                )  # fmt: skip
            deadline = time.monotonic() + 20
            while time.monotonic() < deadline and self.proc.poll() is None:
                if _ping(self.port):
                    return self
                time.sleep(0.05)  # polling PING: the next try, not a guess at readiness
            self._stop()
        raise RuntimeError(f"redis-server did not answer PING (its logs: {self.workdir})")

    def _stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc = None

    def __exit__(self, *exc: object) -> None:
        self._stop()


# --- runs --------------------------------------------------------------------------------


@dataclass
class Run:
    name: str
    outcomes: dict[str, str] = field(default_factory=dict)
    details: dict[str, str] = field(default_factory=dict)
    wall: float = 0.0
    problems: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)


def parse_junit(path: Path) -> tuple[dict[str, str], dict[str, str]]:
    """{test id: outcome}, {test id: the report's text} from a pytest junit xml.

    Outcomes: passed, failed, error, skipped, xfailed and not-run (skipped past the
    deadline). A test with several reports (a failure and a teardown error, subtests) gets
    them joined: "error+failed".
    """
    outcomes: dict[str, str] = {}
    details: dict[str, str] = {}
    for case in ET.parse(path).getroot().iter("testcase"):
        module = case.get("classname", "").replace(".", "/")
        test_id = f"{module}::{case.get('name', '')}"
        kinds = []
        text = []
        for child in case:
            if child.tag in ("failure", "error"):
                kinds.append("failed" if child.tag == "failure" else "error")
                text.append(f"[{child.tag}]\n{child.text or child.get('message', '')}")
            elif child.tag == "skipped":
                message = child.get("message", "")
                if child.get("type") == "pytest.xfail":
                    kinds.append("xfailed")
                elif "deadline passed" in message:
                    kinds.append(NOT_RUN)
                else:
                    kinds.append("skipped")
                text.append(message)
        outcome = "+".join(sorted(set(kinds))) if kinds else "passed"
        if test_id in outcomes and outcomes[test_id] != outcome:
            outcome = "+".join(sorted(set(outcomes[test_id].split("+")) | set(outcome.split("+"))))
            if len(outcome.split("+")) > 1 and "passed" in outcome.split("+"):
                outcome = "+".join(o for o in outcome.split("+") if o != "passed")
        outcomes[test_id] = outcome
        if text:
            details[test_id] = "\n".join(filter(None, [details.get(test_id, ""), *text]))
    return outcomes, details


def _module_path(test_id: str) -> str:
    """t/integration/test_canvas/test_chord::x (from junit's classname) -> the node id."""
    head, _, name = test_id.partition("::")
    parts = head.split("/")
    for i, part in enumerate(parts):
        if part.startswith("test_"):  # the module; classes after it (Celery's are test_* too)
            return "::".join(["/".join(parts[: i + 1]) + ".py", *parts[i + 1 :], name])
    return test_id


def deselected(modules: list[str]) -> list[str]:
    return [t for t in DESELECT if t.split(".py::")[0] in modules]


def shards(modules: list[str], count: int) -> list[list[str]]:
    """`modules` in `count` groups of about equal time (each in the order given)."""
    groups: list[list[str]] = [[] for _ in range(max(1, min(count, len(modules))))]
    loads = [0] * len(groups)
    for m in sorted(modules, key=lambda m: -WEIGHT.get(m, 10)):
        lightest = loads.index(min(loads))
        groups[lightest].append(m)
        loads[lightest] += WEIGHT.get(m, 10)
    return [sorted(g, key=modules.index) for g in groups]


@dataclass
class Shard:
    run: str
    out: Path
    modules: list[str]
    exit_code: int | None = None
    wall: float = 0.0
    problems: list[str] = field(default_factory=list)

    @property
    def log(self) -> Path:
        return self.out / "pytest.log"


def run_shard(shard: Shard, scratch: Path, extra: list[str], deadline: float) -> Shard:
    """One pytest process over `shard.modules`, with its own redis-server and worker."""
    name, out = shard.run, shard.out
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("JOBWIRE_", "PYTEST_", "TEST_"))}
    env.update(
        # See the Makefile: autoloading every installed plugin trips a CPython 3.11.7 bug;
        # the plugins the suite needs are named below.
        PYTEST_DISABLE_PLUGIN_AUTOLOAD="1",
        PYTHONDONTWRITEBYTECODE="1",
        PYTHONPATH=os.pathsep.join(filter(None, [str(CI_DIR), os.environ.get("PYTHONPATH")])),
        CELERY_SUITE_DEADLINE=str(deadline),
        CELERY_SUITE_MAX_RERUNS=str(MAX_RERUNS),
    )
    cmd = [
        sys.executable, "-m", "pytest", "-c", str(scratch / "pytest.ini"), "--rootdir", str(scratch),
        "-p", "no:cacheprovider", "-p", "celery.contrib.pytest", "-p", "rerunfailures",
        "-p", "timeout", "-p", "celery_suite_harness", f"--timeout={TEST_TIMEOUT}",
        f"--reruns={RERUNS}", "--reruns-delay=1",
        "-q", "--tb=short", "-rfEX", "--durations=15", f"--junitxml={out / 'junit.xml'}",
        "-o", "junit_family=xunit1",
    ]  # fmt: skip
    if name != "plain":
        env.update(
            JOBWIRE_SUITE_ATTACH_LOG=str(out / "attach.jsonl"),
            JOBWIRE_RESULT_STORE="file",
            JOBWIRE_RESULT_DIR=str(out / "results"),
        )
        cmd += ["-p", "jobwire_attach_plugin"]
    if name == "offload":
        env["JOBWIRE_RESULT_OFFLOAD_BYTES"] = str(OFFLOAD_BYTES)
    cmd += [f"t/integration/{m}.py" for m in shard.modules]
    cmd += [f"--deselect=t/integration/{t}" for t in deselected(shard.modules)]
    cmd += extra
    limit = deadline + RUN_TIMEOUT - DEADLINE
    start = time.monotonic()
    try:
        with RedisServer(out) as redis, open(shard.log, "wb") as log:
            url = f"redis://127.0.0.1:{redis.port}/0"
            env.update(TEST_BROKER=url, TEST_BACKEND=url, REDIS_HOST="127.0.0.1", REDIS_PORT=str(redis.port))
            say(f"run {name}: {', '.join(shard.modules)}: Redis on port {redis.port}, log {shard.log}")
            proc = subprocess.Popen(
                cmd, cwd=scratch, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
            )
            _live.add(proc)
            try:
                shard.exit_code = proc.wait(limit)
            except subprocess.TimeoutExpired:
                shard.problems.append(f"did not finish in {limit:.0f} s: stopped")
            finally:
                _kill_group(proc)  # and the pool children a crash may leave behind
                _live.discard(proc)
    except RuntimeError as e:
        shard.problems.append(str(e))
    shard.wall = time.monotonic() - start
    if shard.exit_code not in (0, 1, None):
        shard.problems.append(f"pytest exited {shard.exit_code}, not for a failed test: see {shard.log}")
    return shard


def collect(name: str, parts: list[Shard], deadline: float) -> Run:
    """One run's outcomes, from its shards (which ran side by side)."""
    run = Run(name)
    run.wall = max(s.wall for s in parts)
    for shard in parts:
        run.problems += shard.problems
        junit = shard.out / "junit.xml"
        if junit.exists():
            outcomes, details = parse_junit(junit)
            run.outcomes.update({_module_path(t): o for t, o in outcomes.items()})
            run.details.update({_module_path(t): d for t, d in details.items()})
        else:
            run.problems.append(f"pytest wrote no junit xml: see {shard.log}")
        if name != "plain":
            _check_attached(run, shard.out / "attach.jsonl", ", ".join(shard.modules))
    not_run = sum(o == NOT_RUN for o in run.outcomes.values())
    if not_run:
        run.problems.append(f"{not_run} test(s) not run: the run passed its {deadline:.0f} s deadline")
    if name == "offload":
        stored = [p for s in parts if (s.out / "results").exists() for p in (s.out / "results").rglob("*")]
        run.notes.append(f"{sum(p.is_file() for p in stored)} result file(s) offloaded to JOBWIRE_RESULT_DIR")
    say(f"run {name}: {len(run.outcomes)} tests in {run.wall:.0f} s")
    return run


def confirm(runs: list[Run], work: Path, scratch: Path, extra: list[str], deadline: float) -> None:
    """Run the tests whose outcome differed once more, in every run's configuration side by
    side. A difference that does not come back is a flake of that test (plain Celery's own
    suite has some: seen once, plain failing a task-replacement test twice in a row while
    both attached runs passed it); it is listed as such and counted the same. One that
    comes back stands."""
    plain = runs[0]
    tests = sorted({t for r in runs[1:] for t in r.outcomes if r.outcomes[t] != plain.outcomes.get(t)})
    tests = [t for t in tests if all(r.outcomes.get(t) != NOT_RUN for r in runs)]
    if not tests:
        return
    say(f"{len(tests)} test(s) differ: each runs again in every configuration, to tell a flake")
    jobs = [Shard(r.name, work / r.name / "confirm", []) for r in runs]
    args = [*extra, *tests]
    threads = [threading.Thread(target=run_shard, args=(j, scratch, args, deadline)) for j in jobs]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    again = {j.run: collect(j.run, [j], deadline) for j in jobs}
    for r in runs[1:]:
        for t in tests:
            if r.outcomes.get(t) == plain.outcomes.get(t):
                continue
            first = f"{plain.outcomes.get(t)} plain, {r.outcomes.get(t)} {r.name}"
            now_plain, now = again["plain"].outcomes.get(t), again[r.name].outcomes.get(t)
            if now is not None and now == now_plain:
                r.notes.append(f"{t}: {first} at first; both {now} again: a flake, counted the same")
                r.outcomes[t] = plain.outcomes[t]
            else:
                r.notes.append(f"{t}: {first} at first; {now_plain} plain, {now} {r.name} again: it stands")


def _kill_group(proc: subprocess.Popen[bytes]) -> None:
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
    proc.wait()


def _check_attached(run: Run, attach_log: Path, where_run: str) -> None:
    """Did jobwire attach to the suite's apps, worker and pool children included?"""
    records = []
    if attach_log.exists():
        records = [json.loads(line) for line in attach_log.read_text().splitlines() if line.strip()]
    if not any(r["event"] == "plugin-loaded" for r in records):
        run.problems.append(f"{where_run}: the attach plugin was not loaded")
        return
    attached = [r for r in records if r["event"] == "attached"]
    skipped = [r for r in records if r["event"] == "skipped"]
    children = [r for r in records if r["event"] == "pool-child"]
    where = Counter(str(r["where"]) for r in attached)
    places = ", ".join(f"{n} at {w}" for w, n in sorted(where.items()))
    run.notes.append(
        f"{where_run}: attached {len(attached)} app(s) ({places}); "
        f"{len(skipped)} without a Redis backend left alone; "
        f"{sum(bool(r['attached']) for r in children)} of {len(children)} worker pool child(ren) attached"
    )
    if not where["fixture celery_session_app"]:
        run.problems.append(f"{where_run}: the worker's app (celery_session_app) was not attached")
    if not children:
        run.problems.append(f"{where_run}: no worker pool child reported in")
    elif not all(r["attached"] for r in children):
        run.problems.append(f"{where_run}: a worker pool child's app was not attached")


# --- report ------------------------------------------------------------------------------


def short(text: str, lines: int = 12, width: int = 160) -> str:
    """The end of a report, where pytest's short traceback says what failed."""
    body = [line if len(line) <= width else line[: width - 3] + "..." for line in text.strip().splitlines()]
    body = [line for line in body if line.strip()]
    if len(body) > lines:
        body = ["..."] + body[-(lines - 1) :]
    return "\n".join("        " + line for line in body)


def report(runs: list[Run], modules: list[str]) -> int:
    plain = runs[0]
    tests = sorted(set().union(*(r.outcomes for r in runs)))
    kinds = ("passed", "failed", "error", "skipped", "xfailed")
    print()
    say(f"{len(tests)} tests ({len(deselected(modules))} deselected, see ci/celery_suite.py)")
    print(f"  {'run':<10}" + "".join(f"{k:>9}" for k in kinds) + f"{'other':>7}{'wall s':>8}{'diffs':>7}")
    diffs: dict[str, list[str]] = {}
    for r in runs:
        count = Counter(r.outcomes.values())
        other = sum(n for k, n in count.items() if k not in kinds)
        diffs[r.name] = [t for t in tests if r is not plain and r.outcomes.get(t) != plain.outcomes.get(t)]
        shown = "-" if r is plain else str(len(diffs[r.name]))
        columns = "".join(f"{count[k]:>9}" for k in kinds)
        print(f"  {r.name:<10}{columns}{other:>7}{r.wall:>8.0f}{shown:>7}")
    for r in runs:
        for note in r.notes:
            say(f"{r.name}: {note}")
    bad_plain = [t for t in tests if plain.outcomes.get(t) not in ("passed", "skipped", "xfailed")]
    if bad_plain:
        print()
        say(f"{len(bad_plain)} test(s) do not pass on plain Celery either (compared all the same):")
        for t in bad_plain:
            print(f"    {plain.outcomes.get(t, 'absent'):<8} {t}")
            print(short(plain.details.get(t, ""), 5))
    status = 0
    for r in runs[1:]:
        if diffs[r.name]:
            status = 1
            print()
            say(f"{len(diffs[r.name])} test(s) whose outcome differs, {r.name} vs plain:")
            for t in diffs[r.name]:
                print(f"    {plain.outcomes.get(t, 'absent')} -> {r.outcomes.get(t, 'absent')}  {t}")
                if r.details.get(t) and r.outcomes.get(t) not in ("passed", NOT_RUN):
                    print(short(r.details[t]))
    for r in runs:
        for problem in r.problems:
            status = 1
            say(f"{r.name}: {problem}")
    print()
    runs_said = ", ".join(f"{r.name} {r.wall:.0f} s" for r in runs)
    if status == 0:
        say(f"the same outcome, test by test, in every run ({runs_said})")
    else:
        say(f"FAILED: the runs differ or did not complete, see above ({runs_said})")
    # The closing line, in the plain form CI reads, counts what this check is about: each
    # test of each attached run compared with the plain run (the table above has the tests).
    compared = sum(len(tests) for _ in runs[1:])
    # a test not run in the plain run has nothing to compare with: it counts as failed
    unrun = {t for t in tests if plain.outcomes.get(t) == NOT_RUN}
    differing = sum(len(set(diffs[r.name]) | unrun) for r in runs[1:])
    say(f"{compared} comparisons of a test's outcome, attached vs plain:")
    print(f"celery-suite: {compared - differing} passed, {differing} failed")
    return status


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description="Celery's own integration suite, plain and with jobwire attached.",
        epilog="Arguments after -- go to pytest, e.g. -- -k chord",
    )
    parser.add_argument("--runs", default=",".join(RUNS), help=f"comma-separated, from {RUNS}; plain first")
    parser.add_argument("--modules", default=",".join(MODULES), help="modules of Celery's t/integration")
    parser.add_argument(
        "--deadline", type=float, default=DEADLINE, help=f"seconds per run before tests go unrun ({DEADLINE})"
    )
    parser.add_argument("--shards", type=int, default=SHARDS, help=f"pytest processes per run ({SHARDS})")
    parser.add_argument("--keep", action="store_true", help="keep the work folder (logs, junit xml)")
    parser.add_argument("--work-dir", help="where the runs write, kept (default: a temporary folder)")
    parser.add_argument("pytest_args", nargs="*", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    names = [n.strip() for n in args.runs.split(",") if n.strip()]
    if not names or names[0] != "plain" or any(n not in RUNS for n in names) or len(set(names)) != len(names):
        parser.error(f"--runs: plain first, then any of {RUNS[1:]}")
    modules = [m.strip().removesuffix(".py") for m in args.modules.split(",") if m.strip()]

    version = importlib.metadata.version("celery")
    say(f"Celery {version}, jobwire {importlib.metadata.version('jobwire')}; {', '.join(modules)}")
    sdist = celery_sdist(version)
    work = Path(args.work_dir or tempfile.mkdtemp(prefix="celery-suite-")).resolve()
    work.mkdir(parents=True, exist_ok=True)
    try:
        scratch = work / "celery"
        shutil.rmtree(scratch, ignore_errors=True)
        scratch.mkdir()
        extract_suite(sdist, scratch)
        for m in modules:
            if not (scratch / "t" / "integration" / f"{m}.py").exists():
                parser.error(f"Celery {version}'s t/integration has no {m}.py")
        jobs = [
            Shard(name, work / name / f"shard{i}", group)
            for name in names
            for i, group in enumerate(shards(modules, args.shards))
        ]
        threads = [
            threading.Thread(target=run_shard, args=(job, scratch, args.pytest_args, args.deadline))
            for job in jobs
        ]
        for t in threads:
            t.start()
        try:
            for t in threads:
                t.join()
        except BaseException:  # Ctrl-C, or SIGTERM (below): the runs' processes go too
            for proc in list(_live):
                _kill_group(proc)
            for t in threads:
                t.join()  # each stops its redis-server
            raise
        runs = [collect(name, [j for j in jobs if j.run == name], args.deadline) for name in names]
        confirm(runs, work, scratch, args.pytest_args, args.deadline)
        status = report(runs, modules)
    finally:
        if args.keep or args.work_dir:
            say(f"logs, junit xml and Redis logs kept in {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)
    return status


if __name__ == "__main__":
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(128 + signal.SIGTERM))
    sys.exit(main())
