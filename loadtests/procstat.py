"""What the kernel counts for a process: CPU seconds and minor page faults from ``/proc``.

The benchmarks read these around a window of load, for the server's processes (a
multi-process server's front ends and engine process are the supervisor's descendants) and
for their own."""

from __future__ import annotations

import os
import resource
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple

from service.os_names import ENGINE_PREFIX, task_names

CLOCK = os.sysconf("SC_CLK_TCK")


class Usage(NamedTuple):
    cpu_s: float  # utime + stime
    minor_faults: int
    kernel_s: float = 0.0  # stime: system calls, page faults, the kernel's share of wake-ups


def usage(entry: Path) -> Usage:
    """A ``/proc`` process or task entry's usage so far; zero once it has exited."""
    try:
        fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return Usage(0.0, 0)
    return Usage((int(fields[11]) + int(fields[12])) / CLOCK, int(fields[7]), int(fields[12]) / CLOCK)


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


THREAD_GROUPS = ("engine", "loop", "pool")
ROLES = ("front ends", "engine process", "server")


@dataclass(frozen=True)
class TreeUsage:
    """What the kernel counted for a process tree so far, read in one pass over ``/proc``.

    * ``cpu_s``: every process (utime + stime, its exited threads included);
    * ``threads``: CPU seconds of the live threads in three groups: ``engine`` (named
      ``engine-*``: the batchers' engine threads and the engines' own pools), ``loop`` (each
      process's main thread: its event loop) and ``pool`` (the rest: the decode threads, mostly);
    * ``roles``: CPU seconds by role, from each process's name (service/supervisor/supervisor.py names
      them): ``front ends`` (``msflow-api-*``), ``engine process`` (``msflow-engine``) and
      ``server`` (the rest: a single-process server, or the supervisor);
    * ``switches``: context switches of the live threads by role, (voluntary: the thread
      waited, so a wake-up came after; involuntary: it was preempted);
    * ``kernel_s`` and ``faults``: by role, the CPU seconds spent in the kernel (part of
      ``roles``) and the minor page faults (a fresh page each: what an allocator that
      gives memory back to the kernel between requests costs; service/allocator.py).

    Two readings subtract (``after - before``) and add (several trees)."""

    cpu_s: float = 0.0
    threads: dict[str, float] = field(default_factory=lambda: dict.fromkeys(THREAD_GROUPS, 0.0))
    roles: dict[str, float] = field(default_factory=lambda: dict.fromkeys(ROLES, 0.0))
    switches: dict[str, tuple[int, int]] = field(default_factory=dict)
    kernel_s: dict[str, float] = field(default_factory=lambda: dict.fromkeys(ROLES, 0.0))
    faults: dict[str, float] = field(default_factory=lambda: dict.fromkeys(ROLES, 0.0))

    def __add__(self, other: TreeUsage) -> TreeUsage:
        return self._combine(other, 1)

    def __sub__(self, other: TreeUsage) -> TreeUsage:
        return self._combine(other, -1)

    def _combine(self, other: TreeUsage, sign: int) -> TreeUsage:
        def numbers(a: dict[str, float], b: dict[str, float]) -> dict[str, float]:
            return {k: a.get(k, 0.0) + sign * b.get(k, 0.0) for k in a.keys() | b.keys()}

        return TreeUsage(self.cpu_s + sign * other.cpu_s, numbers(self.threads, other.threads),
                         numbers(self.roles, other.roles),
                         {k: (self.switches.get(k, (0, 0))[0] + sign * other.switches.get(k, (0, 0))[0],
                              self.switches.get(k, (0, 0))[1] + sign * other.switches.get(k, (0, 0))[1])
                          for k in self.switches.keys() | other.switches.keys()},
                         numbers(self.kernel_s, other.kernel_s), numbers(self.faults, other.faults))


def tree_usage(pid: int) -> TreeUsage:
    """``pid`` and its live descendants, each process's stat and each thread's stat and
    status read once."""
    total, threads, roles = 0.0, dict.fromkeys(THREAD_GROUPS, 0.0), dict.fromkeys(ROLES, 0.0)
    switches: dict[str, tuple[int, int]] = {}
    kernel, faults = dict.fromkeys(ROLES, 0.0), dict.fromkeys(ROLES, 0.0)
    for proc in tree(pid):
        names = task_names(proc)
        role = role_of(names.get(proc, ""))
        spent = usage(Path(f"/proc/{proc}"))
        total += spent.cpu_s
        roles[role] += spent.cpu_s
        kernel[role] += spent.kernel_s
        faults[role] += spent.minor_faults
        voluntary, involuntary = switches.get(role, (0, 0))
        for tid, name in names.items():
            task = Path(f"/proc/{proc}/task/{tid}")
            group = "engine" if name.startswith(ENGINE_PREFIX) else "loop" if tid == proc else "pool"
            threads[group] += usage(task).cpu_s
            v, i = _switches(task)
            voluntary, involuntary = voluntary + v, involuntary + i
        switches[role] = (voluntary, involuntary)
    return TreeUsage(total, threads, roles, switches, kernel, faults)


def trees_usage(pids: Iterable[int]) -> TreeUsage:
    """:func:`tree_usage` added up over several trees (several servers)."""
    return sum((tree_usage(pid) for pid in pids), TreeUsage())


def _switches(task: Path) -> tuple[int, int]:
    try:
        status = (task / "status").read_text()
    except OSError:
        return 0, 0
    voluntary = involuntary = 0
    for line in status.splitlines():
        if line.startswith("voluntary_ctxt_switches:"):
            voluntary = int(line.split()[1])
        elif line.startswith("nonvoluntary_ctxt_switches:"):
            involuntary = int(line.split()[1])
    return voluntary, involuntary


def role_of(name: str) -> str:
    """A server process's role from its name (service/supervisor/supervisor.py names them)."""
    return "front ends" if name.startswith("msflow-api-") else "engine process" if name == "msflow-engine" else "server"


def cpu_s(pid: int) -> float:
    """CPU seconds of ``pid`` and every live descendant."""
    return sum(usage(Path(f"/proc/{proc}")).cpu_s for proc in tree(pid))


def own_cpu_s() -> float:
    """This process's CPU seconds (``getrusage``)."""
    return own_usage().cpu_s


def own_usage() -> Usage:
    """This process's usage from ``getrusage``: to the microsecond, where ``/proc``'s counts
    clock ticks (10 ms), and a short window of a mostly waiting process read 0."""
    u = resource.getrusage(resource.RUSAGE_SELF)
    return Usage(u.ru_utime + u.ru_stime, u.ru_minflt, u.ru_stime)
