"""A ``redis-server`` of a drill's own (loopback, a free port, nothing on disk), for the
benchmarks and drills that need real Redis; the tests' harness uses the same one."""

from __future__ import annotations

import subprocess
import time
from pathlib import Path

import redis

from loadtests.run import free_port


class RedisProc:
    """Started on construction; ``stop`` and ``start`` again on the same port simulate an
    outage. ``workdir`` holds its log."""

    def __init__(self, workdir: Path) -> None:
        self.port = free_port()
        self.workdir = workdir
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self.proc: subprocess.Popen[bytes] | None = None
        self.start()

    def start(self) -> None:
        with open(self.workdir / "redis.log", "ab") as log:
            self.proc = subprocess.Popen(
                ["redis-server", "--port", str(self.port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
                 "--dir", str(self.workdir), "--enable-debug-command", "local"], stdout=log, stderr=subprocess.STDOUT)
        end = time.monotonic() + 10
        while time.monotonic() < end:
            try:
                if self.client().ping():
                    return
            except redis.ConnectionError:
                time.sleep(0.05)
        raise RuntimeError(f"redis-server on {self.port} did not start:\n{(self.workdir / 'redis.log').read_text()}")

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        self.proc = None

    def client(self, timeout: float = 5.0) -> redis.Redis:
        return redis.Redis(host="127.0.0.1", port=self.port, socket_timeout=timeout)

    def __enter__(self) -> "RedisProc":
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()
