"""Large answers hold their request's pixels until the client has taken them
(service/api/held_answer.py), against a real server and a raw socket that reads nothing yet."""

from __future__ import annotations

import io
import socket
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import pytest
from PIL import Image

from harness import Server, assert_error, fake_version, metric, served, wait_until

CATEGORY = "aaa"


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    store = tmp_path_factory.mktemp("store")
    fake_version(store, CATEGORY)
    # 20 megapixels in flight: one request below (about 12.6 MP) fits, two do not
    with served(store, tmp_path_factory.mktemp("logs") / "held.log", engine="null", max_inflight_megapixels=20,
                max_request_megapixels=20, request_deadline_ms=20_000, store_poll_s=0) as srv:
        yield srv


def noise_jpeg() -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (2048, 2048, 3), dtype=np.uint8)).save(
        buf, "JPEG", quality=5)
    return buf.getvalue()  # ~270 KB; its original-size overlay answers ~5 MB of PNG or more


def request_bytes(jpeg: bytes, accept: str) -> bytes:
    body = (b'--zz\r\nContent-Disposition: form-data; name="file"; filename="noise.jpg"\r\n'
            b"Content-Type: image/jpeg\r\n\r\n" + jpeg + b"\r\n--zz--\r\n")
    return (b"POST /v1/inspect/%s?overlay=true&heatmap_size=original HTTP/1.1\r\nHost: x\r\nAccept: %s\r\n"
            b"content-type: multipart/form-data; boundary=zz\r\ncontent-length: %d\r\n\r\n"
            % (CATEGORY.encode(), accept.encode(), len(body)) + body)


def in_flight(client: httpx.Client) -> float:
    return metric(client, "msflow_pixels_in_flight")


@pytest.mark.parametrize("accept", ["application/json", "image/png"])
def test_an_answer_its_client_has_not_taken_keeps_its_pixels_admitted(server: Server, accept: str) -> None:
    """A client reading slowly kept its connection, and the whole answer sat in the server's
    buffer: its pixels went back as soon as it was built. Eight such clients held a gigabyte
    past the budget (90 MB answers), and the empty budget admitted as much again. Now the
    answer's pixels stay admitted, and another request is 503 server_busy, until it is taken."""
    jpeg = noise_jpeg()
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)  # a window a few KB fill
    sock.connect(("127.0.0.1", server.port))
    sock.settimeout(15)
    with sock, httpx.Client(base_url=server.url, timeout=30) as client:
        sock.sendall(request_bytes(jpeg, accept))
        head = sock.recv(12)  # the answer is built and going out; the client takes no more yet
        assert head == b"HTTP/1.1 200", head
        time.sleep(0.5)
        held = in_flight(client)
        assert held >= 12e6, f"{held} pixels admitted while the answer waits for its client"
        second = client.post(f"/v1/inspect/{CATEGORY}", params={"overlay": "true", "heatmap_size": "original"},
                             files=[("file", ("n.jpg", jpeg, "image/jpeg"))])
        assert_error(second, 503, "server_busy")
        assert second.headers.get("retry-after")
        assert len(_rest_of_answer(sock, head)) > 5_000_000
        wait_until(lambda: in_flight(client) == 0, 10, "the pixels given back once the answer is taken")
        assert client.post(f"/v1/inspect/{CATEGORY}", params={"overlay": "true", "heatmap_size": "original"},
                           files=[("file", ("n.jpg", jpeg, "image/jpeg"))]).status_code == 200


def test_a_client_gone_before_its_answer_gives_its_pixels_back(server: Server) -> None:
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.connect(("127.0.0.1", server.port))
    sock.settimeout(15)
    with httpx.Client(base_url=server.url, timeout=30) as client:
        sock.sendall(request_bytes(noise_jpeg(), "application/json"))
        assert sock.recv(12) == b"HTTP/1.1 200"
        sock.close()
        wait_until(lambda: in_flight(client) == 0, 10, "the pixels given back once the client is gone")
        small = client.post(f"/v1/inspect/{CATEGORY}", files=[("file", ("s.png", _png(), "image/png"))])
        assert small.status_code == 200 and in_flight(client) == 0


def _rest_of_answer(sock: socket.socket, data: bytes) -> bytes:
    """The body of the answer whose first bytes are ``data``, read to its Content-Length."""
    while b"\r\n\r\n" not in data:
        data += sock.recv(65536) or pytest.fail("closed before the headers' end")
    head, _, body = data.partition(b"\r\n\r\n")
    length = next(int(line.split(b":")[1]) for line in head.lower().split(b"\r\n")
                  if line.startswith(b"content-length:"))
    while len(body) < length:
        body += sock.recv(1 << 20) or pytest.fail(f"closed after {len(body)} of {length} bytes")
    return body


def _png() -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (64, 64), (90, 60, 40)).save(buf, "PNG")
    return buf.getvalue()
