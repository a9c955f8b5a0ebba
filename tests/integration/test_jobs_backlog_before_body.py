"""A job submission to a full backlog is refused before its body is read: the API read the
whole upload (up to MSFLOW_MAX_REQUEST_BYTES, holding the process's upload byte budget and the
client's bandwidth for it) and only then asked Redis for room, to answer 503
``job_backlog_full``. A real ``msflow serve`` (null engine, no worker) and a real redis-server."""

from __future__ import annotations

import socket
from pathlib import Path

import httpx
import pytest
from PIL import Image

from harness import CATEGORY, PREFIX, RedisServer, fake_version, json_answer, png_of, start

MiB = 1024 * 1024


def _half_sent(port: int, size: int) -> socket.socket:
    """A raw image job of ``size`` bytes declared, its first half sent."""
    sock = socket.create_connection(("127.0.0.1", port), timeout=10)
    sock.sendall(f"POST /v1/jobs/{CATEGORY} HTTP/1.1\r\nHost: x\r\nContent-Type: image/png\r\n"
                 f"Content-Length: {size}\r\n\r\n".encode() + b"\x89PNG" + b"x" * (size // 2 - 4))
    return sock



@pytest.mark.parametrize("full", ["count", "bytes"])
def test_a_job_for_a_full_backlog_is_refused_before_its_body_is_read(tmp_path: Path, private_redis: RedisServer,
                                                                     full: str) -> None:
    """``count``: one job waiting of one; ``bytes``: a raw image whose declared length is more
    than the backlog's bytes have room for."""
    fake_version(tmp_path / "store", CATEGORY)
    limits = {"job_max_backlog": 1} if full == "count" else {"job_max_backlog_bytes": 2 * MiB}
    srv = start(tmp_path / "store", tmp_path / "server.log", engine="null", redis_url=private_redis.url,
                redis_prefix=PREFIX, request_deadline_ms=5000, **limits)
    try:
        image = png_of(Image.new("RGB", (32, 32)))
        first = httpx.post(f"{srv.url}/v1/jobs/{CATEGORY}", files={"file": ("a.png", image, "image/png")}, timeout=10)
        assert first.status_code == 202, first.text  # no worker: it waits, and fills the backlog
        with _half_sent(srv.port, 4 * MiB) as sock:
            sock.settimeout(2.0)  # before: no answer until the body's deadline (408), the rest unsent
            status, body = json_answer(sock)
        assert status == 503 and body["error"]["code"] == "job_backlog_full", body  # type: ignore[index]
    finally:
        srv.stop()
