"""The bytes of the uploads a server process reads at once have a budget
(``MSFLOW_MAX_INFLIGHT_UPLOAD_BYTES``, service/api/body_limits.py): they are held before any
image is priced in pixels, and without it 40 clients each sending a 20 MB image grew the
server by 760 MB (1,024 connections at the defaults: 20 GB). A real ``msflow serve`` (null
engine, hand-written version) and raw sockets."""

from __future__ import annotations

import socket
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from PIL import Image

from harness import CATEGORY, USER_KEY, Server, fake_version, json_answer, metric, png_of, start, wait_until

MiB = 1024 * 1024
BUDGET = 4 * MiB


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    root = tmp_path_factory.mktemp("upload-bytes")
    fake_version(root / "store", CATEGORY)
    srv = start(root / "store", root / "server.log", engine="null", api_keys=USER_KEY, max_request_bytes=3 * MiB,
                max_upload_bytes=3 * MiB, max_inflight_upload_bytes=BUDGET)
    yield srv
    srv.stop()


def _upload_started(server: Server, size: int, chunked: bool = False) -> socket.socket:
    """A raw image upload of ``size`` bytes with its first half sent."""
    sock = socket.create_connection(("127.0.0.1", server.port), timeout=10)
    length = b"Transfer-Encoding: chunked\r\n" if chunked else b"Content-Length: %d\r\n" % size
    half = b"\x89PNG" + b"x" * (size // 2 - 4)
    sock.sendall(f"POST /v1/inspect/{CATEGORY} HTTP/1.1\r\nHost: x\r\nX-API-Key: {USER_KEY}\r\n"
                 "Content-Type: image/png\r\n".encode() + length + b"\r\n" +
                 (b"%x\r\n%s\r\n" % (len(half), half) if chunked else half))
    return sock



def test_uploads_past_the_process_budget_are_503_before_their_bytes_are_read(server: Server) -> None:
    held = [_upload_started(server, 3 * MiB // 2) for _ in range(2)]  # 3 MiB declared of the 4
    try:
        with _upload_started(server, 3 * MiB // 2) as third:  # declared: refused before a byte is read
            status, body = json_answer(third)
            assert (status, body["error"]["code"]) == (503, "server_busy"), body
        with _upload_started(server, 2 * MiB, chunked=True) as chunked:  # undeclared: counted as it comes
            chunked.sendall(b"%x\r\n%s\r\n" % (MiB, b"y" * MiB))
            status, body = json_answer(chunked)
            assert (status, body["error"]["code"]) == (503, "server_busy"), body
    finally:
        for sock in held:
            sock.close()
    # The budget comes back with the answers (and with clients gone): a whole image is served.
    image = png_of(Image.new("RGB", (32, 32)))
    with httpx.Client(base_url=server.url, headers={"X-API-Key": USER_KEY}, timeout=10) as client:
        for _ in range(3):
            answer = client.post(f"/v1/inspect/{CATEGORY}", files={"file": ("a.png", image, "image/png")})
            assert answer.status_code == 200, answer.text
        with _upload_started(server, 3 * MiB) as whole:
            whole.sendall(b"x" * (3 * MiB - 3 * MiB // 2))
            status, body = json_answer(whole)
            assert status != 503, body  # the largest request still runs on an idle server (not an image: 4xx)


@pytest.mark.parametrize("processes", [1, 2], ids=["one-process", "front-ends"])
def test_the_upload_budget_s_fill_and_refusals_are_on_metrics(tmp_path: Path, processes: int) -> None:
    """``msflow_upload_bytes{kind=held|budget}`` (summed over front ends, as the budget is per
    process) and ``msflow_rejections_total{reason=upload_bytes}``: the budget refused requests
    with nothing on /metrics to say how full it was or how often it refused. Three uploads of
    3 MiB declared against 4 MiB a process: each process holds one at most, so at least one
    of the three is refused however the kernel spreads them over the front ends."""
    fake_version(tmp_path / "store", CATEGORY)
    srv = start(tmp_path / "store", tmp_path / "server.log", engine="null", api_keys=USER_KEY,
                max_request_bytes=3 * MiB, max_upload_bytes=3 * MiB, max_inflight_upload_bytes=BUDGET,
                api_processes=processes)
    client = httpx.Client(base_url=srv.url, timeout=10)

    def upload_bytes(kind: str) -> float:
        return metric(client, "msflow_upload_bytes", kind=kind)

    def refused() -> float:
        return metric(client, "msflow_rejections_total", category=CATEGORY, reason="upload_bytes")
    held: list[socket.socket] = []
    try:
        assert upload_bytes("budget") == processes * BUDGET and upload_bytes("held") == 0
        answered = 0
        for _ in range(3):
            sock = _upload_started(srv, 3 * MiB)
            sock.settimeout(2.0)
            try:
                status, body = json_answer(sock)  # refused at once, before its bytes are read
            except TimeoutError:
                held.append(sock)  # being read: its declared bytes are held
                continue
            assert (status, body["error"]["code"]) == (503, "server_busy"), body
            answered += 1
            sock.close()
        assert answered >= 1 and len(held) <= processes
        wait_until(lambda: upload_bytes("held") == len(held) * 3 * MiB, 10, "the held uploads' bytes on /metrics")
        wait_until(lambda: refused() == answered, 10, "the refusals counted")
        for sock in held:
            sock.close()
        wait_until(lambda: upload_bytes("held") == 0, 10, "the bytes given back once the clients left")
        assert upload_bytes("budget") == processes * BUDGET
    finally:
        for sock in held:
            sock.close()
        client.close()
        srv.stop()
