"""Heatmap links in multi-process mode without Redis, or while it is down: the kernel hands a
link's GET to any front end, and each serves every link of the server (each front end writes
its links as files in its folder of the supervisor's run directory, service/redisq/store.py).
Before, a link lived in the memory of the front end that made it: 8 links answered
``200 404 200 200 404 404 200 404``. A killed front end's files go with it, and a stop leaves
no run directory."""

from __future__ import annotations

import fcntl
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import httpx
import pytest
from PIL import Image

from harness import CATEGORY, RedisServer, children, fake_version, png_of, start, wait_until

MP = dict(api_processes=2, engine="null", store_poll_s=0)


@pytest.fixture
def run_dirs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Where the server's supervisor makes its run directory (TMPDIR, which the server inherits)."""
    folder = tmp_path / "tmp"
    folder.mkdir()
    monkeypatch.setenv("TMPDIR", str(folder))
    return folder


@pytest.fixture
def null_store(tmp_path: Path) -> Path:
    store = tmp_path / "store"
    fake_version(store, CATEGORY)
    return store


def make_links(url: str, count: int) -> list[str]:
    """``count`` links, each made on a connection of its own (spread over the front ends)."""
    image = png_of(Image.new("RGB", (32, 32), (90, 60, 40)))
    links = []
    for _ in range(count):
        answer = httpx.post(f"{url}/v1/inspect/{CATEGORY}", files=[("file", ("a.png", image, "image/png"))],
                            params={"heatmap": "url"}, timeout=30)
        answer.raise_for_status()
        links.append(answer.json()["results"][0]["heatmap"]["url"])
    return links


def statuses(url: str, links: list[str], tries: int = 4) -> list[int]:
    """Each link's GET ``tries`` times, each on a new connection: every front end gets some."""
    return [httpx.get(url + link, timeout=10).status_code for link in links for _ in range(tries)]


def link_id(link: str) -> str:
    return link.rsplit("/", 1)[1].removesuffix(".png")


def test_every_front_end_serves_every_link_and_nothing_is_left_behind(null_store: Path, run_dirs: Path,
                                                                       tmp_path: Path) -> None:
    server = start(null_store, tmp_path / "server.log", **MP)
    try:
        [rundir] = run_dirs.iterdir()
        links = make_links(server.url, 12)
        while len({link_id(link)[:2] for link in links}) < 2:  # both front ends made some (1 in 2^11: not yet)
            links += make_links(server.url, 4)
        assert set(statuses(server.url, links)) == {200}
        by_front = {name: sorted(link_id(link) for link in links if link_id(link).startswith(name))
                    for name in ("00", "01")}
        for name, ids in by_front.items():
            assert sorted(os.listdir(rundir / "links" / name)) == ids
        # A killed front end: its files leave with it (no process bounds them any more), the
        # other's links still answer from every front end, its replacement's too.
        [victim] = [pid for pid, comm in children(server.proc.pid).items() if comm == "msflow-api-0"]
        os.kill(victim, signal.SIGKILL)
        wait_until(lambda: not any((rundir / "links" / "00" / i).exists() for i in by_front["00"]), 15,
                   "the killed front end's links to be removed")
        wait_until(lambda: len([c for c in children(server.proc.pid).values() if c.startswith("msflow-api-")]) == 2
                   and (rundir / "links" / "00").is_dir(), 30, "a replacement front end")
        survivors = [link for link in links if link_id(link).startswith("01")]
        assert set(statuses(server.url, survivors)) == {200}
        wait_until(lambda: any(link_id(link).startswith("00") for link in make_links(server.url, 2)), 30,
                   "a link from the replacement")
        fresh = make_links(server.url, 8)
        assert set(statuses(server.url, fresh)) == {200}
    finally:
        server.stop()
    assert server.proc.returncode == 0
    assert list(run_dirs.iterdir()) == []  # the run directory, links and all


def test_links_made_while_redis_is_down_are_served_by_every_front_end(null_store: Path, tmp_path: Path,
                                                                       private_redis: RedisServer) -> None:
    server = start(null_store, tmp_path / "server.log", **MP, redis_url=private_redis.url, redis_breaker_s=30)
    try:
        durable = make_links(server.url, 2)  # in Redis and in the files
        private_redis.stop()
        links = make_links(server.url, 12)  # the files only
        assert set(statuses(server.url, links + durable)) == {200}
    finally:
        server.stop()


def test_a_start_that_fails_leaves_no_run_directory(null_store: Path, run_dirs: Path) -> None:
    """The port taken by another program: msflow serve exits, and its run directory with it
    (before, one was left in TMPDIR at each failed start)."""
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        env = {**os.environ, "MSFLOW_API_PROCESSES": "2", "MSFLOW_ENGINE": "null"}
        done = subprocess.run([sys.executable, "-m", "msflow.cli", "serve", "--store", str(null_store), "--host",
                               "127.0.0.1", "--port", str(taken.getsockname()[1])],
                              env=env, capture_output=True, text=True, timeout=60)
    assert done.returncode != 0 and "Address already in use" in done.stderr, done.stderr[-2000:]
    assert list(run_dirs.iterdir()) == []


def test_a_second_server_on_a_served_port_is_refused(null_store: Path, run_dirs: Path, tmp_path: Path) -> None:
    """SO_REUSEPORT let a second multi-process msflow serve bind the port of one still running
    (an old deployment that survived its stop): it started, and the kernel split connections
    between the two servers. It now exits, and the first one keeps the port alone."""
    first = start(null_store, tmp_path / "first.log", **MP)
    try:
        port = first.url.rsplit(":", 1)[1]
        env = {**os.environ, "MSFLOW_API_PROCESSES": "2", "MSFLOW_ENGINE": "null", "MSFLOW_STORE_POLL_S": "0"}
        second = subprocess.run([sys.executable, "-m", "msflow.cli", "serve", "--store", str(null_store), "--host",
                                 "127.0.0.1", "--port", port], env=env, capture_output=True, text=True, timeout=60)
        assert second.returncode != 0 and "Address already in use" in second.stderr, second.stderr[-2000:]
        assert httpx.get(f"{first.url}/readyz", timeout=10).status_code == 200
    finally:
        first.stop()


def test_the_next_start_removes_what_a_killed_supervisor_left(null_store: Path, run_dirs: Path,
                                                               tmp_path: Path) -> None:
    """SIGKILL to the supervisor (a container OOM-killed whole: Kubernetes keeps /tmp's emptyDir
    for the restarted container) leaves its run directory, links and all; the next msflow serve
    in that TMPDIR removes it, and leaves a live server's alone (held by its lock)."""
    killed = start(null_store, tmp_path / "killed.log", **MP)
    [left] = run_dirs.iterdir()
    make_links(killed.url, 4)
    kids = children(killed.proc.pid)
    killed.proc.kill()
    killed.stop()
    wait_until(lambda: not any(Path(f"/proc/{pid}").exists() for pid in kids), 30, "the children to exit")
    assert any((left / "links").rglob("0*"))  # nothing removed it
    live = run_dirs / "msflow-serve-live"
    live.mkdir()
    with open(live / "lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        server = start(null_store, tmp_path / "server.log", **MP)
        try:
            assert not left.exists() and live.exists()
            assert "the run directory of an msflow serve that was killed" in server.log()
        finally:
            server.stop()
    assert list(run_dirs.iterdir()) == [live]
