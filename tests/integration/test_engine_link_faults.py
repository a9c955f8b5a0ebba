"""Faults on the engine link of a multi-process server (MSFLOW_API_PROCESSES > 1), with real
processes, sockets and memfds: an engine process that cannot load a version again, drops
every connection, comes up late, runs out of descriptors, or gets a front end's bad
descriptors and slabs (the supervisor's faults: test_supervisor.py).

The engine core runs in this process where that is safe, and in a process of its own where
the fault could kill it (SIGBUS) or needs its own limits (RLIMIT_NOFILE).
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import json
import os
import resource
import socket
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from harness import fake_version, until, wait_until
from service.config import Settings
from service.engine_core import EngineCore
from service.engines.factory import load_engine
from service.ipc import frames
from service.ipc.slab import Slab, SlabLayout
from service.pipeline import engine_client
from service.pipeline.engine_client import EngineClient
from service.pipeline.registry_errors import ModelNotLoaded
from service.pipeline.runtime import PipelineRuntime

SIZE = 32  # fake_version's input size
PAGE_SIZE = os.sysconf("SC_PAGE_SIZE")


def link_settings(store: Path, sock: Path) -> Settings:
    return Settings(model_store=store, engine="null", device="cpu", max_batch_size=4, max_queue_delay_ms=1,
                    max_queue_size=4, store_poll_s=0, engine_socket=sock)


@contextlib.asynccontextmanager
async def engine_core(settings: Settings, factory: Any = load_engine) -> AsyncIterator[EngineCore]:
    """An engine core serving on ``settings.engine_socket``, on this loop; stopped after."""
    core = EngineCore(settings, engine_factory=factory)
    settings.engine_socket.unlink(missing_ok=True)
    serving = asyncio.create_task(core.serve(settings.engine_socket))
    try:
        await until(settings.engine_socket.exists, "the engine process to listen")  # before a front end connects
        yield core
    finally:
        core.stop()
        await serving


async def one_image(rt: PipelineRuntime, category: str) -> bool:
    """Whether an image of ``category`` goes through the engine process (raises if not)."""
    with rt.pin(category) as lane:
        (future,) = lane.batcher.submit_many([np.zeros((SIZE, SIZE, 3), np.uint8)], time.monotonic() + 10)
        return (await asyncio.wait_for(future, 10)).batch_size == 1


def open_fds(pid: int | str = "self") -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


# ---------------------------------------------------------------------- a front end's client
def test_a_version_the_new_engine_process_cannot_load_fails_alone(tmp_path: Path) -> None:
    """The engine process is replaced, and the new one cannot load one served version: that
    category fails as a failed load does (and loads again once it can: the next engine
    process), the others serve, the front end is connected and ready, and the folder is
    asked for once per connection, not in a tight loop of reconnects."""
    store = tmp_path / "store"
    for category in ("aaa", "bbb"):
        fake_version(store, category)
    loads: collections.Counter[str] = collections.Counter()
    broken: set[str] = set()

    def factory(version_dir: Path, **options: Any) -> Any:
        category = version_dir.parent.name
        loads[category] += 1
        if category in broken:
            raise RuntimeError(f"cannot load {category} here")
        return load_engine(version_dir, **options)

    async def main() -> None:
        settings = link_settings(store, tmp_path / "engine.sock")
        rt = PipelineRuntime(settings, None, engine_link=EngineClient(settings, settings.engine_socket))
        rt.open()
        try:
            async with engine_core(settings, factory):
                await rt.registry.load_all()
                assert rt.registry.serving() == {"aaa": "1", "bbb": "1"}
            await until(lambda: not rt.engine_connected, "the front end to notice")
            broken.add("bbb")
            loads.clear()
            async with engine_core(settings, factory):
                await until(lambda: rt.engine_connected, "the reconnect")
                await asyncio.sleep(1.0)  # what a loop of reconnects would make of it
                assert loads["bbb"] <= 2, loads  # the re-acquire, and the retry of a failed load
                assert rt.registry.status() == {"aaa": "serving 1", "bbb": "failed"} and rt.registry.ready
                assert "cannot load bbb here" in rt.registry.failed["bbb"]
                assert rt.engine_connected and await one_image(rt, "aaa")
                with pytest.raises(ModelNotLoaded):
                    with rt.pin("bbb"):
                        pass
            broken.clear()
            async with engine_core(settings, factory):
                await until(lambda: rt.registry.serving() == {"aaa": "1", "bbb": "1"}, "bbb served again")
                assert await one_image(rt, "bbb") and not rt.registry.failed
        finally:
            await rt.close()

    asyncio.run(main())


def test_reconnects_back_off_while_the_engine_process_drops_every_connection(tmp_path: Path) -> None:
    """Each connection made and dropped at once (an engine process that dies while it loads)
    makes the next wait longer: a handful of connects in two seconds, not thousands. Once an
    engine process keeps the connection, the client connects."""
    sock = tmp_path / "engine.sock"
    accepted = 0

    async def main() -> None:
        async def drop(_reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            nonlocal accepted
            accepted += 1
            writer.close()
        server = await asyncio.start_unix_server(drop, path=str(sock))
        settings = link_settings(tmp_path, sock)
        client = EngineClient(settings, sock)
        client.start()
        try:
            await asyncio.sleep(2.0)
            assert 2 <= accepted <= 8, accepted
            server.close()
            await server.wait_closed()
            async with engine_core(settings):
                await until(lambda: client.connected, "a connection that stays", timeout=5)
        finally:
            await client.close()

    asyncio.run(main())


def test_a_front_end_that_started_before_the_engine_process_loads_once_it_connects(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Its loads at start time out (failed, and saying why: what /readyz reports); the first
    connection, not only a reconnect, retries them, so the front end gets ready."""
    monkeypatch.setattr(engine_client, "_CONNECT_WAIT_S", 0.5)  # a minute in production
    store = tmp_path / "store"
    fake_version(store, "aaa")

    async def main() -> None:
        settings = link_settings(store, tmp_path / "engine.sock")
        rt = PipelineRuntime(settings, None, engine_link=EngineClient(settings, settings.engine_socket))
        rt.open()
        try:
            await rt.registry.load_all()  # what ServiceState.start awaits before serving
            assert rt.registry.status() == {"aaa": "failed"}
            assert "not connected to the engine process within" in rt.registry.failed["aaa"]
            async with engine_core(settings):
                await until(lambda: rt.registry.ready, "the failed load retried on the first connection")
                assert rt.registry.serving() == {"aaa": "1"} and await one_image(rt, "aaa")
        finally:
            await rt.close()

    asyncio.run(main())


# ---------------------------------------------------------------------- the engine process, from a raw front end
def raw(message: dict[str, Any] | bytes) -> bytes:
    """A JSON message, or a packed frame, as the channel frames them."""
    body = message if isinstance(message, bytes) else json.dumps(message).encode()
    return len(body).to_bytes(4, "big") + body


def connect(sock: Path) -> socket.socket:
    conn = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    conn.connect(str(sock))
    return conn


def send(sock: socket.socket, message: dict[str, Any], fds: list[int] | None = None) -> None:
    """Send ``message`` with ``fds`` (announced as the channel does, unless it says otherwise)
    and close this side's copies."""
    if fds:
        message = {"_fds": len(fds), **message}
        socket.send_fds(sock, [raw(message)], fds)
        for fd in fds:
            os.close(fd)
    else:
        sock.sendall(raw(message))


def receive(sock: socket.socket, timeout: float = 10.0) -> Any:
    """The next message (a dict, or a packed frame's bytes); None at EOF."""
    sock.settimeout(timeout)
    head = sock.recv(4, socket.MSG_WAITALL)
    if len(head) < 4:
        return None
    body = sock.recv(int.from_bytes(head, "big"), socket.MSG_WAITALL)
    return json.loads(body) if body[:1] == b"{" else body


def memfd(size: int) -> int:
    """A memfd as a front end made one before slabs were sealed: resizable by its owner."""
    fd = os.memfd_create("test-frontend", os.MFD_CLOEXEC)
    os.ftruncate(fd, size)
    return fd


def test_descriptors_the_engine_process_does_not_keep_are_closed(tmp_path: Path) -> None:
    """Descriptors on messages that take none, on slabs that cannot attach (empty, unsealed,
    two of them), and on no message at all are closed in the engine process at once, not
    kept for the connection's life or for good. A submit too large to answer is refused
    without an error escaping, and a malformed descriptor count ends that front end's
    channel alone. Only a slab that attaches keeps its descriptor, until the front end goes."""
    store = tmp_path / "store"
    version = str(fake_version(store, "aaa"))
    settings = link_settings(store, tmp_path / "engine.sock")
    total = SlabLayout(SIZE, 2).total_bytes

    def exchange(sock: socket.socket, rid: int) -> dict[str, Any]:
        # Messages are handled in order: an answer means all sent before it were.
        sock.sendall(raw({"op": "acquire", "rid": rid, "dir": version}))
        answer = receive(sock)
        while isinstance(answer, dict) and answer["op"] == "greeted":  # each hello's end of replay
            answer = receive(sock)
        assert isinstance(answer, dict) and answer["op"] == "acquired", answer
        return answer

    def front_end(core: EngineCore, escaped: list[Any]) -> None:
        good = Slab.create(SIZE, 2, "test-good")
        base = open_fds()
        sock = connect(settings.engine_socket)
        send(sock, {"op": "hello", "pid": os.getpid()})
        exchange(sock, 1)
        connected = open_fds()
        for _ in range(20):
            send(sock, {"op": "hello", "pid": os.getpid()}, [memfd(PAGE_SIZE)])
        send(sock, {"op": "slab", "id": 1, "size": 0, "slots": 1, "name": "empty"}, [memfd(0)])
        send(sock, {"op": "slab", "id": 2, "size": SIZE, "slots": 2, "name": "unsealed"}, [memfd(total)])
        send(sock, {"op": "slab", "id": 3, "size": SIZE, "slots": 2, "name": "two"}, [memfd(total), memfd(total)])
        for _ in range(5):
            send(sock, {"op": "hello", "_fds": 0, "pid": os.getpid()}, [memfd(PAGE_SIZE) for _ in range(3)])
        sock.sendall(raw(frames.pack_submit(9, 1, 1, time.monotonic() + 5, [0] * 70000)))  # > MAX_IMAGES
        exchange(sock, 2)
        assert open_fds() == connected, "descriptors kept in the engine process"
        (frontend,) = core.frontends.values()
        assert not frontend.slabs
        send(sock, {"op": "slab", "id": 4, "size": SIZE, "slots": 2, "name": "good"}, [os.dup(good.fd)])
        exchange(sock, 3)
        assert set(frontend.slabs) == {4} and open_fds() == connected + 2  # the descriptor, and mmap's copy
        other = connect(settings.engine_socket)
        other.sendall(raw({"op": "hello", "pid": 1, "_fds": None}))
        assert receive(other) is None  # its channel ended ...
        other.close()
        exchange(sock, 4)  # ... and this one serves on
        sock.close()
        wait_until(lambda: not core.frontends, 10, "the engine process to drop the front end")
        wait_until(lambda: open_fds() == base, 10, "the slab's descriptor closed with its front end")
        good.close()
        assert not escaped, escaped

    async def main() -> None:
        escaped: list[Any] = []
        asyncio.get_running_loop().set_exception_handler(lambda _loop, context: escaped.append(context))
        async with engine_core(settings) as core:
            await asyncio.to_thread(front_end, core, escaped)

    asyncio.run(main())


@contextlib.contextmanager
def engine_process(store: Path, sock: Path, log: Path, nofile: int | None = None,
                   before: str = "") -> Iterator[subprocess.Popen[bytes]]:
    """The engine process's entry point in a process of its own (null engine); ``nofile``:
    its descriptor limit; ``before``: Python run first in it."""
    def limit() -> None:
        if nofile is not None:
            resource.setrlimit(resource.RLIMIT_NOFILE, (nofile, nofile))
    code = (f"{before}\nfrom service.engine_core import run_engine_process\n"
            f"run_engine_process({{'model_store': {str(store)!r}, 'engine': 'null', 'device': 'cpu', "
            f"'log_level': 'info'}}, {str(sock)!r})")
    with open(log, "wb") as out:
        proc = subprocess.Popen([sys.executable, "-c", code], stdout=out, stderr=subprocess.STDOUT,
                                preexec_fn=limit)
    try:
        wait_until(lambda: sock.exists() or proc.poll() is not None, 30, "the engine process's socket")
        yield proc
    finally:
        if proc.poll() is None:
            proc.terminate()
            proc.wait(15)


def test_a_front_end_that_shrinks_its_slab_cannot_kill_the_engine_process(tmp_path: Path) -> None:
    """A slab whose file its owner could shrink under the engine process's mapping (SIGBUS
    at the next touch) is refused at attach; a submit naming it fails alone; a sealed slab,
    which cannot be resized, serves."""
    store = tmp_path / "store"
    version = str(fake_version(store, "aaa"))
    sock = tmp_path / "engine.sock"
    with engine_process(store, sock, tmp_path / "engine.log") as proc:
        conn = connect(sock)
        send(conn, {"op": "hello", "pid": os.getpid()})
        assert receive(conn) == {"op": "greeted"}  # no reload to replay
        resizable = memfd(SlabLayout(SIZE, 2).total_bytes)
        send(conn, {"op": "slab", "id": 1, "size": SIZE, "slots": 2, "name": "resizable"}, [os.dup(resizable)])
        conn.sendall(raw({"op": "acquire", "rid": 1, "dir": version}))
        handle = receive(conn)["handle"]
        os.ftruncate(resizable, 0)
        conn.sendall(raw(frames.pack_submit(1, handle, 1, time.monotonic() + 5, [0])))
        answer = receive(conn)
        assert answer is not None, f"the engine process died: {proc.wait(5)}"  # -7: SIGBUS
        rid, (outcome,) = frames.unpack_result(answer)
        assert rid == 1 and outcome.code == frames.ENGINE_ERROR and proc.poll() is None
        os.close(resizable)
        sealed = Slab.create(SIZE, 2, "test-sealed")
        with pytest.raises(PermissionError):
            os.ftruncate(sealed.fd, 0)
        send(conn, {"op": "slab", "id": 2, "size": SIZE, "slots": 2, "name": "sealed"}, [os.dup(sealed.fd)])
        conn.sendall(raw(frames.pack_submit(2, handle, 2, time.monotonic() + 5, [1])))
        rid, (outcome,) = frames.unpack_result(receive(conn))
        assert rid == 2 and outcome.code == frames.OK and proc.poll() is None
        conn.close()
        sealed.close()


def test_the_engine_process_accepts_front_ends_again_after_running_out_of_descriptors(tmp_path: Path) -> None:
    """Out of descriptors for a moment (EMFILE on accept): logged, and the front ends that
    waited in the backlog meanwhile, and new ones, are accepted once descriptors are free."""
    store = tmp_path / "store"
    version = str(fake_version(store, "aaa"))
    sock, log = tmp_path / "engine.sock", tmp_path / "engine.log"
    with engine_process(store, sock, log, nofile=64) as proc:
        conns = [connect(sock) for _ in range(70)]  # more than it can hold: the rest wait in the backlog
        wait_until(lambda: open_fds(proc.pid) >= 63, 10, "the engine process's descriptors to run out")
        time.sleep(0.5)  # accept fails meanwhile
        for conn in conns[:40]:
            conn.close()
        fresh = connect(sock)
        send(fresh, {"op": "hello", "pid": os.getpid()})
        assert receive(fresh) == {"op": "greeted"}
        fresh.sendall(raw({"op": "acquire", "rid": 1, "dir": version}))
        answer = receive(fresh)
        assert answer is not None and answer["op"] == "acquired" and proc.poll() is None, answer
        for conn in [*conns[40:], fresh]:
            conn.close()
    assert "Too many open files" in log.read_text(errors="replace")  # said, not silent


def test_the_engine_process_exits_when_it_can_no_longer_accept_front_ends(tmp_path: Path) -> None:
    """An accept error that would recur on every try (here EINVAL: a socket that is no
    listener) ends the engine process with a non-zero code, for the supervisor to restart it,
    rather than leaving it up and unreachable."""
    store = tmp_path / "store"
    fake_version(store, "aaa")
    sock = tmp_path / "engine.sock"
    broken_listener = ("import socket, service.engine_core.core as core\n"
                       "def listen_unix(path):\n"
                       "    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM); s.bind(str(path)); "
                       "s.setblocking(False); return s\n"
                       "core.listen_unix = listen_unix")
    with engine_process(store, sock, tmp_path / "engine.log", before=broken_listener) as proc:
        assert proc.wait(15) != 0
    assert "accepting front ends stopped" in (tmp_path / "engine.log").read_text(errors="replace")
