"""Multi-process mode (MSFLOW_API_PROCESSES > 1): front ends feeding one engine process.

In-process first (the engine core and a front end's runtime on one event loop, against the
plain runtime), then ``msflow serve`` end to end over real HTTP: batches that fill from
every front end, metrics added up over the processes, a reload that reaches every front end,
503/504 answers, a graceful drain on SIGTERM, and kills of a front end and of the engine
process that leave no shared memory behind.
"""

from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import contextlib
import os
import shutil
import signal
import socket
import tempfile
import threading
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest

from harness import (ADMIN_KEY, CATEGORY, Server, assert_error, children, copy_version, fake_version, metric, part,
                     start, until, wait_until)
from loadtests.run import listens, sockets_held
from multiprocess_fixtures import RecordedChannel, engine_process
from service.config import Settings
from service.engine_core import EngineCore, FrontEnd
from service.ipc import frames
from service.ipc.slab import Slab
from models.manifest import Manifest
from service.metrics import ServiceMetrics
from service.engines.base import EngineError
from service.pipeline.engine_client import EngineClient, EngineUnavailable, RemoteEngine
from service.pipeline.remote_batcher import RemoteBatcher
from service.pipeline.item import InspectedImage
from service.pipeline.runtime import PipelineRuntime
from service.schemas import InspectOptions, Upload

MP = dict(api_processes=2, engine="onnx", store_poll_s=0.5)




def memfds(pid: int) -> set[str]:
    """The shared-memory slabs ``pid`` maps (``/memfd:msflow-<owner pid>-<size>``)."""
    try:
        lines = Path(f"/proc/{pid}/maps").read_text().splitlines()
    except OSError:
        return set()
    return {line.split()[5] for line in lines if "/memfd:msflow-" in line}


def roles(server: Server) -> tuple[list[int], int]:
    kids = children(server.proc.pid)
    frontends = sorted(p for p, name in kids.items() if name.startswith("msflow-api-"))
    engines = [p for p, name in kids.items() if name == "msflow-engine"]
    assert len(engines) == 1, kids
    return frontends, engines[0]


def post_many(url: str, paths: list[Path], count: int, **params: str) -> list[httpx.Response]:
    """``count`` requests at once, each on its own connection (so they spread over front ends)."""
    def one(i: int) -> httpx.Response:
        return httpx.post(f"{url}/v1/inspect/{CATEGORY}", files=[part(paths[i % len(paths)])],
                          params={"heatmap": "none", **params}, timeout=60)
    with concurrent.futures.ThreadPoolExecutor(count) as pool:
        return list(pool.map(one, range(count)))


# ---------------------------------------------------------------------- in-process
def test_a_front_end_through_the_engine_core_answers_like_the_local_engine(model_store: Path,
                                                                           good_images: list[Path]) -> None:
    paths = good_images[:3]

    def records() -> list[InspectedImage]:
        return [InspectedImage.received(i, Upload(filename=p.name, data=p.read_bytes())) for i, p in enumerate(paths)]

    async def answers(rt: PipelineRuntime) -> list[InspectedImage]:
        await rt.registry.load_all()
        items = records()
        with rt.pin(CATEGORY) as lane:
            await rt.run(lane, items, InspectOptions(), time.monotonic() + 30, time.monotonic())
        return items

    async def main() -> None:
        base = dict(model_store=model_store, device="cpu", intra_op_threads=1, decode_threads=2, store_poll_s=0,
                    max_batch_size=4, max_queue_delay_ms=20, engine="onnx")
        local = PipelineRuntime(Settings(**base), None)
        local.open()
        try:
            expected = await answers(local)
        finally:
            await local.close()
        with tempfile.TemporaryDirectory() as tmp:
            sock = Path(tmp) / "engine.sock"
            core = EngineCore(Settings(**base))
            serving = asyncio.create_task(core.serve(sock))
            remote = PipelineRuntime(Settings(**base, engine_socket=sock), None,
                                     engine_link=EngineClient(Settings(**base, engine_socket=sock), sock))
            remote.open()
            try:
                got = await answers(remote)
                with remote.pin(CATEGORY) as lane:
                    assert isinstance(lane.batcher, RemoteBatcher)
                    assert lane.model.engine.name == "onnxruntime-cpu"
                assert len(core.hosted) == 1 and len(core.frontends) == 1
            finally:
                await remote.close()
                core.stop()
                await serving
        for mine, theirs in zip(got, expected):
            assert mine.answer.raw_score == pytest.approx(theirs.answer.raw_score, rel=1e-5, abs=1e-5)
            assert mine.answer.verdict == theirs.answer.verdict
            assert np.allclose(mine.anomaly_map, theirs.anomaly_map, rtol=1e-5, atol=1e-5)
            assert mine.answer.batch_size >= 1

    asyncio.run(main())


def test_a_bad_submit_fails_alone_and_an_unknown_version_is_not_loaded(model_store: Path) -> None:
    """A slot outside the front end's slab is refused before the batch (which would fail
    every front end's images in it), a handle the engine process does not hold answers
    not_loaded, and a good submit in the same turn is answered ok."""
    async def main() -> None:
        core = EngineCore(Settings(model_store=model_store, device="cpu", engine="null", max_batch_size=4,
                                   max_queue_delay_ms=1, store_poll_s=0))
        hosted = await core.engines.load(str(model_store / CATEGORY / "1"))
        channel = RecordedChannel()
        frontend = FrontEnd(1, channel)  # type: ignore[arg-type]
        size = hosted.engine.manifest.input_size
        slab = frontend.slabs[1] = Slab.create(size, 2, "test-bad-submit")
        try:
            deadline = time.monotonic() + 30
            core._handle_frame(frontend, frames.pack_submit(1, hosted.handle, 1, deadline, [5]))  # no slot 5
            core._handle_frame(frontend, frames.pack_submit(2, hosted.handle + 1, 1, deadline, [0]))
            core._handle_frame(frontend, frames.pack_submit(3, hosted.handle, 1, deadline, [0, 1]))
            core._handle_frame(frontend, b"\x09junk")  # logged and dropped; the channel stays up
            while len(channel.frames) < 3:
                channel.arrived.clear()
                await asyncio.wait_for(channel.arrived.wait(), 10)
            answers = dict(frames.unpack_result(f) for f in channel.frames)
            assert [o.code for o in answers[1]] == [frames.ENGINE_ERROR] and "slot 5" in answers[1][0].message
            assert [o.code for o in answers[2]] == [frames.NOT_LOADED]
            assert [o.code for o in answers[3]] == [frames.OK, frames.OK]
            assert all(o.batch_size == 2 for o in answers[3]) and (slab.output(1) == 0).all()
        finally:
            await hosted.batcher.drain(5)
            slab.close()

    asyncio.run(main())


def test_a_lanes_in_flight_list_stays_bounded_and_drain_waits_for_it(model_store: Path) -> None:
    """A front end's lane remembers its images in flight for ``drain`` without a callback per
    image: the list is pruned as it grows, so ten times the lane's slots, one at a time, leave
    at most twice its slots in it; drain returns once the last image is answered."""
    async def main() -> None:
        settings = dict(model_store=model_store, device="cpu", engine="null", max_batch_size=4,
                        max_queue_delay_ms=1, max_queue_size=4, store_poll_s=0)
        version_dir = model_store / CATEGORY / "1"
        with tempfile.TemporaryDirectory() as tmp:
            sock = Path(tmp) / "engine.sock"
            core = EngineCore(Settings(**settings))
            serving = asyncio.create_task(core.serve(sock))
            client = EngineClient(Settings(**settings, engine_socket=sock), sock)
            client.start()
            try:
                answer = await client.acquire(version_dir)
                manifest = Manifest.read(version_dir)
                engine = RemoteEngine(client, version_dir, manifest, str(answer["name"]),
                                      int(answer["max_batch_size"]))
                lane = RemoteBatcher(client, engine, 0.001, ServiceMetrics())
                image = np.zeros((manifest.input_size, manifest.input_size, 3), dtype=np.uint8)
                longest = 0
                for _ in range(10 * lane.max_queue_size):
                    (future,) = lane.submit_many([image], time.monotonic() + 30)
                    longest = max(longest, len(lane._in_flight))
                    assert (await future).batch_size == 1
                assert 0 < longest <= 2 * lane.max_queue_size, longest
                last = lane.submit_many([image, image], time.monotonic() + 30)
                await asyncio.wait_for(lane.drain(), 10)
                assert all(f.done() and not f.cancelled() for f in last) and lane.depth == 0
            finally:
                await client.close()
                core.stop()
                await serving

    asyncio.run(main())


class ValueEngine:
    """Scores every image ``value`` and fills its map with it. Once warm (the engine
    process's own first batch), a ``gated`` one holds each batch at ``gate`` (a busy
    accelerator) and a ``failing`` one raises."""

    def __init__(self, version_dir: Path, value: float, gated: bool = False, failing: bool = False) -> None:
        self.manifest = Manifest.read(version_dir)
        self.name = f"value-{value}"
        self.max_batch_size = 4
        self.value, self.failing = value, failing
        self.started, self.gate = threading.Event(), threading.Event()
        if not gated:
            self.gate.set()
        self._warm = False

    def run(self, images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        if self._warm:
            self.started.set()
            assert self.gate.wait(10), "test gate never opened"
            if self.failing:
                raise RuntimeError("engine exploded")
        self._warm = True
        n, size = len(images), self.manifest.input_size
        return np.full(n, self.value, np.float32), np.full((n, size, size), self.value, np.float32)


@contextlib.asynccontextmanager
async def front_end_of(core: EngineCore, settings: Settings) -> AsyncIterator[tuple[PipelineRuntime, int]]:
    """A front end's runtime linked to ``core`` with the store's models loaded: the runtime,
    and the front end's number in the engine process; closed afterwards."""
    rt = PipelineRuntime(settings, None, engine_link=EngineClient(settings, settings.engine_socket))
    rt.open()
    try:
        await rt.registry.load_all()
        (ident,) = core.frontends
        yield rt, ident
    finally:
        await rt.close()


def test_a_cancelled_image_keeps_its_slot_until_its_running_batch_is_done(tmp_path: Path) -> None:
    """A front end frees an image's slot on the engine process's answer. A cancel (deadline,
    client gone) reaching an image whose batch runs must not be answered before the batch
    ends: the slot would go to another request while the engine still writes the old map
    into it."""
    store = tmp_path / "store"
    dirs = {"aaa": fake_version(store, "aaa"), "bbb": fake_version(store, "bbb")}
    engines: dict[str, ValueEngine] = {}

    def factory(version_dir: Path, **_: Any) -> ValueEngine:
        category = version_dir.parent.name
        engines[category] = ValueEngine(version_dir, 1.0 if category == "aaa" else 2.0, gated=category == "aaa")
        return engines[category]

    async def main() -> None:
        async with engine_process(store, factory) as (core, settings):
            client = EngineClient(settings, settings.engine_socket)
            client.start()
            try:
                for version_dir in dirs.values():
                    await client.acquire(version_dir)
                pool = client.pool(32)
                image = np.zeros((32, 32, 3), np.uint8)
                (a,) = client.submit(str(dirs["aaa"]), [image], time.monotonic() + 30)
                assert await asyncio.to_thread(engines["aaa"].started.wait, 10)  # A's batch is in the engine
                a.cancel()
                await asyncio.sleep(0.3)  # time for a (wrong) answer to come back
                assert pool.free == pool.capacity - 1, "A's slot was freed while its batch still runs"
                (b,) = client.submit(str(dirs["bbb"]), [image], time.monotonic() + 30)
                done = await asyncio.wait_for(b, 10)
                assert done.value[0] == 2.0 and (done.value[1] == 2.0).all()
                engines["aaa"].gate.set()
                await until(lambda: pool.free == pool.capacity, "A's slot back once its batch is done")
                assert a.cancelled()
            finally:
                engines["aaa"].gate.set()
                await client.close()

    asyncio.run(main())


def test_a_channel_that_ends_under_a_running_batch_never_hands_its_slots_out_again(tmp_path: Path) -> None:
    """The channel can end while the engine process lives on (here it drops the front end,
    as for a corrupt stream): its batch still running writes into the front end's slab. The
    front end fails the request, reconnects and serves on; the slots that were in flight
    are on a new slab, not in memory the old batch writes."""
    store = tmp_path / "store"
    version_dir = fake_version(store, "aaa")
    engines: list[ValueEngine] = []

    def factory(version_dir: Path, **_: Any) -> ValueEngine:
        engines.append(ValueEngine(version_dir, 1.0, gated=True))
        return engines[-1]

    async def main() -> None:
        async with engine_process(store, factory) as (core, settings):
            client = EngineClient(settings, settings.engine_socket)
            client.start()
            try:
                await client.acquire(version_dir)
                pool = client.pool(32)
                image = np.zeros((32, 32, 3), np.uint8)
                (a,) = client.submit(str(version_dir), [image], time.monotonic() + 30)
                (slot,) = client.images.requests[max(client.images.requests)].slots
                written = client.images.slabs[32][1]  # the memory A's batch writes its map into
                assert await asyncio.to_thread(engines[0].started.wait, 10)
                (frontend,) = core.frontends.values()
                frontend.channel.close()
                with pytest.raises(EngineUnavailable):
                    await asyncio.wait_for(a, 10)
                await until(lambda: client.connected, "the reconnect")
                assert pool.free == pool.capacity
                engines[0].gate.set()
                await until(lambda: (written.output(slot) == 1.0).all(), "A's late map")
                serving = client.images.slabs[32][1]
                assert serving is not written and (serving.output(slot) == 0).all()
                (b,) = client.submit(str(version_dir), [image], time.monotonic() + 30)  # the new slab reached the engine
                assert (await asyncio.wait_for(b, 10)).value[0] == 1.0
            finally:
                engines[0].gate.set()
                await client.close()

    asyncio.run(main())


def test_a_reload_whose_warm_up_fails_keeps_the_version_served_held(tmp_path: Path) -> None:
    """The registry keeps serving version 1 when version 2's warm-up through the engine
    process fails: this front end must still hold 1 there (not let go of it at 2's acquire),
    and let go of 2, which the engine process then unloads."""
    store = tmp_path / "store"
    v1 = fake_version(store, "aaa", "1")

    def factory(version_dir: Path, **_: Any) -> ValueEngine:
        return ValueEngine(version_dir, 0.0, failing=version_dir.name == "2")

    async def main() -> None:
        async with engine_process(store, factory, request_deadline_ms=500) as (core, settings):
            core.unload_grace_s = 0.1
            async with front_end_of(core, settings) as (rt, ident):
                v2 = fake_version(store, "aaa", "2")
                with pytest.raises(EngineError):
                    await rt.registry.reload("aaa")
                assert rt.registry.serving() == {"aaa": "1"}
                await until(lambda: str(v2) not in core.hosted, "version 2 unloaded")
                await asyncio.sleep(0.3)  # past the grace period
                assert str(v1) in core.hosted and set(core.hosted[str(v1)].holders) == {ident}
                with rt.pin("aaa") as lane:
                    (future,) = lane.batcher.submit_many([np.zeros((32, 32, 3), np.uint8)], time.monotonic() + 10)
                    assert (await asyncio.wait_for(future, 10)).batch_size == 1

    asyncio.run(main())


def test_reloading_the_version_served_holds_it_once(tmp_path: Path) -> None:
    """A reload of the version already served (an operator's reload with nothing new, or one
    followed from another front end) acquires it again: once the next version serves, the
    engine process must still unload it."""
    store = tmp_path / "store"
    v1 = fake_version(store, "aaa", "1")

    async def main() -> None:
        async with engine_process(store, request_deadline_ms=500) as (core, settings):
            core.unload_grace_s = 0.1
            async with front_end_of(core, settings) as (rt, ident):
                await rt.registry.reload("aaa")
                await rt.registry.reload("aaa", "1")
                await asyncio.sleep(0.3)  # past the grace period: still held
                assert set(core.hosted[str(v1)].holders) == {ident}
                v2 = fake_version(store, "aaa", "2")
                await rt.registry.reload("aaa")
                await until(lambda: str(v1) not in core.hosted, "version 1 unloaded")
                assert list(core.hosted) == [str(v2)] and set(core.hosted[str(v2)].holders) == {ident}

    asyncio.run(main())


# ---------------------------------------------------------------------- msflow serve, two front ends
@pytest.fixture(scope="module")
def mp_store(model_store: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    store = tmp_path_factory.mktemp("mp") / "store"
    shutil.copytree(model_store, store)
    copy_version(store / CATEGORY / "1", store / CATEGORY / "2", CATEGORY, "2")
    return store


@pytest.fixture(scope="module")
def mp_server(mp_store: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    server = start(mp_store, tmp_path_factory.mktemp("mp-logs") / "server.log", **MP, admin_api_keys=ADMIN_KEY,
                   max_batch_size=8, max_queue_delay_ms=100)
    yield server
    server.stop()


def test_batches_fill_from_every_front_end_and_metrics_add_up(mp_server: Server, good_images: list[Path]) -> None:
    frontends, engine = roles(mp_server)
    assert len(frontends) == 2
    client = httpx.Client(base_url=mp_server.url)
    before = metric(client, "msflow_requests_total", endpoint="/v1/inspect/{category}", status="200")
    sent = 0
    for _ in range(4):  # the kernel picks the front end per connection: a few rounds make both feed one batch
        answers = post_many(mp_server.url, good_images, 24)
        sent += len(answers)
        assert all(r.status_code == 200 for r in answers), [r.text for r in answers if r.status_code != 200]
        if metric(client, "msflow_batch_frontends_sum") > metric(client, "msflow_batch_frontends_count"):
            break
    shared = metric(client, "msflow_batch_frontends_sum") - metric(client, "msflow_batch_frontends_count")
    assert shared > 0, "no engine batch ever held images from both front ends"
    # The engine process's batch histogram and the front ends' request counters, on one /metrics.
    assert metric(client, "msflow_batch_size_sum", category=CATEGORY) >= sent
    assert metric(client, "msflow_batch_size_bucket", category=CATEGORY, le="8.0") - \
        metric(client, "msflow_batch_size_bucket", category=CATEGORY, le="6.0") > 0, "never a full batch"
    after = metric(client, "msflow_requests_total", endpoint="/v1/inspect/{category}", status="200")
    assert after - before == sent
    assert {r.json()["model_version"] for r in answers} == {"2"}
    # Collector passes of the engine process and of the front ends, timed in each, on one /metrics.
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline and not (metric(client, "msflow_gc_pause_seconds_count", process="engine")
                                               and metric(client, "msflow_gc_pause_seconds_count", process="api")):
        post_many(mp_server.url, good_images, 8)
        time.sleep(0.3)
    assert metric(client, "msflow_gc_pause_seconds_count", process="engine") > 0
    assert metric(client, "msflow_gc_pause_seconds_count", process="api") > 0
    # The engine holds one slab per front end; each front end its own.
    assert {m.split("-")[1] for m in memfds(engine)} == {str(p) for p in frontends}


def accepted_connections(pid: int, port: int) -> int:
    """Established TCP connections to ``port`` that process ``pid`` holds (accepted by it)."""
    return sockets_held(pid, port, "01")


def test_long_lived_connections_spread_over_the_front_ends(mp_server: Server) -> None:
    """Each front end listens on a socket of its own (SO_REUSEPORT): the kernel spreads even
    connections opened all at once and kept alive, which a shared socket handed to whichever
    front end was awake (8 of 8 to one, measured)."""
    frontends, _ = roles(mp_server)
    port = int(mp_server.url.rsplit(":", 1)[1])
    before = {pid: accepted_connections(pid, port) for pid in frontends}
    connections = [socket.create_connection(("127.0.0.1", port), timeout=10) for _ in range(16)]
    try:
        for conn in connections:
            conn.sendall(b"GET /healthz HTTP/1.1\r\nHost: test\r\n\r\n")
        for conn in connections:
            assert conn.recv(65536).startswith(b"HTTP/1.1 200"), "no answer on a kept-alive connection"
        # 16 connections over 2 front ends all on one by chance: 2 in 65536.
        held = {pid: accepted_connections(pid, port) - before[pid] for pid in frontends}
        assert sum(held.values()) == 16, held
        assert all(n > 0 for n in held.values()), f"every connection went to one front end: {held}"
        # Both front ends serve through the connections' budgets (service/api/connections.py):
        # bytes that are not HTTP get the API's error shape there, not uvicorn's plain text.
        for conn in connections:
            conn.sendall(b"NOT HTTP\r\n\r\n")
        for conn in connections:
            answer = b""
            while chunk := conn.recv(65536):
                answer += chunk
            assert b"400 Bad Request" in answer and b'"code": "bad_request"' in answer, answer
    finally:
        for conn in connections:
            conn.close()


def test_a_reload_on_one_front_end_reaches_every_front_end(mp_server: Server, good_images: list[Path]) -> None:
    """And counts once: the front ends that follow it count only a failure to follow (one
    operator reload read as two on msflow_model_reloads_total with two front ends)."""
    client = httpx.Client(base_url=mp_server.url)
    reloads_before = metric(client, "msflow_model_reloads_total", category=CATEGORY, outcome="ok")
    r = httpx.post(f"{mp_server.url}/v1/models/{CATEGORY}/reload", params={"version": "1"},
                   headers={"X-API-Key": ADMIN_KEY}, timeout=60)
    assert r.status_code == 200, r.text
    assert r.json()["version"] == "1"

    def all_on_one() -> bool:
        return {a.json()["model_version"] for a in post_many(mp_server.url, good_images, 12)} == {"1"}
    wait_until(all_on_one, 20, "every front end serving version 1", interval=0.2)
    assert metric(client, "msflow_model_reloads_total", category=CATEGORY, outcome="ok") == reloads_before + 1
    r = httpx.post(f"{mp_server.url}/v1/models/{CATEGORY}/reload", headers={"X-API-Key": ADMIN_KEY}, timeout=60)
    assert r.status_code == 200 and r.json()["version"] == "2", r.text
    wait_until(lambda: {a.json()["model_version"] for a in post_many(mp_server.url, good_images, 12)} == {"2"},
               20, "every front end back on version 2", interval=0.2)


def test_killed_processes_are_replaced_and_leave_no_shared_memory(mp_server: Server,
                                                                   good_images: list[Path]) -> None:
    shm_before = set(os.listdir("/dev/shm"))
    frontends, engine = roles(mp_server)
    victim = frontends[0]
    port = int(mp_server.url.rsplit(":", 1)[1])
    os.kill(victim, signal.SIGKILL)
    # The supervisor starts a new front end, which joins the port only once it serves: until
    # then the kernel hands every new connection to the other one, so no answer meanwhile is
    # a 503 from a front end still loading. The engine process lets go of the dead one's slab.
    statuses: list[int] = []
    done = threading.Event()

    def keep_posting() -> None:  # new connections all along, while the replacement starts and loads
        while not done.is_set():
            statuses.extend(r.status_code for r in post_many(mp_server.url, good_images, 8))

    def replaced() -> bool:
        now = roles(mp_server)[0]
        return len(now) == 2 and victim not in now and all(listens(pid, port) for pid in now)
    poster = threading.Thread(target=keep_posting)
    poster.start()
    try:
        wait_until(replaced, 30, "a replacement front end on the port", interval=0.02)
        time.sleep(1.0)  # and a while after it joined
    finally:
        done.set()
        poster.join()
    assert statuses and set(statuses) == {200}, collections.Counter(statuses)
    wait_until(lambda: not any(f"msflow-{victim}-" in m for m in memfds(engine)), 15,
               "the engine process to unmap the dead front end's slab")
    wait_until(lambda: all(r.status_code == 200 for r in post_many(mp_server.url, good_images, 8)), 30,
               "both front ends answering")

    os.kill(engine, signal.SIGKILL)
    statuses = []

    def recovered() -> bool:
        answers = post_many(mp_server.url, good_images, 4)
        statuses.extend(r.status_code for r in answers)
        for r in answers:
            if r.status_code != 200:
                assert_error(r, 503, "engine_unavailable")
                assert r.headers["Retry-After"]
        return all(r.status_code == 200 for r in answers)
    wait_until(recovered, 60, "answers from the restarted engine process", interval=0.2)
    frontends, new_engine = roles(mp_server)
    assert new_engine != engine and len(frontends) == 2
    wait_until(lambda: {m.split("-")[1] for m in memfds(new_engine)} == {str(p) for p in frontends}, 15,
               "the new engine process mapping the live front ends' slabs")
    for frontend in frontends:
        assert {m.split("-")[1] for m in memfds(frontend)} == {str(frontend)}  # its own slab, nothing stale
    assert set(os.listdir("/dev/shm")) == shm_before  # nothing named was ever made
    httpx.get(f"{mp_server.url}/readyz").raise_for_status()


def test_queue_full_and_deadline_answers_hold(mp_store: Path, tmp_path: Path, good_images: list[Path]) -> None:
    """413 for more images than the front end's slots (it could never be served: a 503 would
    have its client retry in vain); 503 + Retry-After for one that fits while the slots are
    held; 504 when the engine process's queue outlasts the deadline, and the slots come back
    after it."""
    server = start(mp_store, tmp_path / "server.log", **MP, max_queue_size=4, max_files_per_request=8,
                   max_batch_size=8, max_queue_delay_ms=400, request_deadline_ms=150)
    try:
        url = f"{server.url}/v1/inspect/{CATEGORY}"
        files = [part(p) for p in good_images[:5]]
        r = httpx.post(url, files=files, timeout=30)
        assert_error(r, 413, "too_many_files")
        assert "Retry-After" not in r.headers

        def three_at_once() -> list[httpx.Response]:
            """Three requests of 3 images on two front ends of 4 slots each: two meet on one
            front end, and the second finds no room until the batch forms (400 ms)."""
            barrier = threading.Barrier(3)

            def post(_: int) -> httpx.Response:
                barrier.wait()
                return httpx.post(url, files=files[:3], timeout=30)

            with concurrent.futures.ThreadPoolExecutor(3) as pool:
                answers = list(pool.map(post, range(3)))
            time.sleep(1.0)  # the engine process answers the cancelled images when their batch forms
            return answers

        rounds: list[list[httpx.Response]] = []  # a round whose pair came apart in time proves nothing: again
        while len(rounds) < 3 and not any(r.status_code == 503 for answers in rounds for r in answers):
            rounds.append(three_at_once())
        full = [r for answers in rounds for r in answers if r.status_code == 503]
        assert full, [[(r.status_code, r.text[:80]) for r in answers] for answers in rounds]
        assert_error(full[0], 503, "queue_full")
        assert full[0].headers["Retry-After"]
        for _ in range(3):  # 4 slots each time: a leaked slot would turn these into 503s
            r = httpx.post(f"{server.url}/v1/inspect/{CATEGORY}", files=files[:4], timeout=30)
            assert_error(r, 504, "deadline_exceeded")
            time.sleep(0.5)  # the engine process answers the cancelled images when their batch forms
        client = httpx.Client(base_url=server.url)
        wait_until(lambda: metric(client, "msflow_rejections_total", category=CATEGORY, reason="cancelled") > 0, 10,
                   "the engine process dropping cancelled images before the engine")
    finally:
        server.stop()


def test_sigterm_drains_requests_in_flight_then_stops_every_process(mp_store: Path, tmp_path: Path,
                                                                     good_images: list[Path]) -> None:
    server = start(mp_store, tmp_path / "server.log", **MP, max_batch_size=8, max_queue_delay_ms=3000)
    kids = set(children(server.proc.pid))
    client = httpx.Client(base_url=server.url)
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        pending = pool.submit(post_many, server.url, good_images, 6)
        # SIGTERM once all six wait in the engine process's forming batch (a batch of 8 waits
        # up to 3 s for company): a request not yet sent would rightly be refused.
        wait_until(lambda: metric(client, "msflow_queue_depth", category=CATEGORY) == 6, 30,
                   "six images queued in the engine process", interval=0.05)
        server.proc.send_signal(signal.SIGTERM)
        answers = pending.result(60)
    assert [r.status_code for r in answers] == [200] * 6
    assert server.proc.wait(60) == 0

    def outliving() -> list[int]:
        alive = []
        for p in kids:
            try:
                if Path(f"/proc/{p}/stat").read_text().split(") ")[1][0] != "Z":
                    alive.append(p)
            except OSError:  # gone
                pass
        return alive
    # multiprocessing's resource tracker (a child too) exits when it reads EOF from the pipe its
    # users held, a moment after the last of them: allow that moment, not a lingering process.
    wait_until(lambda: not outliving(), 10, "every child to exit after the supervisor")
    server.stop()


def test_a_threshold_change_reaches_every_front_end_without_redis(tmp_path: Path) -> None:
    """Without Redis the override file is the only shared copy: each front end follows it
    within MSFLOW_THRESHOLD_SYNC_S (the others kept the old value until restarted, and answers
    used the old and the new threshold at random). A DELETE travels the same way."""
    import io

    from PIL import Image

    store = tmp_path / "store"
    fake_version(store, CATEGORY, "1", size=32)
    server = start(store, tmp_path / "server.log", api_processes=2, engine="null", admin_api_keys=ADMIN_KEY,
                   threshold_sync_s=0.3, review_enabled=False)
    buf = io.BytesIO()
    Image.new("RGB", (32, 32), (90, 90, 90)).save(buf, "PNG")
    png = buf.getvalue()

    def thresholds_seen(count: int = 16) -> collections.Counter[float]:
        """Over fresh connections, which SO_REUSEPORT spreads over the front ends."""
        def one(i: int) -> tuple[float, float]:
            got = httpx.get(f"{server.url}/v1/models/{CATEGORY}/threshold", timeout=30).json()["threshold"]
            r = httpx.post(f"{server.url}/v1/inspect/{CATEGORY}", files={"file": (f"{i}.png", png, "image/png")},
                           params={"heatmap": "none"}, timeout=30)
            return got, r.json()["results"][0]["threshold"]
        with concurrent.futures.ThreadPoolExecutor(count) as pool:
            return collections.Counter(t for pair in pool.map(one, range(count)) for t in pair)

    try:
        assert set(thresholds_seen()) == {0.5}  # both front ends serving, the calibrated threshold read
        r = httpx.put(f"{server.url}/v1/models/{CATEGORY}/threshold", json={"threshold": -0.5},
                      headers={"X-API-Key": ADMIN_KEY}, timeout=30)
        assert r.status_code == 200 and r.json()["persisted"] == ["file"], r.text
        wait_until(lambda: set(thresholds_seen()) == {-0.5}, 10, "every front end on the new threshold",
                   interval=0.1)
        r = httpx.delete(f"{server.url}/v1/models/{CATEGORY}/threshold", headers={"X-API-Key": ADMIN_KEY},
                         timeout=30)
        assert r.status_code == 200, r.text
        wait_until(lambda: set(thresholds_seen()) == {0.5}, 10, "every front end back on the calibrated one",
                   interval=0.1)
    finally:
        server.stop()
