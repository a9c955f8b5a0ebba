"""``msflow serve`` with two front ends feeding one engine process, end to end over real HTTP,
one server shared by the module's tests (in this order: the last kills its processes):
batches that fill from every front end, metrics added up over the processes, connections
spread over the front ends, a reload that reaches every front end, a request of mixed images
over a batch and hostile uploads answered as in one process, and kills of a front end and of
the engine process that leave no shared memory behind.
"""

from __future__ import annotations

import collections
import os
import signal
import socket
import struct
import threading
import time
import zlib
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from PIL import Image

from harness import ADMIN_KEY, CATEGORY, Server, assert_error, children, metric, part, png_of, start, wait_until
from loadtests.run import listens, sockets_held
from multiprocess_fixtures import MP, post_many, store_with_version_2


def memfds(pid: int) -> set[str]:
    """The shared-memory slabs ``pid`` maps (``/memfd:msflow-<owner pid>-<category>-<size>``)."""
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


@pytest.fixture(scope="module")
def mp_store(model_store: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return store_with_version_2(model_store, tmp_path_factory.mktemp("mp"))


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


def claims_50000_squared(png: bytes) -> bytes:
    """``png`` with its header patched to claim 50000 x 50000 pixels (a decompression bomb)."""
    ihdr = png.index(b"IHDR")
    fields = struct.pack(">II", 50_000, 50_000) + png[ihdr + 12: ihdr + 17]
    return png[: ihdr + 4] + fields + struct.pack(">I", zlib.crc32(b"IHDR" + fields) & 0xFFFFFFFF) + png[ihdr + 21:]


def test_a_request_of_mixed_images_over_a_batch_and_hostile_uploads_answer_as_in_one_process(
        mp_server: Server, good_images: list[Path]) -> None:
    """Ten images of five sizes, PNG and JPEG, in one request over a batch of 8: each through
    its own slot and back to its own index, its score the one it gets alone (a slot or index
    mix-up between the front end and the engine process would swap them). Hostile uploads get
    the front end's refusals (the decode is there): damaged 422 naming the image, a text 415,
    a header claiming 2.5 G pixels 413, and the server serves after."""
    uploads = []
    for i, path in enumerate(good_images[:5] * 2):
        image = Image.open(path).convert("RGB").resize([(256, 256), (300, 200), (123, 457), (64, 64), (900, 700)][i % 5])
        fmt = "PNG" if i % 2 else "JPEG"
        uploads.append(("file", (f"{i}.{fmt.lower()}", png_of(image, fmt), f"image/{fmt.lower()}")))
    url = f"{mp_server.url}/v1/inspect/{CATEGORY}"
    together = httpx.post(url, files=uploads, params={"heatmap": "none"}, timeout=60)
    assert together.status_code == 200, together.text
    results = together.json()["results"]
    assert [(r["index"], r["filename"]) for r in results] == [(i, u[1][0]) for i, u in enumerate(uploads)]
    assert max(r["batch_size"] for r in results) <= 8
    alone = [httpx.post(url, files=[u], params={"heatmap": "none"}, timeout=60).json()["results"][0]["raw_score"]
             for u in uploads]
    assert [r["raw_score"] for r in results] == pytest.approx(alone, rel=1e-5)

    good = good_images[0].read_bytes()
    err = assert_error(httpx.post(url, files=[part(good_images[0]), ("file", ("t.png", good[: len(good) // 2],
                                                                                "image/png"))], timeout=30),
                       422, "undecodable_image")
    assert err["details"]["index"] == 1
    assert_error(httpx.post(url, files=[("file", ("a.txt", b"just text", "text/plain"))], timeout=30), 415,
                 "unsupported_media_type")
    assert_error(httpx.post(url, content=claims_50000_squared(png_of(Image.new("L", (1, 1)))),
                            headers={"Content-Type": "image/png"}, timeout=30), 413, "image_too_large")
    assert httpx.post(url, files=[part(good_images[0])], timeout=30).status_code == 200


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
