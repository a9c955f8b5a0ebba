"""loadtests/procstat.py: the benchmarks' reading of /proc, against real processes."""

from __future__ import annotations

import os
import subprocess
import sys
import time

from loadtests.procstat import TreeUsage, cpu_s, process_usage, tree, tree_usage, trees_usage

_BUSY_CHILD = """
import os, sys, time
from service.os_names import set_thread_name
set_thread_name(sys.argv[1])
end = time.process_time() + 0.3
if sys.argv[1] == "msflow-engine":  # in the kernel: system calls, and 8 MB of fresh pages
    pages = b"x" * (8 << 20)
    while time.process_time() < end:
        os.stat("/")
else:  # in Python: the clock read (a system call) once per 100,000 turns
    while time.process_time() < end:
        for _ in range(100_000):
            pass
print("spent", flush=True)
time.sleep(30)
"""


def test_cpu_is_split_by_the_role_the_process_names() -> None:
    before = tree_usage(os.getpid())
    children = [subprocess.Popen([sys.executable, "-c", _BUSY_CHILD, name], stdout=subprocess.PIPE, text=True,
                                 cwd=os.path.dirname(os.path.dirname(os.path.dirname(__file__))))
                for name in ("msflow-api-1", "msflow-engine")]
    try:
        for child in children:
            assert child.stdout is not None and child.stdout.readline().strip() == "spent"
        assert {child.pid for child in children} <= set(tree(os.getpid()))
        after = tree_usage(os.getpid())
        spent = after - before
        for role in ("front ends", "engine process"):
            assert spent.roles[role] >= 0.25, (role, before, after)
        assert cpu_s(os.getpid()) >= sum(after.roles.values()) - 0.05
        assert abs(after.cpu_s - sum(after.roles.values())) < 1e-9  # every process has one role
        assert spent.threads["loop"] >= 0.5  # the children's main threads did the spinning
        # Both children started inside the window, so each counts its interpreter's start too.
        # (0.12-0.16 s against 0.00-0.01 on an idle box; 0.09 once with a second test run beside it)
        assert spent.kernel_s["engine process"] >= spent.kernel_s["front ends"] + 0.05
        assert spent.faults["engine process"] >= spent.faults["front ends"] + 2000  # 8 MB: 2,048 pages
        twice = trees_usage([os.getpid(), os.getpid()])
        assert abs(twice.cpu_s - 2 * after.cpu_s) < 0.1 and (twice - twice) == TreeUsage(
            0.0, dict.fromkeys(twice.threads, 0.0), dict.fromkeys(twice.roles, 0.0),
            dict.fromkeys(twice.switches, (0, 0)), dict.fromkeys(twice.kernel_s, 0.0),
            dict.fromkeys(twice.faults, 0.0))
        for child in children:
            assert process_usage(child.pid).cpu_s >= 0.25
    finally:
        for child in children:
            child.kill()
            child.wait()
    time.sleep(0.05)
    assert process_usage(children[0].pid).cpu_s == 0.0  # gone: counted as nothing, no error


def test_context_switches_are_counted_by_role() -> None:
    child = subprocess.Popen([sys.executable, "-c", _SLEEPY_CHILD, "msflow-engine"], stdout=subprocess.PIPE, text=True,
                             cwd=os.path.dirname(os.path.dirname(os.path.dirname(__file__))))
    try:
        assert child.stdout is not None and child.stdout.readline().strip() == "slept"
        voluntary, _ = tree_usage(os.getpid()).switches["engine process"]
        assert voluntary >= 50  # each of its 50 sleeps gave the processor up
    finally:
        child.kill()
        child.wait()


_SLEEPY_CHILD = """
import sys, time
from service.os_names import set_thread_name
set_thread_name(sys.argv[1])
for _ in range(50):
    time.sleep(0.001)
print("slept", flush=True)
time.sleep(30)
"""
