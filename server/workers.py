"""Serving one port from several processes: `jobwire serve --workers N`.

One process runs one event loop, on one core. Here a supervisor (the process `jobwire
serve` started) binds the port once and hands the listening socket to N worker
processes, each a whole jobwire server: its own uvicorn, hub, Redis connections, limits
and metrics. The kernel gives each new connection to whichever worker accepts it first,
so a busy worker takes fewer.

One socket bound by the supervisor, not SO_REUSEPORT in each worker: the port is taken,
or refused with one line, once, before any worker starts; it stays open while a worker is
replaced (with SO_REUSEPORT, the connections queued on a dying worker's own socket are
reset); and no other process can quietly join the port (a second `jobwire serve` on it
fails, as it does with one worker).

Not uvicorn's supervisor (`uvicorn.supervisors.Multiprocess`): its workers run
`uvicorn.Server`, which it names itself, and jobwire's must run `serving.Server` (the 1001
goodbye); changing that means overriding its private parts (`Process.server`, and each
place that builds a `Process`). And its workers outlive a supervisor that is SIGKILLed,
serving on with no one left to stop them. Here each worker holds a pipe to the
supervisor: its first message says the worker serves, and its end tells the worker to
leave (with the goodbye).

Workers start with the spawn method, a fresh interpreter each, as uvicorn's do: a fork of
the supervisor would carry into every worker whatever importing the Celery app and
building the app left behind (threads, locks held by them, connection pools).

- **Start**: N workers; once each serves, one line names them and their pids. A worker
  that exits before it serves stops the command (exit 3, uvicorn's startup failure): the
  same cause would stop every restart.
- **A worker dies** while serving: another takes its place at once. One that dies again
  before it has served `STEADY` seconds is replaced after a growing delay (0.5 s, doubling,
  up to 30 s), so a worker that crashes at start does not spin.
- **SIGTERM or SIGINT**: every worker gets SIGTERM (jobwire's goodbye, then uvicorn's
  graceful shutdown); a second signal forces them (SIGINT: uvicorn's "force quit"); past
  `STOP_TIMEOUT` they are killed. The command exits 0 when every worker left by itself.
"""

from __future__ import annotations

import logging
import math
import multiprocessing
import os
import signal
import socket
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from multiprocessing.connection import Connection, wait
from multiprocessing.process import BaseProcess
from pathlib import Path
from types import FrameType

from jobwire.backoff import backoff
from jobwire.settings import SettingsError

log = logging.getLogger(__name__)

AUTO = "auto"
STARTUP_FAILURE = 3  # uvicorn's exit code for a server that could not start
SERVING = b"serving"

# Timeouts
STOP_TIMEOUT = 30.0  # seconds the workers have to leave after SIGTERM before they are killed
STEADY = 10.0  # seconds a worker serves before its death no longer counts as a crash loop
RESTART_DELAYS = (0.5, 30.0)  # the first and the longest delay before replacing a crash loop

_spawn = multiprocessing.get_context("spawn")


# -- how many ----------------------------------------------------------------------------


def worker_count(value: str, name: str) -> int:
    """`value` as a number of worker processes: a whole number >= 1, or `auto` (one per
    usable core). `name` (`--workers`, `JOBWIRE_WORKERS`) is what the error names."""
    text = value.strip().lower()
    if text == AUTO:
        return usable_cores()
    if text.isascii() and text.isdigit() and int(text) >= 1:
        return int(text)
    raise SettingsError(f"{name} must be a whole number >= 1 or {AUTO}, got {value!r}")


def usable_cores() -> int:
    """The cores this process may use: those it may run on (its CPU affinity: taskset,
    cpusets, Kubernetes' static CPU manager), or fewer where a cgroup's CPU quota allows
    less (`docker --cpus`, a Kubernetes CPU limit): a worker per core of a 64-core node
    would each be throttled in a pod limited to 2."""
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # no affinity on macOS and Windows
        cores = os.cpu_count() or 1
    quota = cgroup_cpu_quota()
    return max(1, min(cores, quota) if quota is not None else cores)


def cgroup_cpu_quota(
    root: Path = Path("/sys/fs/cgroup"), own: Path = Path("/proc/self/cgroup")
) -> int | None:
    """The whole cores (rounded up) that this process's cgroup CPU quota allows, the
    tightest of its cgroup and their parents, cgroup v2 or v1; None where none is set."""
    try:
        lines = own.read_text().splitlines()
    except OSError:
        return None
    quotas: list[int] = []
    for line in lines:
        _, controllers, path = line.split(":", 2)
        if controllers == "":  # v2: one hierarchy, `cpu.max` holds "<quota> <period>" or "max …"
            files = [(d / "cpu.max",) for d in _up_from(root, path)]
        elif "cpu" in controllers.split(","):  # v1: the cpu controller's own hierarchy
            mount = root / controllers
            files = [(d / "cpu.cfs_quota_us", d / "cpu.cfs_period_us") for d in _up_from(mount, path)]
        else:
            continue
        for names in files:
            try:
                text = " ".join(name.read_text().strip() for name in names)
            except OSError:
                continue
            cores = cores_in_quota(text)
            if cores is not None:
                quotas.append(cores)
    return min(quotas, default=None)


def _up_from(root: Path, path: str) -> list[Path]:
    """`root/path` and each directory above it, up to `root` (inside a container, whose
    cgroup namespace shows its own cgroup as "/", that is `root` alone)."""
    here = root / path.strip("/")
    return [here, *(p for p in here.parents if p.is_relative_to(root))]


def cores_in_quota(text: str) -> int | None:
    """`"<quota> <period>"` (microseconds per period; cgroup v2's `cpu.max`, or v1's two
    files) as whole cores, rounded up; None for no quota (`max`, or v1's `-1`)."""
    parts = text.split()
    if len(parts) != 2 or not all(p.isdigit() for p in parts) or int(parts[1]) == 0:
        return None
    return max(1, math.ceil(int(parts[0]) / int(parts[1])))


# -- a worker's side -----------------------------------------------------------------------


class Link:
    """A worker's end of its pipe to the supervisor."""

    def __init__(self, conn: Connection) -> None:
        self._conn = conn

    def serving(self) -> None:
        """Tell the supervisor that this worker serves."""
        try:
            self._conn.send_bytes(SERVING)
        except OSError:  # the supervisor is gone: `when_gone` has said so
            pass

    def when_gone(self, leave: Callable[[], None]) -> None:
        """Call `leave` (from a thread of its own) once the supervisor is gone: a worker
        must not serve on, unsupervised, after the command was SIGKILLed."""

        def follow() -> None:
            try:
                while True:
                    self._conn.recv_bytes()
            except (EOFError, OSError):
                leave()

        threading.Thread(target=follow, name="jobwire-supervisor", daemon=True).start()


#: A worker's body, run in a process of its own: (index, the shared socket, its link).
#: It must be picklable (a module-level function, or a `functools.partial` of one).
Target = Callable[[int, socket.socket, Link], None]


def _worker(target: Target, index: int, sock: socket.socket, conn: Connection) -> None:
    # Until uvicorn takes the signals over, SIGTERM and SIGINT end a worker quietly. When
    # uvicorn has stopped on one, it raises it again: this handler then makes the exit a
    # plain 0 (the supervisor asked for it), not "killed by SIGTERM".
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, _leave)
    target(index, sock, Link(conn))


def _leave(signum: int, frame: FrameType | None) -> None:
    raise SystemExit(0)


# -- the supervisor ------------------------------------------------------------------------


@dataclass
class _Worker:
    index: int
    process: BaseProcess
    link: Connection  # the supervisor's end
    since: float = field(default_factory=time.monotonic)
    serving: bool = False

    @property
    def pid(self) -> int:
        assert self.process.pid is not None
        return self.process.pid


class Supervisor:
    """Runs `count` workers on `sock` until SIGTERM or SIGINT (see the module docstring).
    `where` names the port in its lines (`http://0.0.0.0:8000`)."""

    def __init__(self, target: Target, count: int, sock: socket.socket, *, where: str) -> None:
        self.target, self.count, self.sock, self.where = target, count, sock, where
        self.workers: dict[int, _Worker] = {}  # by index
        self._delays: dict[int, Iterator[float]] = {}  # by index: a crash loop's next delays
        self._due: dict[int, float] = {}  # by index: when a worker is to be replaced
        self._all_served = False

    def run(self) -> int:
        """Supervise until told to stop; the command's exit code."""
        wake_r, wake_w = os.pipe()
        os.set_blocking(wake_w, False)
        os.set_blocking(wake_r, False)
        # A Python handler, so that each signal's number is written to the wakeup pipe,
        # which the loop below waits on with the workers.
        previous = {sig: signal.signal(sig, _noted) for sig in (signal.SIGTERM, signal.SIGINT)}
        previous_fd = signal.set_wakeup_fd(wake_w, warn_on_full_buffer=False)
        try:
            return self._supervise(wake_r)
        finally:
            signal.set_wakeup_fd(previous_fd)
            for sig, handler in previous.items():
                signal.signal(sig, handler)
            os.close(wake_r)
            os.close(wake_w)

    def _supervise(self, wake: int) -> int:
        for index in range(self.count):
            self._start(index)
        while True:
            by_sentinel = {w.process.sentinel: w for w in self.workers.values()}
            by_link = {w.link: w for w in self.workers.values()}
            now = time.monotonic()
            timeout = max(0.0, min(self._due.values()) - now) if self._due else None
            ready = wait([wake, *by_sentinel, *by_link], timeout)
            if wake in ready and _signals(wake):
                return self._stop(wake)
            for link in by_link:  # before the exits: a worker may have served, then died
                if link in ready:
                    self._heard(by_link[link])
            for sentinel, worker in by_sentinel.items():
                if sentinel in ready and not self._ended(worker):
                    self._stop(wake)
                    return STARTUP_FAILURE
            for index, due in list(self._due.items()):
                if due <= time.monotonic():
                    del self._due[index]
                    self._start(index)

    def _start(self, index: int) -> None:
        ours, theirs = _spawn.Pipe()
        process = _spawn.Process(
            target=_worker, args=(self.target, index, self.sock, theirs), name=f"jobwire-worker-{index}"
        )
        process.start()
        theirs.close()  # the worker's end is the worker's: it sees EOF when ours closes
        self.workers[index] = _Worker(index, process, ours)

    def _heard(self, worker: _Worker) -> None:
        try:
            said = worker.link.recv_bytes()
        except (EOFError, OSError):
            return  # it exited: its sentinel says so
        if said != SERVING or worker.serving:
            return
        worker.serving, worker.since = True, time.monotonic()
        if self._all_served:
            log.info("jobwire: worker %d serves again (pid %d)", worker.index, worker.pid)
        elif all(w.serving for w in self.workers.values()):
            self._all_served = True
            pids = ", ".join(str(w.pid) for w in self.workers.values())
            log.info(
                "jobwire: serving %s from %d worker processes (pids %s; supervisor %d)",
                self.where,
                self.count,
                pids,
                os.getpid(),
            )

    def _ended(self, worker: _Worker) -> bool:
        """A worker exited by itself: replace it (soon, or later in a crash loop). False
        when the command cannot start: it exited before it ever served, at start."""
        worker.process.join()
        worker.link.close()
        del self.workers[worker.index]
        how = _exit(worker.process.exitcode)
        if not self._all_served and not worker.serving:
            log.error(
                "jobwire: worker %d (pid %d) %s before it served: stopping", worker.index, worker.pid, how
            )
            return False
        steady = worker.serving and time.monotonic() - worker.since >= STEADY
        if steady or worker.index not in self._delays:
            self._delays[worker.index] = backoff(*RESTART_DELAYS)
            delay = 0.0
        else:
            delay = next(self._delays[worker.index])
        log.warning(
            "jobwire: worker %d (pid %d) %s; starting another%s",
            worker.index,
            worker.pid,
            how,
            f" in {delay:.1f} s" if delay else "",
        )
        self._due[worker.index] = time.monotonic() + delay
        return True

    def _stop(self, wake: int) -> int:
        """SIGTERM to every worker, SIGINT at a second signal, SIGKILL past the timeout."""
        self._due.clear()
        left = dict(self.workers)
        if left:
            log.info("jobwire: stopping %d worker processes", len(left))
        for w in left.values():
            _send(w, signal.SIGTERM)
        deadline, forced = time.monotonic() + STOP_TIMEOUT, False
        while left and (remaining := deadline - time.monotonic()) > 0:
            ready = wait([wake, *(w.process.sentinel for w in left.values())], remaining)
            if wake in ready and _signals(wake) and not forced:
                forced = True
                log.info("jobwire: forcing %d worker processes to stop", len(left))
                for w in left.values():
                    _send(w, signal.SIGINT)
            for index, w in list(left.items()):
                if w.process.exitcode is not None:
                    del left[index]
        for w in left.values():
            log.error(
                "jobwire: worker %d (pid %d) did not stop in %.0f s: killed", w.index, w.pid, STOP_TIMEOUT
            )
            w.process.kill()
        for w in self.workers.values():
            w.process.join()
            w.link.close()
        self.workers.clear()
        return 1 if left else 0


def _noted(signum: int, frame: FrameType | None) -> None:
    """Nothing: the signal's number reaches the supervisor's loop through the wakeup pipe."""


def _signals(fd: int) -> bytes:
    """The signal numbers written to the wakeup pipe since it was last read."""
    try:
        return os.read(fd, 512)
    except BlockingIOError:
        return b""


def _send(worker: _Worker, sig: int) -> None:
    try:
        os.kill(worker.pid, sig)
    except ProcessLookupError:  # it has just exited
        pass


def _exit(code: int | None) -> str:
    if code is not None and code < 0:
        return f"was killed by {signal.Signals(-code).name}"
    return f"exited with code {code}"
