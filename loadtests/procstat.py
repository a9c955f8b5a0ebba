"""What the kernel counts for a process: CPU seconds and minor page faults from ``/proc``.

The benchmarks read these around a window of load, for the server's processes (a
multi-process server's front ends and engine process are the supervisor's descendants) and
for their own."""

from __future__ import annotations

import os
import resource
from pathlib import Path
from typing import NamedTuple

from service.os_names import ENGINE_PREFIX, task_names

CLOCK = os.sysconf("SC_CLK_TCK")


class Usage(NamedTuple):
    cpu_s: float  # utime + stime
    minor_faults: int


def usage(entry: Path) -> Usage:
    """A ``/proc`` process or task entry's usage so far; zero once it has exited."""
    try:
        fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return Usage(0.0, 0)
    return Usage((int(fields[11]) + int(fields[12])) / CLOCK, int(fields[7]))


def process_usage(pid: int) -> Usage:
    """``pid`` alone, all its threads (not its children)."""
    return usage(Path(f"/proc/{pid}"))


def tree(pid: int) -> list[int]:
    """``pid`` and every live descendant."""
    out, todo = [], [pid]
    while todo:
        current = todo.pop()
        out.append(current)
        try:
            tasks = Path(f"/proc/{current}/task").iterdir()
            todo += [int(c) for t in tasks for c in (t / "children").read_text().split()]
        except OSError:
            continue
    return out


def cpu_s(pid: int) -> float:
    """CPU seconds of ``pid`` and every live descendant."""
    return sum(usage(Path(f"/proc/{proc}")).cpu_s for proc in tree(pid))


def threads_cpu_s(pid: int) -> dict[str, float]:
    """CPU seconds of the live threads of ``pid`` and its descendants, in three groups:
    ``engine`` (named ``engine-*``: the batchers' engine threads and the engines' own pools),
    ``loop`` (each process's main thread: its event loop) and ``pool`` (the rest: the decode
    threads, mostly)."""
    groups = {"engine": 0.0, "loop": 0.0, "pool": 0.0}
    for proc in tree(pid):
        for tid, name in task_names(proc).items():
            group = "engine" if name.startswith(ENGINE_PREFIX) else "loop" if tid == proc else "pool"
            groups[group] += usage(Path(f"/proc/{proc}/task/{tid}")).cpu_s
    return groups


def own_cpu_s() -> float:
    """This process's CPU seconds (``getrusage``)."""
    u = resource.getrusage(resource.RUSAGE_SELF)
    return u.ru_utime + u.ru_stime


def _role(pid: int) -> str:
    name = task_names(pid).get(pid, "")
    return "front ends" if name.startswith("msflow-api-") else "engine process" if name == "msflow-engine" else "server"


def processes_switches(pid: int) -> dict[str, tuple[int, int]]:
    """Context switches of ``pid`` and its live descendants so far, every thread, by role (as
    :func:`processes_cpu_s`): (voluntary: the thread waited, so a wake-up came after;
    involuntary: it was preempted)."""
    roles: dict[str, tuple[int, int]] = {}
    for proc in tree(pid):
        voluntary = involuntary = 0
        for tid in task_names(proc):
            try:
                status = Path(f"/proc/{proc}/task/{tid}/status").read_text()
            except OSError:
                continue
            for line in status.splitlines():
                if line.startswith("voluntary_ctxt_switches:"):
                    voluntary += int(line.split()[1])
                elif line.startswith("nonvoluntary_ctxt_switches:"):
                    involuntary += int(line.split()[1])
        role = _role(proc)
        v0, i0 = roles.get(role, (0, 0))
        roles[role] = (v0 + voluntary, i0 + involuntary)
    return roles


def processes_cpu_s(pid: int) -> dict[str, float]:
    """CPU seconds of ``pid`` and its live descendants by role, from each process's name
    (service/supervisor.py names them): ``front ends`` (``msflow-api-*``), ``engine process``
    (``msflow-engine``) and ``server`` (the rest: a single-process server, or the supervisor)."""
    roles = {"front ends": 0.0, "engine process": 0.0, "server": 0.0}
    for proc in tree(pid):
        roles[_role(proc)] += usage(Path(f"/proc/{proc}")).cpu_s
    return roles
