"""The access log against a client that writes into it: the client field comes from a proxy's
``X-Forwarded-For`` where uvicorn trusts the peer (loopback, by default, as here), and must not
carry a forged request into the line. A real ``msflow serve`` (null engine, hand-written version)."""

from __future__ import annotations

import re
import time
from collections.abc import Iterator

import httpx
import pytest

from harness import CATEGORY, Server, fake_version, start

# 2026-12-06T18:26:00.123Z 127.0.0.1:36292 "GET /healthz" 200 1.23 ms id=abc
LINE = re.compile(r'^\S+ (?P<client>\S+) "(?P<method>[A-Z]+) (?P<target>[^"]*)" (?P<status>\d{3}) '
                  r'(?P<ms>\d+\.\d\d) ms id=(?P<id>\S+)$')


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    root = tmp_path_factory.mktemp("security-log")
    fake_version(root / "store", CATEGORY)
    srv = start(root / "store", root / "access.log", engine="null", access_log="true", log_level="info")
    yield srv
    srv.stop()


def line_of(server: Server, request_id: str, timeout: float = 10.0) -> str:
    end = time.monotonic() + timeout
    while True:
        server._log.flush()
        text = server.log_path.read_text(errors="replace")
        lines = [ln for ln in text.splitlines() if ln.endswith(f"id={request_id}")]
        if lines or time.monotonic() > end:
            assert len(lines) == 1, lines
            return lines[0]
        time.sleep(0.05)


@pytest.mark.parametrize("forwarded", [
    '10.9.9.9:1 "GET /v1/models/brick/reload" 200 1.00 ms id=forged x',
    '10.0.0.1\\x22 "POST /v1/models/brick/threshold"',
    "10.0.0.7\xa0\xff",
])
def test_a_forwarded_address_cannot_forge_a_request_in_the_line(server: Server, forwarded: str) -> None:
    request_id = f"xff-{len(forwarded)}"
    r = httpx.get(f"{server.url}/healthz", headers={"X-Forwarded-For": forwarded.encode("latin-1"),
                                                    "X-Request-ID": request_id})
    assert r.status_code == 200
    line = line_of(server, request_id)
    match = LINE.match(line)
    assert match, line
    assert (match["method"], match["target"], match["status"]) == ("GET", "/healthz", "200")
    assert line.count('"') == 2, line  # the request's quotes only: the client field is one token


def test_a_plain_forwarded_address_is_logged_as_sent(server: Server) -> None:
    r = httpx.get(f"{server.url}/healthz", headers={"X-Forwarded-For": "10.1.2.3", "X-Request-ID": "xff-plain"})
    assert r.status_code == 200
    assert LINE.match(line_of(server, "xff-plain"))["client"] == "10.1.2.3:0"  # type: ignore[index]
