"""Multi-process mode: the views that hold per front end (the ring of recent scores, the
anomaly-rate window) answer for the whole server, whichever front end is asked.

In-process first (the engine process's gather relay between front ends: parts, a front end
that never answers, one that goes away), then ``msflow serve`` with two front ends, each
fed over connections known to be held by it (``/proc``), so that what each one saw differs
on purpose: before, ``GET .../recent`` listed the images of the front end that answered
(5 or 6 of 11) and ``msflow_anomaly_rate`` was whichever front end's window was written last.
"""

from __future__ import annotations

import asyncio
import contextlib
import http.client
import json
import os
import shutil
import signal
import socket
import tempfile
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from harness import ADMIN_KEY, CATEGORY, Server, children, start, until
from service.config import Settings
from service.engine_core import EngineCore
from service.engine_core import relay as engine_relay
from service.pipeline.engine_client import EngineClient

# ---------------------------------------------------------------------- in-process: the relay


@contextlib.asynccontextmanager
async def relay(front_ends: int) -> AsyncIterator[tuple[EngineCore, Path, list[EngineClient]]]:
    """An engine process (no model: a gather needs none) and ``front_ends`` connected clients."""
    with tempfile.TemporaryDirectory() as tmp:
        sock = Path(tmp) / "engine.sock"
        settings = Settings(model_store=Path(tmp), engine_socket=sock)
        core = EngineCore(settings)
        serving = asyncio.create_task(core.serve(sock))
        clients = [EngineClient(settings, sock) for _ in range(front_ends)]
        try:
            while not sock.exists():
                await asyncio.sleep(0.01)
            for client in clients:
                client.start()
            await until(lambda: all(c.connected for c in clients) and len(core.frontends) == front_ends)
            yield core, sock, clients
        finally:
            for client in clients:
                await client.close()
            core.stop()
            await serving


def test_a_gather_gets_every_other_front_ends_items_in_parts() -> None:
    async def main() -> None:
        async with relay(3) as (core, _, (asker, big, none)):
            big.collectors["t"] = lambda args: [[i, args["x"], "é" * 3] for i in range(2500)]  # three parts
            asked_itself: list[Any] = []
            asker.collectors["t"] = asked_itself.append  # never: the asker has its own items
            got = await asker.collect("t", {"x": 7})  # `none` has no collector: answers no item, at once
            assert (got.asked, got.answered) == (2, 2) and not asked_itself
            assert got.items == [[i, 7, "ééé"] for i in range(2500)]
            assert not core.gathers
            alone = await big.collect("nothing", {})
            assert (alone.asked, alone.answered, alone.items) == (2, 2, [])

    asyncio.run(main())


def test_a_front_end_that_does_not_answer_is_left_out_in_time(monkeypatch: pytest.MonkeyPatch) -> None:
    """A stopped front end (SIGSTOP, a loop stuck) must not hang an admin's page; one that goes
    away mid-gather ends it at once."""
    async def main() -> None:
        async with relay(2) as (core, sock, (asker, other)):
            other.collectors["t"] = lambda args: [["mine"]]
            mute = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)  # a front end that never reads
            mute.connect(str(sock))
            await until(lambda: len(core.frontends) == 3)
            monkeypatch.setattr(engine_relay, "GATHER_TIMEOUT_S", 0.3)
            started = time.monotonic()
            got = await asker.collect("t", {})
            assert (got.asked, got.answered, got.items) == (2, 1, [["mine"]])
            assert 0.3 <= time.monotonic() - started < 2
            monkeypatch.setattr(engine_relay, "GATHER_TIMEOUT_S", 60.0)
            pending = asyncio.create_task(asker.collect("t", {}))
            await until(lambda: bool(core.gathers))
            started = time.monotonic()
            mute.close()
            got = await pending
            assert (got.asked, got.answered, got.items) == (2, 1, [["mine"]])
            assert time.monotonic() - started < 2 and not core.gathers

    asyncio.run(main())


# ---------------------------------------------------------------------- msflow serve, two front ends
WINDOW = 1000  # each front end's window holds 500: all the test sends, so the rate is an exact share


@pytest.fixture(scope="module")
def server(model_store: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    store = tmp_path_factory.mktemp("mp-recent") / "store"
    shutil.copytree(model_store, store)
    server = start(store, tmp_path_factory.mktemp("mp-recent-logs") / "server.log", api_processes=2, engine="onnx",
                   admin_api_keys=ADMIN_KEY, anomaly_rate_window=WINDOW, max_queue_delay_ms=20)
    yield server
    server.stop()


def holder(port: int, client_port: int, pids: list[int]) -> int | None:
    """Which of ``pids`` holds the server side of the connection from ``client_port`` to ``port``."""
    inodes = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in Path(table).read_text().splitlines()[1:]:
            fields = line.split()
            if (int(fields[1].rsplit(":", 1)[1], 16) == port and int(fields[2].rsplit(":", 1)[1], 16) == client_port
                    and fields[3] == "01"):
                inodes.add(f"socket:[{fields[9]}]")
    for pid in pids:
        for fd in Path(f"/proc/{pid}/fd").iterdir():
            with contextlib.suppress(OSError):
                if Path.readlink(fd).as_posix() in inodes:
                    return pid
    return None


def connections_by_front_end(server: Server) -> dict[int, http.client.HTTPConnection]:
    """A kept-alive connection held by each front end (the kernel picks per connection)."""
    pids = sorted(p for p, name in children(server.proc.pid).items() if name.startswith("msflow-api-"))
    assert len(pids) == 2
    held: dict[int, http.client.HTTPConnection] = {}
    for _ in range(64):  # both by chance within a few tries
        conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=60)
        conn.request("GET", "/healthz")  # answered: accepted by its front end
        conn.getresponse().read()
        pid = holder(server.port, conn.sock.getsockname()[1], pids)
        if pid is None or pid in held:
            conn.close()
        else:
            held[pid] = conn
        if len(held) == 2:
            return held
    raise AssertionError("no connection to one of the front ends in 64 tries")


def call(conn: http.client.HTTPConnection, method: str, path: str, body: bytes | None = None,
         **headers: str) -> tuple[int, bytes]:
    conn.request(method, path, body=body, headers=headers)
    answer = conn.getresponse()
    return answer.status, answer.read()


def inspect(conn: http.client.HTTPConnection, path: Path, name: str) -> bool:
    status, body = call(conn, "POST", f"/v1/inspect/{CATEGORY}?heatmap=none", path.read_bytes(),
                        **{"Content-Type": "image/png", "X-Filename": name})
    assert status == 200, body
    return bool(json.loads(body)["results"][0]["is_anomalous"])


def anomaly_rate(conn: http.client.HTTPConnection) -> float | None:
    _, body = call(conn, "GET", "/metrics")
    for line in body.decode().splitlines():
        if line.startswith(f'msflow_anomaly_rate{{category="{CATEGORY}"}}'):
            return float(line.split()[-1])
    return None


@dataclass
class Fed:
    """What each front end was sent, over a connection it holds."""

    connections: dict[int, http.client.HTTPConnection]
    sent: list[str]  # file names, in order
    verdicts: dict[int, list[bool]]  # front end -> its images' is_anomalous


@pytest.fixture(scope="module")
def fed(server: Server, demo_test_images: dict[str, list[Path]]) -> Iterator[Fed]:
    """One front end is sent the defects, the other the good parts: their own shares of
    anomalous verdicts differ, and the server's is neither."""
    held = connections_by_front_end(server)
    (first, a), (second, b) = held.items()
    defects = [p for kind, paths in demo_test_images.items() if kind != "good" for p in paths]
    verdicts: dict[int, list[bool]] = {first: [], second: []}
    sent: list[str] = []
    for i, path in enumerate(defects):
        sent.append(name := f"a{i}-{path.name}")
        verdicts[first].append(inspect(a, path, name))
    for i, path in enumerate(demo_test_images["good"]):
        sent.append(name := f"b{i}-{path.name}")
        verdicts[second].append(inspect(b, path, name))
    shares = [sum(v) / len(v) for v in verdicts.values()]
    assert shares[0] != shares[1], f"the model called both sets alike: {shares}"
    yield Fed(held, sent, verdicts)
    for conn in held.values():
        conn.close()


def test_recent_scores_list_every_image_whichever_front_end_answers(fed: Fed) -> None:
    for pid, conn in fed.connections.items():
        status, body = call(conn, "GET", f"/v1/models/{CATEGORY}/recent?limit=500&threshold=0", **{
            "X-API-Key": ADMIN_KEY})
        assert status == 200, body
        recent = json.loads(body)
        assert sorted(s["filename"] for s in recent["scores"]) == sorted(fed.sent), f"front end {pid}"
        assert recent["scores"][0]["filename"] == fed.sent[-1]  # newest first, over both
        assert recent["summary"]["images"] == len(fed.sent)
        assert recent["partial"] is False and recent["front_ends"] == {"answered": 2, "of": 2}


def test_the_anomaly_rate_is_the_servers_share_whichever_front_end_answers(fed: Fed) -> None:
    everything = [v for verdicts in fed.verdicts.values() for v in verdicts]
    for pid, conn in fed.connections.items():
        assert anomaly_rate(conn) == pytest.approx(sum(everything) / len(everything)), f"front end {pid}"


def test_recent_scores_say_they_are_partial_while_a_front_end_does_not_answer(fed: Fed) -> None:
    """A stopped front end (SIGSTOP: a loop stuck) is left out after 2 s; before, the answer
    listed the other front end's images only (8 of 20 in a run) and said nothing of it."""
    (stopped, _), (asked, conn) = fed.connections.items()
    os.kill(stopped, signal.SIGSTOP)
    try:
        status, body = call(conn, "GET", f"/v1/models/{CATEGORY}/recent?limit=500&threshold=0",
                            **{"X-API-Key": ADMIN_KEY})
    finally:
        os.kill(stopped, signal.SIGCONT)
    assert status == 200, body
    recent = json.loads(body)
    assert recent["partial"] is True and recent["front_ends"] == {"answered": 1, "of": 2}
    assert recent["summary"]["images"] == len(fed.verdicts[asked]) < len(fed.sent)
    status, body = call(conn, "GET", f"/v1/models/{CATEGORY}/recent?limit=500", **{"X-API-Key": ADMIN_KEY})
    assert json.loads(body)["partial"] is False, "still partial once the front end answers again"
