"""No answer of this origin may be framed or sniffed (service/api/security_headers.py), errors
included: also those made outside that middleware, the connection layer's refusals (before the
app sees a request) and Starlette's last-resort 500 (outside every middleware of ours). A real
``msflow serve`` (null engine, hand-written version), and the app in process for the 500."""

from __future__ import annotations

import asyncio
import socket
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from fastapi import FastAPI

from harness import ADMIN_KEY, CATEGORY, USER_KEY, Server, fake_version, start

MAX_HEADER_BYTES = 8 * 1024
EVERY_ANSWER = {"x-frame-options": "DENY", "x-content-type-options": "nosniff"}


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    root = tmp_path_factory.mktemp("security-headers")
    fake_version(root / "store", CATEGORY)
    srv = start(root / "store", root / "server.log", engine="null", api_keys=USER_KEY, admin_api_keys=ADMIN_KEY,
                max_header_bytes=MAX_HEADER_BYTES)
    yield srv
    srv.stop()


def raw_answer(server: Server, request: bytes) -> tuple[int, dict[str, str]]:
    """Status and headers (names lower case) of the one answer to ``request``, sent as bytes."""
    with socket.create_connection(("127.0.0.1", server.port), timeout=10) as sock:
        sock.sendall(request)
        answer = b""
        while b"\r\n\r\n" not in answer and (chunk := sock.recv(65536)):
            answer += chunk
    head = answer.partition(b"\r\n\r\n")[0].decode("latin-1").split("\r\n")
    headers = dict(line.split(": ", 1) for line in head[1:])
    return int(head[0].split()[1]), {name.lower(): value for name, value in headers.items()}


def test_the_app_s_error_answers_carry_them(server: Server) -> None:
    with httpx.Client(base_url=server.url, timeout=10) as client:
        for answer in (client.get("/nowhere"), client.delete("/healthz"), client.get("/v1/models"),
                       client.get("/static/index.html"), client.put(f"/v1/models/{CATEGORY}/threshold",
                                                                     headers={"X-API-Key": ADMIN_KEY}, content=b"{")):
            assert answer.status_code >= 400, answer
            assert {k: answer.headers.get(k) for k in EVERY_ANSWER} == EVERY_ANSWER, (answer.url, answer.headers)


@pytest.mark.parametrize("request_bytes, status", [
    (b"NOT HTTP AT ALL\r\n\r\n", 400),
    (b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Pad: " + b"a" * (2 * MAX_HEADER_BYTES) + b"\r\n\r\n", 431),
], ids=["not-http", "headers-too-large"])
def test_the_connection_layer_s_refusals_carry_them(server: Server, request_bytes: bytes, status: int) -> None:
    got, headers = raw_answer(server, request_bytes)
    assert got == status, headers
    assert {k: headers.get(k) for k in EVERY_ANSWER} == EVERY_ANSWER, headers


def test_the_last_resort_500_carries_them(tmp_path: Path) -> None:
    """Starlette answers an unhandled exception outside the app's middleware, the one that adds them."""
    from service.api.app import create_app
    from service.config import Settings

    app: FastAPI = create_app(Settings(model_store=tmp_path))

    @app.get("/boom")
    async def boom() -> None:
        raise RuntimeError("a bug")

    async def call() -> httpx.Response:
        transport = httpx.ASGITransport(app, raise_app_exceptions=False)
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
            return await client.get("/boom")

    r = asyncio.run(call())
    assert r.status_code == 500 and r.json()["error"]["code"] == "internal_error"
    assert {k: r.headers.get(k) for k in EVERY_ANSWER} == EVERY_ANSWER, r.headers


def test_a_path_with_a_slash_too_many_or_too_few_is_not_redirected(server: Server) -> None:
    """No 307 to the path without (or with) its trailing slash: Starlette builds that Location
    from the request's Host and scheme, so behind a TLS proxy that does not forward the scheme
    a client following it sent its X-API-Key again over plain HTTP. An API path is exact: 404."""
    with httpx.Client(base_url=server.url, timeout=10) as client:
        for answer in (client.put(f"/v1/models/{CATEGORY}/threshold/", headers={"X-API-Key": ADMIN_KEY},
                                  json={"threshold": 1.0}),
                       client.get("/v1/models/", headers={"X-API-Key": USER_KEY}),
                       client.post(f"/v1/inspect/{CATEGORY}/", headers={"X-API-Key": USER_KEY}, content=b"x")):
            assert answer.status_code == 404 and "location" not in answer.headers, (answer.url, answer.headers)
