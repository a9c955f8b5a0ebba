"""The supervisor of a multi-process server (MSFLOW_API_PROCESSES > 1), under faults of its
own: a moment it cannot start a process, a front end that stops running. Real processes
(``msflow serve``)."""

from __future__ import annotations

import os
import resource
import signal
from pathlib import Path

import httpx
from PIL import Image

from harness import children, fake_version, png_of, start, wait_until


def open_fds(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def test_a_restart_that_cannot_start_a_process_is_tried_again_not_fatal(tmp_path: Path) -> None:
    """A front end dies while the supervisor is out of descriptors (EMFILE on the restart):
    the supervisor and the healthy processes stay up, and the restart succeeds later."""
    store = tmp_path / "store"
    fake_version(store, "aaa")
    server = start(store, tmp_path / "server.log", api_processes=2, engine="null", store_poll_s=0)
    try:
        supervisor = server.proc.pid

        def running() -> list[str]:
            return sorted(name for name in children(supervisor).values() if name.startswith("msflow"))
        # Ready once one front end serves; the other may not have named itself yet.
        wait_until(lambda: running() == ["msflow-api-0", "msflow-api-1", "msflow-engine"], 30, "every child")
        (victim,) = [pid for pid, name in children(supervisor).items() if name == "msflow-api-1"]
        limits = resource.prlimit(supervisor, resource.RLIMIT_NOFILE)
        resource.prlimit(supervisor, resource.RLIMIT_NOFILE, (open_fds(supervisor), limits[1]))
        try:
            os.kill(victim, signal.SIGKILL)
            wait_until(lambda: "cannot start a new one" in server.log() or server.proc.poll() is not None, 20,
                       "a failed restart")
            assert server.proc.poll() is None, server.log()
            assert httpx.get(f"{server.url}/readyz", timeout=5).status_code == 200  # the other front end serves
        finally:
            if server.proc.poll() is None:
                resource.prlimit(supervisor, resource.RLIMIT_NOFILE, limits)

        wait_until(lambda: victim not in children(supervisor)
                   and running() == ["msflow-api-0", "msflow-api-1", "msflow-engine"], 30,
                   "the front end restarted once descriptors are free")
        wait_until(lambda: httpx.get(f"{server.url}/readyz", timeout=5).status_code == 200, 30, "ready")
    finally:
        server.stop()


def test_a_front_end_that_stops_running_is_replaced(tmp_path: Path) -> None:
    """A front end whose event loop stops (SIGSTOP here; a call that never returns alike) still
    has its socket on the port: the kernel goes on handing it new connections, which waited
    for as long as it stayed stopped, and nothing replaced it. Past MSFLOW_FRONTEND_STALL_S
    the supervisor kills it and starts another, and every new connection is answered again."""
    store = tmp_path / "store"
    fake_version(store, "aaa")
    server = start(store, tmp_path / "server.log", api_processes=2, engine="null", store_poll_s=0,
                   frontend_stall_s=2)
    supervisor = server.proc.pid
    frontends = sorted(pid for pid, name in children(supervisor).items() if name.startswith("msflow-api-"))
    victim = frontends[1]
    os.kill(victim, signal.SIGSTOP)
    try:
        wait_until(lambda: victim not in children(supervisor) and len(server.front_ends_listening()) == 2, 20,
                   "the stopped front end replaced")
        assert "has not run its event loop" in server.log(), server.log()
        for _ in range(8):  # new connections, spread over both front ends by the kernel
            assert httpx.get(f"{server.url}/readyz", timeout=5).status_code == 200
    finally:
        if victim in children(supervisor):
            os.kill(victim, signal.SIGCONT)
        server.stop()


def test_an_engine_process_that_stops_running_is_replaced(tmp_path: Path) -> None:
    """A stopped engine process answers no front end (every request 504, readiness
    engine_stalled) and its own stall watch, a thread of it, is stopped with it: nothing
    restarted it until it ran again. Past MSFLOW_ENGINE_STALL_S the supervisor kills it and
    starts another, and the front ends serve again."""
    store = tmp_path / "store"
    fake_version(store, "aaa")
    server = start(store, tmp_path / "server.log", api_processes=2, engine="null", store_poll_s=0,
                   request_deadline_ms=1000, engine_stall_s=2)
    supervisor = server.proc.pid
    (victim,) = [pid for pid, name in children(supervisor).items() if name == "msflow-engine"]
    os.kill(victim, signal.SIGSTOP)
    try:
        wait_until(lambda: victim not in children(supervisor) and "msflow-engine" in children(supervisor).values(),
                   20, "the stopped engine process replaced")
        assert "engine process (pid" in server.log() and "has not run its event loop" in server.log(), server.log()
        png = png_of(Image.new("RGB", (32, 32), (90, 90, 90)))

        def answered() -> bool:  # each front end reconnects on its own back-off: a 503 says retry
            return httpx.post(f"{server.url}/v1/inspect/aaa", files=[("file", ("x.png", png, "image/png"))],
                              timeout=10).status_code == 200
        wait_until(lambda: all(answered() for _ in range(6)), 30, "both front ends served by the new engine process")
    finally:
        if victim in children(supervisor):
            os.kill(victim, signal.SIGCONT)
        server.stop()
