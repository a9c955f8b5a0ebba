"""``msflow serve`` with two front ends at its limits, over real HTTP, each test on a server of
its own: 413/503/504 answers when the slots or the deadline run out, and a graceful drain of
the requests in flight on SIGTERM before every process stops.
"""

from __future__ import annotations

import concurrent.futures
import signal
import threading
import time
from pathlib import Path

import httpx
import pytest

from harness import CATEGORY, assert_error, children, metric, part, start, wait_until
from multiprocess_fixtures import MP, post_many, store_with_version_2


@pytest.fixture(scope="module")
def mp_store(model_store: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return store_with_version_2(model_store, tmp_path_factory.mktemp("mp"))


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
