"""A ``redis-server`` of the benchmark's own, for drills and benchmarks that need real Redis."""

from __future__ import annotations

import subprocess
import time
from pathlib import Path

import redis

from loadtests.run import free_port


class RedisProc:
    """A ``redis-server`` of its own: loopback, a free port, nothing on disk (``workdir``
    holds its log); stopped on exit."""

    def __init__(self, workdir: Path) -> None:
        self.port = free_port()
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self.proc = subprocess.Popen(
            ["redis-server", "--port", str(self.port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
             "--dir", str(workdir), "--enable-debug-command", "local"],
            stdout=open(workdir / "redis.log", "wb"), stderr=subprocess.STDOUT)
        end = time.monotonic() + 10
        while time.monotonic() < end:
            try:
                if self.client().ping():
                    return
            except redis.ConnectionError:
                time.sleep(0.05)
        raise RuntimeError("redis-server did not start")

    def client(self, timeout: float = 5.0) -> redis.Redis:
        return redis.Redis(host="127.0.0.1", port=self.port, socket_timeout=timeout)

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(10)

    def __enter__(self) -> "RedisProc":
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()
