"""HTTP connections under budget (service/api/connections.py), against a real server on a
loopback port and raw sockets: header bytes (431), header time (408, and silent connections
closed), body time (408, or closed after an answer), answers the client does not take (cut
off), open connections (503, then closed), pipelined requests (429), upgrade requests,
uvicorn's parse errors in the API's error shape, and refusals that reach a client still
writing (the lingering close)."""

from __future__ import annotations

import io
import json
import select
import socket
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import numpy as np
import pytest
from PIL import Image

from loadtests.hostile import memory_kb
from service.api.connection_budget import LINGER_BYTES, LINGER_S, MAX_PIPELINED, ConnectionBudget

from harness import ADMIN_KEY, Server, metric, start

HEADER_TIMEOUT_S = 2.0
REQUEST_DEADLINE_S = 3.0  # the body's time, too
CLOCK_PERIOD_S = HEADER_TIMEOUT_S / 4  # the connections' sweeping clock (budgeted_protocol)
MAX_CONNECTIONS = 6
MAX_HEADER_BYTES = 16 * 1024


@pytest.fixture(scope="module")
def server(model_store: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    srv = start(model_store, tmp_path_factory.mktemp("logs") / "connections.log", header_timeout_s=HEADER_TIMEOUT_S,
                max_connections=MAX_CONNECTIONS, max_header_bytes=MAX_HEADER_BYTES,
                request_deadline_ms=REQUEST_DEADLINE_S * 1e3, admin_api_keys=ADMIN_KEY)
    yield srv
    srv.stop()


def _connect(server: Server) -> socket.socket:
    return socket.create_connection(("127.0.0.1", server.port), timeout=10)


def _answer(sock: socket.socket, timeout: float = 10.0) -> bytes:
    """Everything the server sends until it closes (b"" if it closed without a word; a reset
    counts as closing)."""
    sock.settimeout(timeout)
    out = b""
    try:
        while chunk := sock.recv(65536):
            out += chunk
    except ConnectionResetError:
        pass
    return out


def _status(sock: socket.socket) -> int:
    """The status of one whole answer on a kept-alive connection (its body read to its length;
    one request at a time: what follows the answer in a read is dropped)."""
    sock.settimeout(10)
    data = b""
    while b"\r\n\r\n" not in data:
        data += sock.recv(65536) or b"<closed>"
        assert not data.endswith(b"<closed>"), data
    head, _, body = data.partition(b"\r\n\r\n")
    length = next(int(line.split(b":")[1]) for line in head.lower().split(b"\r\n")
                  if line.startswith(b"content-length:"))
    while len(body) < length:
        body += sock.recv(65536)
    return int(head.split()[1])


def _error(answer: bytes, status: int, code: str) -> dict[str, str]:
    head, _, body = answer.partition(b"\r\n\r\n")
    assert head.startswith(f"HTTP/1.1 {status} ".encode()), answer[:200]
    assert b"content-type: application/json" in head.lower() and b"connection: close" in head.lower(), head
    error = json.loads(body)["error"]
    assert error["code"] == code and error["message"], error
    return error


def _closed(server: Server, reason: str) -> float:
    """``msflow_http_connections_closed_total`` for ``reason``."""
    with httpx.Client(base_url=server.url) as client:
        return metric(client, "msflow_http_connections_closed_total", reason=reason)


def _rss_kb(server: Server) -> int:
    return memory_kb(server.proc.pid)[0]


def test_headers_over_their_budget_are_431_whether_sent_whole_or_streamed(server: Server) -> None:
    counted = _closed(server, "header_too_large")
    with _connect(server) as sock:  # whole, in one read: measured when the headers end
        sock.sendall(b"GET /readyz HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * (MAX_HEADER_BYTES + 10) + b"\r\n\r\n")
        _error(_answer(sock), 431, "header_too_large")
    # Streamed without end: before the budget the parser held all of it (a 64 MB header grew
    # the server by 64 MB); now the answer comes once the budget is spent, while the client
    # still writes, and the connection goes once the client has sent what a linger drops.
    before = _rss_kb(server)
    sent, answered_at = 0, 0
    with _connect(server) as sock:
        sock.sendall(b"POST /v1/inspect/brick HTTP/1.1\r\nHost: x\r\nX-Junk: ")
        chunk = b"b" * 65536
        with pytest.raises(OSError):  # reset or broken pipe: the server stopped reading
            for _ in range(64 * 1024 * 1024 // len(chunk)):
                sock.sendall(chunk)
                sent += len(chunk)
                if not answered_at and select.select([sock], [], [], 0)[0]:
                    answered_at = sent
                    _error(sock.recv(65536), 431, "header_too_large")
    assert 0 < answered_at < 8 * 1024 * 1024, answered_at  # the server's read plus the kernel's buffers
    assert sent < LINGER_BYTES + 16 * 1024 * 1024, sent  # the linger's bytes, then the kernel's buffers
    assert _rss_kb(server) - before < 4 * 1024
    assert _closed(server, "header_too_large") == counted + 2


def test_a_chunked_body_s_trailers_are_header_bytes_under_the_same_budget(server: Server) -> None:
    """Trailers (header lines after a chunked body's last chunk) are headers the parser holds
    as it does the request's own, but came after the budget's count: 60 MB of keyless
    trailers grew the server from 124 MB to 893 MB before its body deadline."""
    counted = _closed(server, "header_too_large")
    chunked = b"Host: x\r\nContent-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n"
    trailers = b"X-T: " + b"t" * 1000 + b"\r\n"
    with _connect(server) as sock:  # whole, in one read, to a route that waits for its body's end
        sock.sendall(b"PUT /v1/models/brick/threshold HTTP/1.1\r\nX-API-Key: " + ADMIN_KEY.encode() + b"\r\n" +
                     chunked + b"2\r\n{}\r\n0\r\n" + trailers * (MAX_HEADER_BYTES // len(trailers) + 1) + b"\r\n")
        _error(_answer(sock), 431, "header_too_large")
    before = _rss_kb(server)
    sent = 0
    with _connect(server) as sock:  # streamed without end, after a keyless request's answer
        sock.sendall(b"POST /v1/models/brick/reload HTTP/1.1\r\n" + chunked + b"0\r\n")
        assert _status(sock) == 401
        chunk = trailers * 64
        with pytest.raises(OSError):  # reset or broken pipe: the server stopped reading
            while sent < LINGER_BYTES + 24 * 1024 * 1024:
                sock.sendall(chunk)
                sent += len(chunk)
    assert sent < LINGER_BYTES + 16 * 1024 * 1024, sent  # the linger's bytes, then the kernel's buffers
    assert _rss_kb(server) - before < 4 * 1024
    assert _closed(server, "header_too_large") == counted + 2


def test_a_client_that_reads_only_after_writing_gets_the_refusal_not_a_reset(server: Server) -> None:
    """Closing with the client's bytes unread resets the connection, and a client still
    writing saw the reset, not the 431 (four times in five for a 3 MB header, before the
    lingering close); now the server drops what follows its answer until the client closes."""
    header = b"GET /readyz HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * (3 * 1024 * 1024) + b"\r\n\r\n"
    for _ in range(5):
        with _connect(server) as sock:
            sock.sendall(header)
            _error(_answer(sock), 431, "header_too_large")


def test_slow_headers_are_408_and_silent_connections_close(server: Server) -> None:
    counted = _closed(server, "header_timeout")
    with _connect(server) as slow, _connect(server) as silent:
        started = time.monotonic()
        slow.sendall(b"GET /readyz HTTP/1.1\r\nHost: x\r\n")  # and then nothing: a slowloris client
        error = _error(_answer(slow), 408, "request_timeout")
        assert f"{HEADER_TIMEOUT_S:g} s" in error["message"]
        assert _answer(silent) == b""  # opened and never sent a byte: closed without an answer
        assert HEADER_TIMEOUT_S - 0.2 < time.monotonic() - started < HEADER_TIMEOUT_S + 5
    assert _closed(server, "header_timeout") == counted + 2


def _trickle(server: Server, head: bytes, started_body: bytes, every_s: float = 0.25,
             give_up_s: float = 30.0) -> tuple[bytes, float, float]:
    """Send ``head`` and the start of its body, then one more byte every ``every_s`` (a body
    that never ends); return what the server answered, when its answer came and when it
    closed the connection (seconds from the headers)."""
    with _connect(server) as sock:
        sock.sendall(head + started_body)
        started, answer, answered_at = time.monotonic(), b"", 0.0
        while time.monotonic() - started < give_up_s:
            if select.select([sock], [], [], every_s)[0]:
                try:
                    chunk = sock.recv(65536)
                except ConnectionResetError:
                    chunk = b""
                if not chunk:
                    return answer, answered_at, time.monotonic() - started
                answer += chunk
                answered_at = answered_at or time.monotonic() - started
            try:
                sock.sendall(b"a")
            except OSError:  # reset: closed
                return answer, answered_at, time.monotonic() - started
        return answer, answered_at, -1.0  # still open


def test_bodies_that_do_not_arrive_in_time_are_408_and_connections_close_after_any_answer(server: Server) -> None:
    """uvicorn sets a body no time: a route that reads a JSON body waited for it for good,
    and after any answer a client sending the rest of a declared body a byte at a time kept
    the connection for as long as it went on (measured: still open after 17 s)."""
    counted = _closed(server, "body_timeout")
    # An admin's threshold update (its key checked before its body is read, so it has one).
    label = (b"PUT /v1/models/brick/threshold HTTP/1.1\r\nHost: x\r\ncontent-type: application/json\r\n"
             b"x-api-key: " + ADMIN_KEY.encode() + b"\r\ncontent-length: 10000\r\n\r\n", b'{"threshold": ')
    answered_early = (b"GET /healthz HTTP/1.1\r\nHost: x\r\ncontent-length: 100000000\r\n\r\n", b"ab")
    upload = (b"POST /v1/inspect/brick HTTP/1.1\r\nHost: x\r\ncontent-type: multipart/form-data; boundary=zz\r\n"
              b"content-length: 100000\r\n\r\n", b"--zz\r\n")
    with ThreadPoolExecutor(3) as pool:
        waited, early, deadline = pool.map(lambda request: _trickle(server, *request), (label, answered_early, upload))
    late = REQUEST_DEADLINE_S + 2 * CLOCK_PERIOD_S + 1.0  # the clock's ticks, and a margin
    answer, answered_at, closed_at = waited  # the route waits for its body: 408, then closed
    _error(answer, 408, "request_timeout")
    assert REQUEST_DEADLINE_S - 0.1 < answered_at < late and 0 < closed_at < late + LINGER_S, waited
    answer, answered_at, closed_at = early  # answered at once (413); the body still trickling: closed
    assert answer.startswith(b"HTTP/1.1 413 ") and b'"request_too_large"' in answer, answer[:300]
    assert answered_at < 1.0 and REQUEST_DEADLINE_S - 0.1 < closed_at < late + LINGER_S, early
    answer, answered_at, closed_at = deadline  # the upload's own deadline answers (408, as above), then closed
    assert answer.startswith(b"HTTP/1.1 408 ") and b'"request_timeout"' in answer, answer[:300]
    assert 0 < closed_at < late + LINGER_S, deadline
    assert _closed(server, "body_timeout") == counted + 3


def _large_answers(server: Server, count: int) -> socket.socket:
    """A connection with a small receive window that has sent ``count`` requests whose answers
    are ~3.8 MB each (a 1024² noise JPEG, its overlay at the upload's size, inline)."""
    rng = np.random.default_rng(0)
    noise = io.BytesIO()
    Image.fromarray(rng.integers(0, 255, (1024, 1024, 3), dtype=np.uint8)).save(noise, "JPEG", quality=90)
    body = (b'--zz\r\nContent-Disposition: form-data; name="file"; filename="noise.jpg"\r\n'
            b"Content-Type: image/jpeg\r\n\r\n" + noise.getvalue() + b"\r\n--zz--\r\n")
    request = (b"POST /v1/inspect/brick?overlay=true&heatmap_size=original HTTP/1.1\r\nHost: x\r\n"
               b"content-type: multipart/form-data; boundary=zz\r\ncontent-length: %d\r\n\r\n" % len(body) + body)
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)  # a window that a few KB fill
    sock.connect(("127.0.0.1", server.port))
    sock.settimeout(10)
    for _ in range(count):  # the first answer fills the buffers; the next waits for the client
        sock.sendall(request)
    return sock


def test_a_client_that_takes_none_of_its_answers_is_cut_off(server: Server) -> None:
    """A client whose TCP window stays shut: uvicorn's app task waited for it to read on for
    good, holding the answer and the kernel's socket buffers (several MB on loopback)."""
    counted = _closed(server, "send_timeout")
    with _large_answers(server, 3) as sock:
        time.sleep(REQUEST_DEADLINE_S + 2 * CLOCK_PERIOD_S + 1.0)
        taken = 0
        with pytest.raises(ConnectionResetError):  # what the buffers held, then the abort's reset
            while chunk := sock.recv(65536):
                taken += len(chunk)
    assert taken < 2 * 3_000_000, taken  # not the answers behind the stalled one
    assert _closed(server, "send_timeout") == counted + 1


def test_a_client_that_reads_its_answers_slowly_keeps_its_connection(server: Server) -> None:
    counted = _closed(server, "send_timeout")
    with _large_answers(server, 2) as sock:
        taken, started = b"", time.monotonic()
        while time.monotonic() - started < REQUEST_DEADLINE_S + 4 * CLOCK_PERIOD_S + 1.0:
            taken += sock.recv(16384)  # ~64 KB/s: the buffers stay full, and the client takes bytes
            time.sleep(0.25)
        while taken.count(b"HTTP/1.1 ") < 2 or len(taken) < 2 * 3_700_000:
            taken += sock.recv(1 << 20) or pytest.fail(f"closed after {len(taken)} bytes")
    assert taken.count(b"HTTP/1.1 200 ") == 2
    assert _closed(server, "send_timeout") == counted


def test_keep_alive_connections_outlive_the_header_timeout_between_requests(server: Server) -> None:
    """The header timeout runs from a request's first byte; between requests uvicorn's
    keep-alive timeout (5 s) applies, and the body is the request deadline's."""
    with _connect(server) as sock:
        for pause in (0.0, HEADER_TIMEOUT_S + 1):
            time.sleep(pause)
            sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
            assert _status(sock) == 200
        # headers in two reads, under the budget and the timeout
        sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Part: " + b"c" * (MAX_HEADER_BYTES // 2))
        time.sleep(HEADER_TIMEOUT_S / 4)
        sock.sendall(b"c" * 1000 + b"\r\n\r\n")
        assert _status(sock) == 200


def test_stray_bytes_between_requests_do_not_keep_a_connection(server: Server) -> None:
    """uvicorn drops its keep-alive timer on any bytes and re-arms it only after an answer: a
    bare CRLF after one request kept the connection open for good (still open after 30 s;
    enough of them held the whole connection budget)."""
    keep_alive_s = 5.0  # uvicorn's default timeout_keep_alive
    with _connect(server) as sock:
        sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
        assert _status(sock) == 200
        started = time.monotonic()
        closed_at = None
        while time.monotonic() - started < 3 * keep_alive_s:
            try:
                sock.sendall(b"\r\n")  # a byte a second, never a request
            except OSError:
                closed_at = time.monotonic() - started
                break
            if select.select([sock], [], [], 1.0)[0] and sock.recv(4096) == b"":
                closed_at = time.monotonic() - started
                break
    assert closed_at is not None and closed_at < keep_alive_s + 1.5, closed_at


def test_connections_over_the_budget_are_503_then_closed_and_the_server_serves_after(server: Server) -> None:
    counted = _closed(server, "over_budget")
    slots = ConnectionBudget(MAX_HEADER_BYTES, HEADER_TIMEOUT_S, MAX_CONNECTIONS, REQUEST_DEADLINE_S).refusal_slots
    held = [_connect(server) for _ in range(MAX_CONNECTIONS)]
    try:
        for sock in held:  # kept alive after a request: uvicorn's 5 s, not the header timeout
            sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
            assert _status(sock) == 200
        with _connect(server) as extra:
            started = time.monotonic()
            extra.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
            answer = _answer(extra)
            _error(answer, 503, "too_many_connections")
            assert b"\r\nretry-after: 1\r\n" in answer.lower()
            assert time.monotonic() - started < HEADER_TIMEOUT_S / 2  # at once, not timed out
        # Refused connections that the client keeps open hold a refusal slot each for their
        # linger; past the slots a connection is closed without a word.
        lingering = [_connect(server) for _ in range(slots)]
        try:
            time.sleep(0.2)
            for sock in lingering:
                _error(_answer(sock), 503, "too_many_connections")  # the answer, then the server's EOF
            with _connect(server) as unanswered:
                assert _answer(unanswered) == b""
            time.sleep(LINGER_S + HEADER_TIMEOUT_S / 4 + 0.2)  # the linger and a tick of the clock
            with _connect(server) as again:  # the server closed the lingering ones: slots free
                _error(_answer(again), 503, "too_many_connections")
        finally:
            for sock in lingering:
                sock.close()
    finally:
        for sock in held:
            sock.close()
    deadline = time.monotonic() + 10
    while True:  # the server notices the closed ones within a loop turn or two
        try:
            with httpx.Client(base_url=server.url) as client:
                assert (metric(client, "msflow_http_connections_closed_total", reason="over_budget")
                        == counted + slots + 3)
                assert metric(client, "msflow_http_connections") >= 1  # this client's own
            break
        except httpx.TransportError:
            assert time.monotonic() < deadline
            time.sleep(0.1)


def test_pipelined_requests_are_answered_in_order_up_to_a_bound(server: Server) -> None:
    request = b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n"
    with _connect(server) as sock:
        sock.sendall(request * MAX_PIPELINED)
        sock.settimeout(10)
        answers = b""
        while answers.count(b"HTTP/1.1 ") < MAX_PIPELINED and (chunk := sock.recv(65536)):
            answers += chunk
        assert answers.count(b"HTTP/1.1 200 ") == MAX_PIPELINED, answers[-300:]
    counted = _closed(server, "pipeline_too_deep")
    with _connect(server) as sock:  # a few more, in one segment (one read): 2,000 held ~1 MB before
        sock.sendall(request * (MAX_PIPELINED + 4))
        answer = _answer(sock)
    assert answer.count(b"HTTP/1.1 200 ") <= 1, answer[:300]
    _error(answer[answer.index(b"HTTP/1.1 429 "):], 429, "too_many_pipelined_requests")
    assert _closed(server, "pipeline_too_deep") == counted + 1


def test_upgrade_requests_are_answered_as_http_and_stay_counted(server: Server) -> None:
    """The API has no WebSocket route: a request asking for one is plain HTTP, under the same
    budgets, and leaves the open-connection count as it found it."""
    with httpx.Client(base_url=server.url) as client:
        before = metric(client, "msflow_http_connections")
        for _ in range(3):
            with _connect(server) as sock:
                sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
                             b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n")
                assert _status(sock) == 200
        deadline = time.monotonic() + 5
        while metric(client, "msflow_http_connections") != before:
            assert time.monotonic() < deadline, "upgraded connections left out of the count"
            time.sleep(0.05)


def test_bytes_that_are_not_http_get_the_api_error_shape(server: Server) -> None:
    with _connect(server) as sock:
        sock.sendall(b"GARBAGE\r\n\r\n")
        _error(_answer(sock), 400, "bad_request")


def test_a_client_gone_mid_upload_is_499_not_a_server_error(server: Server) -> None:
    """Starlette raises ClientDisconnect when the connection closes under a body being read:
    it was answered 500 and logged with a traceback, so any client could raise the error rate."""
    def count(status: str) -> float:
        with httpx.Client(base_url=server.url) as client:
            return metric(client, "msflow_requests_total", endpoint="/v1/inspect/{category}", status=status)

    errors, gone = count("500"), count("499")
    for content_type in (b"image/png", b"multipart/form-data; boundary=zz"):
        with _connect(server) as sock:
            sock.sendall(b"POST /v1/inspect/brick HTTP/1.1\r\nHost: x\r\ncontent-type: " + content_type +
                         b"\r\ncontent-length: 1000000\r\n\r\n--zz\r\n" + b"x" * 1000)
            time.sleep(0.3)
    deadline = time.monotonic() + 5
    while count("499") < gone + 2 and time.monotonic() < deadline:
        time.sleep(0.1)
    assert (count("500"), count("499")) == (errors, gone + 2)
    assert "ClientDisconnect" not in server.log()
