"""The test harness, one module for every integration test: ports, ``msflow serve`` and
``msflow worker`` subprocesses, private ``redis-server`` processes, and the small helpers
(metrics, uploads, error shape) the tests share. Test modules import this, never each other.

Every Redis here is a private ``redis-server`` on a free loopback port, without persistence,
in a temporary folder, stopped by its fixture: the machine's own Redis is never touched.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import random
import shutil
import signal
import socket
import struct
import subprocess
import sys
import asyncio
import time
import zlib
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
import redis
from PIL import Image
from PIL.PngImagePlugin import PngInfo
from prometheus_client.parser import text_string_to_metric_families

from loadtests.redis_proc import RedisProc
from loadtests.run import listens

PNG_IHDR_END = 8 + 25  # a PNG's signature, then its IHDR chunk: length, type, 13 bytes, CRC


def noise(w: int, h: int, seed: int = 0) -> np.ndarray:
    """Random RGB pixels ``[h, w, 3]``: PNGs of them are incompressible, every row filter in play."""
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


def png_chunk(kind: bytes, data: bytes) -> bytes:
    """One PNG chunk, written here independently of the service's own writer."""
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)


def jpeg_segment(marker: int, payload: bytes = b"") -> bytes:
    """One JPEG marker segment: 0xFF, the marker, the length (which counts itself), the payload."""
    return bytes([0xFF, marker]) + struct.pack(">H", len(payload) + 2) + payload


def damaged(data: bytes, rng: random.Random, edits: int, longest: int, start: int = 0) -> bytes:
    """``data`` with ``edits`` random edits at or after ``start``, as a bad line, disk or
    attacker would make them: a byte changed (60%), a run of up to ``longest`` bytes cut
    (20%) or random bytes inserted (20%)."""
    out = bytearray(data)
    for _ in range(edits):
        if len(out) <= start:  # cut to nothing: no byte left to edit
            break
        at, roll = rng.randrange(start, len(out)), rng.random()
        if roll < 0.6:
            out[at] = rng.randrange(256)
        elif roll < 0.8:
            del out[at:at + rng.randint(1, longest)]
        else:
            out[at:at] = rng.randbytes(rng.randint(1, longest))
    return bytes(out)


USER_KEY = "user-key-123"
ADMIN_KEY = "admin-key-456"
CATEGORY = "brick"


@contextlib.contextmanager
def engine_run_replaced(engine: Any, make_run: Callable[[Callable[..., Any]], Callable[..., Any]]) -> Iterator[None]:
    """Replace a real loaded engine's ``run`` with ``make_run(real_run)`` for the block (a
    device failure, a NaN output), and put the real one back whatever happens."""
    real_run = engine.run
    engine.run = make_run(real_run)
    try:
        yield
    finally:
        engine.run = real_run


def failing_run(message: str) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """For :func:`engine_run_replaced`: every batch raises ``RuntimeError(message)``."""
    def make(real_run: Callable[..., Any]) -> Callable[..., Any]:
        def run(batch: Any) -> Any:
            raise RuntimeError(message)
        return run
    return make


def missing(reason: str, allow_module_level: bool = False) -> None:
    """Skip for a missing tool (redis-server, Chromium), except under CI (``CI=true``), where
    it fails: CI installs them (``.ci/run``), so a skip there would hide a broken setup."""
    if os.environ.get("CI", "").lower() in ("1", "true", "yes"):
        pytest.fail(f"{reason} (CI=true: required)", pytrace=False)
    pytest.skip(reason, allow_module_level=allow_module_level)


def children(pid: int) -> dict[int, str]:
    """Live child processes of ``pid``: pid -> name (``msflow-api-<i>``, ``msflow-engine``)."""
    out: dict[int, str] = {}
    for task in Path(f"/proc/{pid}/task").iterdir():
        for child in (task / "children").read_text().split():
            with contextlib.suppress(OSError):
                out[int(child)] = Path(f"/proc/{child}/comm").read_text().strip()
    return out


# ---------------------------------------------------------------------- server harness
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """`python -m msflow.cli serve` with MSFLOW_* settings; always stopped by its fixture."""

    def __init__(self, store: Path, log_path: Path, **settings: Any) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = log_path
        self.api_processes = int(settings.get("api_processes", 1))
        env = {k: v for k, v in os.environ.items() if not k.startswith("MSFLOW_")}
        env.update({"MSFLOW_ACCESS_LOG": "false", "MSFLOW_LOG_LEVEL": "warning", "MSFLOW_DECODE_THREADS": "2",
                    "MSFLOW_INTRA_OP_THREADS": "1", "MSFLOW_DEVICE": "cpu"})
        env.update({f"MSFLOW_{k.upper()}": v if isinstance(v, str) else json.dumps(v) for k, v in settings.items()})
        self._log = open(log_path, "wb")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "msflow.cli", "serve", "--host", "127.0.0.1", "--port", str(self.port),
             "--store", str(store)], env=env, stdout=self._log, stderr=subprocess.STDOUT)

    def wait_ready(self, timeout: float = 60.0) -> None:
        """``/readyz`` 200, and with front ends, every one of them on the port: /readyz is one
        front end's answer, and a front end joins the port only once it serves. A test that
        went on after the first one's answer changed the store under the second one's start
        (it then never knew a category the test removed, or answered 503 while loading it)."""
        end = time.monotonic() + timeout
        self._wait_for("/readyz", "ready", timeout)
        while self.api_processes > 1 and len(self.front_ends_listening()) < self.api_processes:
            if time.monotonic() > end or self.proc.poll() is not None:
                raise RuntimeError(f"{len(self.front_ends_listening())} of {self.api_processes} front ends "
                                   f"listening after {timeout} s:\n{self.log()}")
            time.sleep(0.05)

    def front_ends_listening(self) -> list[int]:
        """The front ends (``msflow-api-<i>``) that accept connections on the server's port."""
        return [pid for pid, name in children(self.proc.pid).items()
                if name.startswith("msflow-api-") and listens(pid, self.port)]

    def wait_alive(self, timeout: float = 60.0) -> None:
        """Up and answering, whether or not a model is loaded (an empty store being built)."""
        self._wait_for("/healthz", "alive", timeout)

    def _wait_for(self, path: str, what: str, timeout: float) -> None:
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited with {self.proc.returncode}:\n{self.log()}")
            try:
                if httpx.get(f"{self.url}{path}", timeout=1.0).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            time.sleep(0.1)
        raise RuntimeError(f"server not {what} after {timeout} s:\n{self.log()}")

    def log(self) -> str:
        self._log.flush()
        return self.log_path.read_text(errors="replace")[-4000:]

    def stop(self) -> None:
        terminate(self.proc)
        self._log.close()


def terminate(proc: subprocess.Popen[bytes], grace_s: float = 15.0) -> None:
    """SIGTERM (the graceful path under test), SIGKILL if it does not exit in time."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(grace_s)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)


def start(store: Path, log_path: Path, **settings: Any) -> Server:
    server = Server(store, log_path, **settings)
    try:
        server.wait_ready()
    except BaseException:
        server.stop()
        raise
    return server


def absolute(client: httpx.Client, path: str) -> str:
    return str(client.base_url).rstrip("/") + path


def metric(client: httpx.Client, name: str, **labels: str) -> float:
    """Sum of the samples of ``name`` whose labels include ``labels``."""
    text = httpx.get(absolute(client, "/metrics")).text
    total = 0.0
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items()):
                total += sample.value
    return total


def part(path: Path) -> tuple[str, tuple[str, bytes, str]]:
    return ("file", (path.name, path.read_bytes(), "image/png"))


def png_of(img: Image.Image, fmt: str = "PNG", **params: Any) -> bytes:
    """``img`` encoded by Pillow (``fmt`` and its save ``params``: any format, despite the name)."""
    buf = io.BytesIO()
    img.save(buf, format=fmt, **params)
    return buf.getvalue()


def assert_error(r: httpx.Response, status: int, code: str) -> dict[str, Any]:
    assert r.status_code == status, r.text
    body = r.json()
    assert set(body) == {"error"} and body["error"]["code"] == code and body["error"]["message"], body
    return body["error"]


# ---------------------------------------------------------------------- happy paths


def json_answer(sock: socket.socket) -> tuple[int, Any]:
    """The status and JSON body of the one HTTP answer on a raw socket (a test that sent its
    request by hand, part of a body say), read up to its Content-Length."""
    data = b""
    while b"\r\n\r\n" not in data and (chunk := sock.recv(65536)):
        data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    length = int(next(line.split(b":")[1] for line in head.lower().split(b"\r\n") if line.startswith(b"content-length:")))
    while len(body) < length and (chunk := sock.recv(65536)):
        body += chunk
    return int(head.split()[1]), json.loads(body)


def wait_for_metric(client: httpx.Client, name: str, value: float, timeout: float = 10.0, **labels: str) -> None:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if metric(client, name, **labels) >= value:
            return
        time.sleep(0.02)
    raise AssertionError(f"{name}{labels} never reached {value}")


# ---------------------------------------------------------------------- Redis and workers
PREFIX = "msflow-test:"  # a non-default MSFLOW_REDIS_PREFIX, shared by the API servers and workers
REDIS_ADMIN_KEY = "admin-key-redis"
REDIS_USER_KEY = "user-key-redis"


class RedisServer(RedisProc):
    """A private redis-server (loadtests/redis_proc.py); ``stop``/``start`` again on the same
    port simulate an outage."""

    def __init__(self, workdir: Path) -> None:
        if shutil.which("redis-server") is None:
            missing("redis-server is not installed: run scripts/install-redis.sh")
        super().__init__(workdir)

    def client(self, timeout: float = 2.0) -> redis.Redis:
        return super().client(timeout)


class WorkerProc:
    """``python -m msflow.cli worker`` with MSFLOW_* settings."""

    def __init__(self, store: Path, log_path: Path, name: str, env: dict[str, str] | None = None,
                 **settings: Any) -> None:
        self.name = name
        self.log_path = log_path
        self.settings = settings
        full = {k: v for k, v in os.environ.items() if not k.startswith("MSFLOW_")}
        full.update({"MSFLOW_LOG_LEVEL": "info", "MSFLOW_DEVICE": "cpu", "MSFLOW_INTRA_OP_THREADS": "1",
                     "MSFLOW_DECODE_THREADS": "2"})
        full.update({f"MSFLOW_{k.upper()}": str(v) for k, v in settings.items()})
        full.update(env or {})
        self._log = open(log_path, "wb")
        self.proc = subprocess.Popen([sys.executable, "-m", "msflow.cli", "worker", "--store", str(store),
                                      "--name", name], env=full, stdout=self._log, stderr=subprocess.STDOUT)

    def log(self) -> str:
        self._log.flush()
        return self.log_path.read_text(errors="replace")[-4000:]

    def wait_ready(self, timeout: float = 60.0) -> None:
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            if self.proc.poll() is not None:
                raise RuntimeError(f"worker {self.name} exited with {self.proc.returncode}:\n{self.log()}")
            if "consuming" in self.log():
                return
            time.sleep(0.1)
        raise RuntimeError(f"worker {self.name} not consuming after {timeout} s:\n{self.log()}")

    def stop(self) -> None:
        terminate(self.proc)
        self._log.close()


def start_servers(specs: dict[str, tuple[Path, Path, dict[str, Any]]]) -> dict[str, Server]:
    """Launch several API servers at once, then wait for all (start-up overlaps)."""
    servers: dict[str, Server] = {}
    try:
        for name, (store, log_path, settings) in specs.items():
            servers[name] = Server(store, log_path, **settings)
        for server in servers.values():
            server.wait_ready()
    except BaseException:
        for server in servers.values():
            server.stop()
        raise
    return servers


def wait_until(predicate: Callable[[], Any], timeout: float, what: str, interval: float = 0.05) -> Any:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout} s waiting for {what}")


async def until(predicate: Callable[[], Any], what: str = "the condition", timeout: float = 10.0,
                interval: float = 0.01) -> None:
    """:func:`wait_until` for a test running on an event loop: polls without blocking it."""
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, f"timed out after {timeout} s waiting for {what}"
        await asyncio.sleep(interval)


def copy_version(src: Path, dst: Path, category: str, version: str) -> None:
    """A model version folder copied as ``category/version`` (manifest rewritten to match),
    export-like: written under a dot name, renamed into place when complete."""
    from models.manifest import Manifest

    staging = dst.parent / f".{version}-partial"
    shutil.copytree(src, staging)
    Manifest.read(staging).model_copy(update={"category": category, "version": version}).write(staging)
    staging.rename(dst)


def fake_version(store: Path, category: str, version: str = "1", size: int = 32) -> Path:
    """A version folder with a hand-written manifest and no model: for a test engine
    (``engine="null"``, or a factory of its own), where no trained model is needed."""
    from datetime import datetime, timezone

    from models.manifest import Calibration, Manifest, OnnxInfo, ScoreStats, TensorSpec

    stats = ScoreStats(count=10, mean=0.0, std=1.0, min=-1.0, p50=0.0, p95=1.0, p99=1.5, max=2.0)
    calibration = Calibration(score_output="score", method="target_fpr", threshold=0.5, score_min=-1.0,
                              score_max=2.0, normal_scores=stats, map_low=0.0, map_high=1.0, pixel_threshold=0.5)
    folder = store / category / version
    folder.mkdir(parents=True)
    Manifest(category=category, version=version, created_at=datetime.now(timezone.utc), input_size=size,
             backbone="none", model={}, inputs=[TensorSpec(name="images", dtype="uint8",
                                                           shape=["batch", size, size, 3])],
             outputs=[TensorSpec(name="score", dtype="float32", shape=["batch"])], calibration=calibration,
             onnx=OnnxInfo(opset=17, exporter="none", torch_version="none", onnx_version="none",
                           parity_max_abs_diff={}), files={}).write(folder)
    return folder


def serves(registry: Any, category: str = "aaa") -> tuple[str, bool]:
    """The version a :class:`~service.pipeline.registry.ModelRegistry` serves for ``category``,
    and whether an operator's pin holds it."""
    model = registry.get(category)
    return model.version, registry.pinned(category, model)


def png_variant(path: Path, nonce: str) -> bytes:
    """The same pixels with a text chunk: other bytes (another cache key), the same scores."""
    info = PngInfo()
    info.add_text("nonce", nonce)
    buf = io.BytesIO()
    Image.open(path).save(buf, format="PNG", pnginfo=info)
    return buf.getvalue()


def upload(name: str, data: bytes) -> tuple[str, tuple[str, bytes, str]]:
    return ("file", (name, data, "image/png"))


def client_for(server: Server, key: str | None = None, timeout: float = 30.0) -> httpx.Client:
    return httpx.Client(base_url=server.url, headers={"X-API-Key": key} if key else {}, timeout=timeout)


@contextlib.contextmanager
def served(store: Path, log_path: Path, **settings: Any) -> Iterator[Server]:
    """A started server (:func:`start`), stopped afterwards: a fixture's whole life of one."""
    server = start(store, log_path, **settings)
    try:
        yield server
    finally:
        server.stop()


def store_copy(model_store: Path, parent: Path) -> Path:
    """A private copy of the model store, ``parent/store``: for tests that write to it (a
    version added, a threshold override beside a manifest)."""
    dest = parent / "store"
    shutil.copytree(model_store, dest)
    return dest


async def loop_gaps_during(work: Callable[[], Any]) -> tuple[Any, list[float]]:
    """``await work()`` while a ticker measures how long the event loop stood still (gaps between its 10 ms turns)."""
    gaps: list[float] = []
    stop = asyncio.Event()

    async def tick() -> None:  # what a request in flight needs: the loop turning
        last = time.monotonic()
        while not stop.is_set():
            await asyncio.sleep(0.01)
            now = time.monotonic()
            gaps.append(now - last)
            last = now
    ticker = asyncio.create_task(tick())
    await asyncio.sleep(0.05)  # the ticker is turning before the work starts
    try:
        return await work(), gaps
    finally:
        stop.set()
        await ticker
