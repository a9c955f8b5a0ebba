"""The access log (service/api/request_metrics.py, set up by service/server.py): one line per
request from the app's own middleware, not uvicorn's, with the UTC time, the client, the
request (its target bounded), the status as the metrics count it (499 for a client gone), the
latency and the request id. Against a real server on a loopback port; an unhandled
exception's 500 in process."""

from __future__ import annotations

import asyncio
import io
import logging
import re
import socket
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from fastapi import FastAPI

from models.data import MVTecCategory

from harness import CATEGORY, Server, part, start

# 2026-12-06T18:26:00.123Z 127.0.0.1:36292 "POST /v1/inspect/brick" 200 12.34 ms id=trace-abc-123
LINE = re.compile(r'^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z (?P<client>\S+) "(?P<method>[A-Z]+) (?P<target>.*)" '
                  r'(?P<status>\d{3}) (?P<ms>\d+\.\d\d) ms id=(?P<id>\S+)$')
TARGET_BOUND = 256 + len("...(+65536 bytes)")


@pytest.fixture(scope="module")
def server(model_store: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    srv = start(model_store, tmp_path_factory.mktemp("logs") / "access.log", access_log="true", log_level="info")
    yield srv
    srv.stop()


def access_lines(server: Server, request_id: str, timeout: float = 10.0) -> list[str]:
    """The server log's lines that end with ``id=<request_id>``, once there is one (the line is
    written when the request ends, which may be after the client saw the answer)."""
    end = time.monotonic() + timeout
    while True:
        server._log.flush()
        lines = [ln for ln in server.log_path.read_text(errors="replace").splitlines()
                 if ln.endswith(f" id={request_id}")]
        if lines or time.monotonic() > end:
            return lines
        time.sleep(0.05)


def one_line(server: Server, request_id: str) -> re.Match[str]:
    lines = access_lines(server, request_id)
    assert len(lines) == 1, f"access lines for {request_id}: {lines}\n{server.log()}"
    match = LINE.match(lines[0])
    assert match, lines[0]
    return match


def test_a_request_id_is_traced_in_one_access_line(server: Server, demo_root: Path) -> None:
    image = next(s.path for s in MVTecCategory(demo_root, CATEGORY).test_samples() if s.label == 0)
    r = httpx.post(f"{server.url}/v1/inspect/{CATEGORY}?heatmap=none", files=[part(image)],
                   headers={"X-Request-ID": "trace-abc-123"}, timeout=60)
    assert r.status_code == 200, r.text
    assert r.headers["x-request-id"] == "trace-abc-123"
    line = one_line(server, "trace-abc-123")
    assert (line["client"].startswith("127.0.0.1:"), line["method"], line["target"], line["status"]) == \
        (True, "POST", f"/v1/inspect/{CATEGORY}?heatmap=none", "200")
    assert 0 < float(line["ms"]) < 60_000
    # uvicorn's own access line ("POST /v1/... HTTP/1.1" 200 OK) is off: one line per request
    assert 'HTTP/1.1" 200' not in server.log_path.read_text(errors="replace")


def test_a_60000_char_query_leaves_a_bounded_line(server: Server) -> None:
    query = "A" * 60_000
    r = httpx.get(f"{server.url}/x?{query}", headers={"X-Request-ID": "long-query-1"}, timeout=30)
    assert r.status_code == 404
    line = one_line(server, "long-query-1")
    assert line["status"] == "404" and line["method"] == "GET"
    assert line["target"] == f"/x?{'A' * (256 - 3)}...(+{len('/x?') + 60_000 - 256} bytes)"
    assert len(line[0]) < 80 + TARGET_BOUND, len(line[0])


def test_a_target_is_one_bounded_line_whatever_its_bytes() -> None:
    """Bytes a client may send in a target that would break the line (quotes, escapes, bytes
    outside ASCII, control characters) show as \\xNN, and within the bound."""
    from service.api.request_metrics import TARGET_MAX, request_target

    assert request_target({"raw_path": b"/a\"b\\c", "query_string": b"\n\xe9z"}) == r"/a\x22b\x5cc?\x0a\xe9z"
    shown = request_target({"raw_path": b"/x", "query_string": b"\xff" * 60_000})
    assert shown == "/x?" + r"\xff" * 63 + f"...(+{60_003 - 66} bytes)"
    assert len(shown) <= TARGET_MAX + len("...(+65536 bytes)")


def test_a_client_gone_mid_upload_gets_a_499_line(server: Server) -> None:
    with socket.create_connection(("127.0.0.1", server.port), timeout=10) as sock:
        sock.sendall(b"POST /v1/inspect/brick HTTP/1.1\r\nHost: x\r\ncontent-type: image/png\r\n"
                     b"X-Request-ID: gone-mid-upload\r\ncontent-length: 1000000\r\n\r\n" + b"x" * 1000)
        time.sleep(0.3)
    line = one_line(server, "gone-mid-upload")
    assert (line["method"], line["target"], line["status"]) == ("POST", "/v1/inspect/brick", "499")
    assert float(line["ms"]) >= 0


def test_an_unhandled_exception_gets_a_500_line_with_its_request_id(tmp_path: Path) -> None:
    """The app's last-resort handler answers 500 outside the middleware and re-raises: the
    middleware still writes the line, with the id the answer carries."""
    from service.api.app import create_app
    from service.api.request_metrics import access_log
    from service.config import Settings
    from service.server import configure_access_log

    app: FastAPI = create_app(Settings(model_store=tmp_path))

    @app.get("/boom")
    async def boom() -> None:
        raise RuntimeError("a bug")

    saved = (list(access_log.handlers), access_log.level, access_log.propagate, access_log.disabled)
    try:
        configure_access_log(Settings(model_store=tmp_path, access_log=True, log_level="info"))
        captured = io.StringIO()
        access_log.handlers[0].setStream(captured)  # type: ignore[attr-defined]

        async def call() -> httpx.Response:
            transport = httpx.ASGITransport(app, raise_app_exceptions=False)
            async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
                return await client.get("/boom", headers={"X-Request-ID": "boom-1"})

        r = asyncio.run(call())
        assert r.status_code == 500 and r.json()["error"]["code"] == "internal_error"
        (text,) = captured.getvalue().splitlines()
        line = LINE.match(text)
        assert line and (line["method"], line["target"], line["status"], line["id"]) == ("GET", "/boom", "500",
                                                                                         "boom-1"), text
        # off (MSFLOW_ACCESS_LOG=false): the middleware formats nothing
        configure_access_log(Settings(model_store=tmp_path, access_log=False))
        assert not access_log.isEnabledFor(logging.INFO) and not access_log.handlers
    finally:
        access_log.handlers[:] = saved[0]
        access_log.setLevel(saved[1])
        access_log.propagate, access_log.disabled = saved[2:]
