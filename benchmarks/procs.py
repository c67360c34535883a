"""What every benchmark reads of the processes it runs: CPU time, RSS, readiness.

A server may be several processes (`jobwire serve --workers N`, uvicorn `--workers N`): a
supervisor and its workers. The `tree_*` readings sum a process and its descendants, so
the same figure means "what this server cost" whatever its shape. RSS summed over
processes counts shared pages once per process: an upper bound, said where reported.
"""

from __future__ import annotations

import os
import resource
import time
import urllib.error
import urllib.request

CLK_TCK = os.sysconf("SC_CLK_TCK")


def _stat(pid: int) -> list[str]:
    # after the command name in parentheses, which may itself hold spaces or ')'
    return open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process, from /proc (survives a noisy machine)."""
    fields = _stat(pid)
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


def system_seconds(pid: int) -> float:
    """The kernel's share of `cpu_seconds`: syscalls, wakeups, loopback TCP."""
    return int(_stat(pid)[12]) / CLK_TCK


def rss_kib(pid: int) -> int:
    for line in open(f"/proc/{pid}/status"):
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise RuntimeError("no VmRSS")


def tree(pid: int) -> list[int]:
    """`pid` and every live descendant (a supervisor's workers, their children)."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            ppid = int(_stat(int(entry))[1])
        except (OSError, IndexError, ValueError):  # gone meanwhile
            continue
        children.setdefault(ppid, []).append(int(entry))
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        todo += children.get(p, [])
    return out


def _sum(read: object, pids: list[int]) -> float:
    total = 0.0
    for p in pids:
        try:
            total += read(p)  # type: ignore[operator]
        except (OSError, RuntimeError):  # a worker that exited between listing and reading
            pass
    return total


def tree_cpu_seconds(pids: list[int]) -> float:
    return _sum(cpu_seconds, pids)


def tree_system_seconds(pids: list[int]) -> float:
    return _sum(system_seconds, pids)


def tree_rss_kib(pids: list[int]) -> int:
    return int(_sum(rss_kib, pids))


def raise_fd_limit() -> int:
    """Lift this process's open-file limit to the hard limit (10,000 sockets need more than
    the usual 1,024); children inherit it. Returns the limit now in force."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = hard if hard != resource.RLIM_INFINITY else 1 << 20
    if soft < want:
        resource.setrlimit(resource.RLIMIT_NOFILE, (want, hard))
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]


def wait_ready(url: str, timeout: float = 30.0) -> None:
    """Until `url` answers over HTTP (any status: a 404 answers too)."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            urllib.request.urlopen(url, timeout=1)
            return
        except urllib.error.HTTPError:
            return
        except OSError:
            if time.monotonic() > deadline:
                raise RuntimeError(f"{url} never answered") from None
            time.sleep(0.1)
