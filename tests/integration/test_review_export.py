"""The review export under load (service/api/thread_stream.py), against a real server on a
loopback port: a bounded number of exports at once, the other routes served beside them, and
nothing held once their clients have gone.

The export ran its zip writer in the process's default thread pool and read each chunk with a
second thread of that pool; six exports at once deadlocked the pool (every writer holding a
thread its reader needed), and exports aborted while their reader waited each left a thread
blocked for good, until every route that runs in that pool (the review store, threshold
writes, reloads) hung."""

from __future__ import annotations

import socket
import time
import zipfile
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from io import BytesIO
from pathlib import Path

import httpx
import pytest

from harness import CATEGORY, USER_KEY, Server, assert_error, noise, png_of, start, upload, wait_until

REVIEWER, REVIEWER_KEY = "alice", "reviewer-key-789"
ITEMS = 12  # ~1.7 MB each: an export far larger than the buffers between writer and client
EXPORT = f"/v1/review/{CATEGORY}/export"


@pytest.fixture(scope="module")
def server(model_store: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    root = tmp_path_factory.mktemp("review-export")
    srv = start(model_store, root / "server.log", api_keys=USER_KEY, reviewer_api_keys=f"{REVIEWER}={REVIEWER_KEY}",
                review_store=str(root / "review"), review_audit_rate=1.0, review_max_bytes=256 * 1024 * 1024)
    try:
        from PIL import Image

        with httpx.Client(base_url=srv.url, headers={"X-API-Key": USER_KEY}, timeout=60) as user, \
                httpx.Client(base_url=srv.url, headers={"X-API-Key": REVIEWER_KEY}, timeout=60) as reviewer:
            for i in range(ITEMS):
                image = png_of(Image.fromarray(noise(768, 768, seed=i)))
                assert user.post(f"/v1/inspect/{CATEGORY}?heatmap=none", files=[upload(f"n{i}.png", image)]).is_success
            items = wait_until(  # kept after the answer, off its path
                lambda: page if len(page := reviewer.get(f"/v1/review/{CATEGORY}/items",
                                                         params={"limit": 100}).json()["items"]) == ITEMS else None,
                timeout=20, what="every image kept for review")
            for entry in items:
                r = reviewer.put(f"/v1/review/{CATEGORY}/items/{entry['item']['id']}/label", json={"label": "ok"})
                assert r.is_success, r.text
        yield srv
    finally:
        srv.stop()


def _export_socket(server: Server) -> socket.socket:
    """An export requested over a socket whose small window the client then leaves unread
    (retried while both slots are taken: an export a client left frees its slot once the
    server has seen the connection go)."""
    deadline = time.monotonic() + 10
    while True:
        sock = socket.socket()
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        sock.connect(("127.0.0.1", server.port))
        sock.settimeout(10)
        sock.sendall(f"GET {EXPORT} HTTP/1.1\r\nHost: x\r\nX-API-Key: {REVIEWER_KEY}\r\n\r\n".encode())
        head = sock.recv(1024)
        if head.startswith(b"HTTP/1.1 200 "):
            return sock
        sock.close()
        assert head.startswith(b"HTTP/1.1 503 ") and time.monotonic() < deadline, head[:200]
        time.sleep(0.1)


def _full_export(client: httpx.Client) -> int:
    r = client.get(EXPORT, timeout=60)
    assert r.status_code == 200, r.text[:300]
    with zipfile.ZipFile(BytesIO(r.content)) as z:
        return sum(name.startswith("good/") for name in z.namelist())


def test_exports_past_the_limit_are_503_and_other_routes_serve_beside_them(server: Server) -> None:
    with httpx.Client(base_url=server.url, headers={"X-API-Key": REVIEWER_KEY}, timeout=10) as reviewer:
        held = [_export_socket(server) for _ in range(2)]
        try:
            busy = reviewer.get(EXPORT)
            assert_error(busy, 503, "export_busy")
            assert busy.headers["retry-after"]
            started = time.monotonic()  # the routes that run in the default thread pool
            assert reviewer.get(f"/v1/review/{CATEGORY}/items").status_code == 200
            assert reviewer.get(f"/v1/review/{CATEGORY}/stats").status_code == 200
            assert time.monotonic() - started < 3.0
        finally:
            for sock in held:
                sock.close()
        deadline = time.monotonic() + 10  # the writers see their readers gone within a second
        while (r := reviewer.get(EXPORT, timeout=60)).status_code == 503:
            assert time.monotonic() < deadline, "export slots not given back"
            time.sleep(0.2)
        with zipfile.ZipFile(BytesIO(r.content)) as z:
            assert sum(name.startswith("good/") for name in z.namelist()) == ITEMS


def test_aborted_and_concurrent_exports_leave_nothing_held(server: Server) -> None:
    with httpx.Client(base_url=server.url, headers={"X-API-Key": REVIEWER_KEY}, timeout=10) as reviewer:
        for _ in range(8):  # each read a little, then gone
            _export_socket(server).close()
        def export_until_a_slot_frees() -> list[httpx.Response]:
            # The last aborted writers hold both slots until they notice their client left
            # (within a poll): at first every one of the six may be refused, as it should.
            tries, end = [], time.monotonic() + 10
            while not tries or (tries[-1].status_code == 503 and time.monotonic() < end):
                tries.append(reviewer.get(EXPORT, timeout=60))
                time.sleep(0.2 if tries[-1].status_code == 503 else 0)
            return tries
        with ThreadPoolExecutor(6) as pool:  # six at once deadlocked the default pool before
            answers = [r for tries in pool.map(lambda _: export_until_a_slot_frees(), range(6)) for r in tries]
        assert {r.status_code for r in answers} <= {200, 503} and any(r.status_code == 200 for r in answers)
        for r in answers:
            if r.status_code == 503:
                assert_error(r, 503, "export_busy")
        time.sleep(1.0)  # the aborted writers notice within a poll
        started = time.monotonic()
        assert reviewer.get(f"/v1/review/{CATEGORY}/items").status_code == 200
        assert time.monotonic() - started < 3.0
        assert _full_export(reviewer) == ITEMS


def test_the_key_is_checked_before_the_category(server: Server) -> None:
    """A client without a key learnt which categories the review store holds (401 for those,
    404 for others): the category was resolved before the key."""
    for path in (f"/v1/review/{CATEGORY}/items", "/v1/review/no-such-category/items", "/v1/review/nosuch/export"):
        r = httpx.get(server.url + path)
        assert r.status_code == 401, (path, r.status_code, r.text)
