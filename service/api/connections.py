"""HTTP connections under budget, below the app: uvicorn's httptools protocol, subclassed to keep
the budgets of :mod:`service.api.connection_budget` (what each budget is, and why), with one
clock for the whole process that closes the connections that are late.

Each refusal is counted (``msflow_http_connections_closed_total`` by reason) beside the open
connections (``msflow_http_connections``), and its answer carries an ``X-Request-ID`` as every
answer of the app does: always a new one (the request never reached the app, and may not have
been parsed), named in the debug log's line of the refusal. uvicorn's own answer to a request it cannot parse
comes in the API's error shape here too (400 ``bad_request``), not as plain text. The server
runs with ``ws="none"``: with a WebSocket library installed (wsproto is), uvicorn handed an
upgrade request's connection to a protocol of its own, outside these budgets and this count
(each such request left ``msflow_http_connections`` one higher for good), for an API that has
no WebSocket route.
"""

from __future__ import annotations

import asyncio
import fcntl
import json
import logging
import struct
import termios
import uuid
from typing import Any

from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from service.api.connection_budget import LINGER_BYTES, LINGER_S, MAX_PIPELINED, ConnectionBudget
from service.api.errors import error_body
from service.api.security_headers import EVERY_ANSWER_HEADERS
from service.metrics import ServiceMetrics

log = logging.getLogger(__name__)


def budgeted_protocol(budget: ConnectionBudget, metrics: ServiceMetrics) -> type[HttpToolsProtocol]:
    """uvicorn's httptools protocol with ``budget`` kept, for ``uvicorn.Config(http=...)``."""
    clock = ConnectionClock(min(1.0, max(0.05, min(budget.header_timeout_s, budget.body_timeout_s) / 4)))
    return type("BudgetedHttpProtocol", (BudgetedHttpProtocol,), {"budget": budget, "metrics": metrics,
                                                                 "clock": clock})


# What the app's answers carry (service/api/security_headers.py): these come before the app.
_EVERY_ANSWER = "".join(f"{name}: {value}\r\n" for name, value in EVERY_ANSWER_HEADERS.items())


def error_bytes(status: int, phrase: str, code: str, message: str, extra_headers: str = "",
                request_id: str | None = None) -> bytes:
    """A whole HTTP/1.1 answer in the API's error shape, closing the connection
    (``extra_headers``: more header lines, each ending in CRLF), with ``request_id`` (a new
    one if None) as its ``X-Request-ID``."""
    body = json.dumps(error_body(code, message)).encode()
    head = (f"HTTP/1.1 {status} {phrase}\r\ncontent-type: application/json\r\n"
            f"content-length: {len(body)}\r\nconnection: close\r\n"
            f"x-request-id: {request_id or uuid.uuid4().hex}\r\n{_EVERY_ANSWER}{extra_headers}\r\n")
    return head.encode("ascii") + body


class _StopParsing(Exception):
    """Raised from a parser callback: httptools stops, and uvicorn calls
    :meth:`BudgetedHttpProtocol.send_400_response`, which gives the refusal decided."""


class ConnectionClock:
    """One timer for the whole process, not one per request: every ``period`` seconds, while
    connections are open, it closes those whose headers or body are late, whose client takes
    no answer, or whose linger is over. (A timer armed and cancelled per request, with every
    request's header sizes summed, cost 1.1% more instructions per request under
    ``loadtests/instructions.py``; this way none measurable: docs/performance-log.md.) A late
    connection goes between its time and that plus a period or two."""

    def __init__(self, period: float) -> None:
        self.period = period
        self._handle: asyncio.TimerHandle | None = None

    def start(self, loop: asyncio.AbstractEventLoop, connections: set[Any]) -> None:
        if self._handle is None:
            self._handle = loop.call_later(self.period, self._tick, loop, connections)

    def _tick(self, loop: asyncio.AbstractEventLoop, connections: set[Any]) -> None:
        self._handle = None
        now = loop.time()
        for connection in list(connections):
            if isinstance(connection, BudgetedHttpProtocol):
                connection.check_deadlines(now)
        if connections:
            self.start(loop, connections)


class BudgetedHttpProtocol(HttpToolsProtocol):
    """One connection (uvicorn makes one protocol object per connection); :func:`budgeted_protocol`
    gives the class its budget, metrics and clock."""

    budget: ConnectionBudget
    metrics: ServiceMetrics
    clock: ConnectionClock

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._in_headers = False  # a request's first byte has come, its headers' end has not
        self._header_bytes = 0  # counted reads of the headers under way
        self._read_bytes = 0  # the read being parsed
        self._header_deadline = 0.0
        self._refusal: tuple[str, int, str, str, str] | None = None  # decided in a parser callback
        self._in_body = False  # a request's headers have ended, its body has not
        self._in_trailers = False  # after a chunk's size line no body byte yet: the last chunk's trailers
        self._trailer_bytes = 0  # a chunked body's trailers, counted as header bytes
        self._trailer_line = 0  # reads of one trailer line not ended yet (the parser holds them)
        self._trailer_ended = False  # a trailer line ended in the read being parsed
        self._body_seen_at = 0.0  # the clock's first tick that found the body under way
        self._write_stalled = False  # the transport's buffer is full: the client reads nothing
        self._stall_seen_at = 0.0  # the clock's last tick that found the client taking bytes
        self._stall_buffered = 0  # what the transport held then
        self._linger_until = 0.0  # answered and half-closed: dropping what comes until then
        self._answering: Any = None  # the request whose app task runs (pipelined ones wait)
        self._idle_until = 0.0  # answered, nothing pipelined: uvicorn's keep-alive ends then
        self._linger_left = 0  # bytes still to drop

    # ------------------------------------------------------------------ connection
    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self.metrics.connections.inc()
        over = len(self.connections) - self.budget.max_connections
        if over > 0:
            if over > self.budget.refusal_slots:
                self._closed_on_budget("over_budget")
                transport.close()
            else:
                self._refuse("over_budget", 503, "Service Unavailable", "too_many_connections",
                             f"this server process has {self.budget.max_connections} connections open; "
                             "retry shortly, or reuse a kept-alive connection", "retry-after: 1\r\n")
            return
        self._header_deadline = self.loop.time() + self.budget.header_timeout_s  # the first request's
        self.clock.start(self.loop, self.connections)

    def connection_lost(self, exc: Exception | None) -> None:
        self.metrics.connections.dec()
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        if self._linger_until:
            self._drop(len(data))
            return
        # A read counts if it began inside a request's headers or between requests. With
        # pipelining a read may hold the end of one request and the start of the next: one that
        # began in a body is left out (an undercount by one read at most), one that began
        # between requests counts the whole requests before the next one's start too.
        counted = self._in_headers or self.cycle is None or self.cycle.response_complete
        in_trailers = self._in_trailers
        if in_trailers:
            self._trailer_ended = False
        self._read_bytes = len(data)
        super().data_received(data)
        if counted and self._in_headers:
            self._header_bytes += len(data)
            if self._header_bytes > self.budget.max_header_bytes:
                self._refuse(*self._too_large())
        elif in_trailers and self._in_trailers:  # a read among trailers: a line may go on across reads
            self._trailer_line = 0 if self._trailer_ended else self._trailer_line + len(data)
            self._count_trailer(0)
        elif self._idle_until and self.timeout_keep_alive_task is None and not self.transport.is_closing():
            # Bytes that start no request (a bare CRLF between requests) made uvicorn drop its
            # keep-alive timer for good: the connection then stayed open without end, a slot
            # of the connection budget held by one byte. The timer goes back, never extended.
            self.timeout_keep_alive_task = self.loop.call_later(
                max(0.0, self._idle_until - self.loop.time()), self.timeout_keep_alive_handler)

    # ------------------------------------------------------------------ parser callbacks
    def on_message_begin(self) -> None:
        super().on_message_begin()
        self._in_headers, self._header_bytes, self._idle_until = True, 0, 0.0
        self._trailer_bytes = self._trailer_line = 0
        if self.cycle is not None:  # a later request on the connection: timed from its first byte
            self._header_deadline = self.loop.time() + self.budget.header_timeout_s

    def on_headers_complete(self) -> None:
        self._in_headers = False
        # Headers that ended in this read were not counted yet: measured exactly, when they
        # and this read could together pass the budget.
        if (self._header_bytes + self._read_bytes > self.budget.max_header_bytes
                and len(self.url) + sum(len(name) + len(value) + 4 for name, value in self.headers)
                > self.budget.max_header_bytes):
            self._refusal = self._too_large()
            raise _StopParsing  # before the app starts
        super().on_headers_complete()
        # uvicorn parses every request a read holds and queues those behind the one being
        # answered: one read of small pipelined requests held about 1 MB per connection.
        if len(self.pipeline) > MAX_PIPELINED:
            self._refusal = ("pipeline_too_deep", 429, "Too Many Requests", "too_many_pipelined_requests",
                             f"more than {MAX_PIPELINED} requests waiting on one connection; send them on "
                             "several, or wait for answers")
            raise _StopParsing
        self._in_body = True

    def on_header(self, name: bytes, value: bytes) -> None:
        if not self._in_headers:  # a trailer (uvicorn adds it to the request's headers too)
            self._trailer_ended, self._trailer_line = True, 0
            if self._count_trailer(len(name) + len(value) + 4):
                raise _StopParsing
        super().on_header(name, value)

    # Trailers (RFC 9112 7.1.2) follow the last chunk, whose size line is followed by no body
    # byte: the parser holds them as it does headers, after the headers' count was over.
    def on_chunk_header(self) -> None:
        self._in_trailers = True

    def on_body(self, body: bytes) -> None:
        self._in_trailers = False
        super().on_body(body)

    def _start_asgi_task(self, cycle: Any, app: Any) -> None:
        self._answering = cycle  # uvicorn keeps only the last parsed request as self.cycle
        super()._start_asgi_task(cycle, app)

    def on_message_complete(self) -> None:
        self._in_body, self._body_seen_at, self._in_trailers = False, 0.0, False
        super().on_message_complete()

    def on_response_complete(self) -> None:
        super().on_response_complete()
        if self.timeout_keep_alive_task is not None:  # armed: idle, nothing pipelined
            self._idle_until = self.loop.time() + self.timeout_keep_alive

    def send_400_response(self, msg: str) -> None:
        """uvicorn's answer to bytes that are not HTTP, in the API's error shape, or the
        refusal that stopped the parser (:meth:`on_headers_complete`)."""
        if self._refusal is not None:
            self._refuse(*self._refusal)
        else:
            self._refuse("bad_request", 400, "Bad Request", "bad_request", msg)

    def shutdown(self) -> None:
        """uvicorn's graceful shutdown: a lingering connection has had its answer."""
        if self._linger_until:
            self.transport.close()
        else:
            super().shutdown()

    def pause_writing(self) -> None:
        self._write_stalled, self._stall_seen_at = True, 0.0
        super().pause_writing()

    def resume_writing(self) -> None:
        self._write_stalled = False
        super().resume_writing()

    def _unsupported_upgrade_warning(self) -> None:
        """uvicorn's hook for an upgrade request it will not upgrade: the server speaks no
        WebSocket (``ws="none"``), so the request is answered as plain HTTP. uvicorn logs two
        warnings for each, which a client could repeat at its request rate."""
        log.debug("%s asked to upgrade the connection; answered as HTTP", self.client)

    # ------------------------------------------------------------------ budget
    def check_deadlines(self, now: float) -> None:
        """Close the connection if its request's headers or body are late, if its client has
        taken nothing of its answer for that long, if it opened that long ago without a byte,
        or if its linger is over (:class:`ConnectionClock` calls it)."""
        if self.transport is None:
            return
        if self._write_stalled:
            # Timed from the last tick that saw the client take bytes: a slow reader that
            # makes progress keeps its connection (nginx's send_timeout, between two writes).
            buffered = self._unsent()
            if not self._stall_seen_at or buffered < self._stall_buffered:
                self._stall_seen_at, self._stall_buffered = now, buffered
            elif now - self._stall_seen_at >= self.budget.body_timeout_s:
                self._closed_on_budget("send_timeout")
                self._stop_answering()
                self.transport.abort()  # close() would wait for the client to take the buffer
            return
        if self.transport.is_closing():
            return
        if self._linger_until:
            if now >= self._linger_until:
                self.transport.close()
            return
        if self._in_body:
            # Timed from the first tick that saw it (no clock read per request): the body goes
            # between body_timeout_s and that plus two periods after its headers. Not while
            # the server reads none of it: a pipelined request waits behind the one being
            # answered, and uvicorn pauses reading while the app is behind with a body.
            if self.flow.read_paused or self.cycle is not self._answering:
                self._body_seen_at = 0.0
            elif not self._body_seen_at:
                self._body_seen_at = now
            elif now - self._body_seen_at >= self.budget.body_timeout_s:
                self._body_late()
            return
        if now < self._header_deadline:
            return
        if self._in_headers:
            self._refuse("header_timeout", 408, "Request Timeout", "request_timeout",
                         f"the request's line and headers did not arrive within {self.budget.header_timeout_s:g} s")
        elif self.cycle is None:  # opened and never sent a byte
            self._closed_on_budget("header_timeout")
            self.transport.close()

    def _unsent(self) -> int:
        """The answer's bytes the client has not taken: the transport's buffer and the kernel's
        send queue (which can hold megabytes, so the transport's buffer alone can stand still
        for many seconds while a slow client reads on)."""
        size = self.transport.get_write_buffer_size()
        sock = self.transport.get_extra_info("socket")
        try:
            size += struct.unpack("i", fcntl.ioctl(sock.fileno(), termios.TIOCOUTQ, b"\0" * 4))[0]
        except (AttributeError, OSError, ValueError):  # not Linux, or the socket just went
            pass
        return size

    def _count_trailer(self, size: int) -> bool:
        """Trailers count against ``max_header_bytes``, as the request's own headers do
        (uncounted, 60 MB of them grew the server by 770 MB before its body deadline): each
        exactly as it ends, and a line still coming by its reads. True once over, refused."""
        self._trailer_bytes += size
        if self._trailer_bytes + self._trailer_line <= self.budget.max_header_bytes:
            return False
        if self._linger_until or self.transport.is_closing():  # refused already, in this read
            return True
        self._refuse_in_body(*self._too_large())
        return True

    def _body_late(self) -> None:
        self._refuse_in_body("body_timeout", 408, "Request Timeout", "request_timeout",
                             f"the request's body did not arrive within {self.budget.body_timeout_s:g} s")

    def _refuse_in_body(self, budget: str, status: int, phrase: str, code: str, message: str) -> None:
        """A refusal while the body comes: answered if the app has not answered yet, else the
        connection closes (after the answer, lingering; during it, at once)."""
        if self.cycle is None or not self.cycle.response_started:
            self._refuse(budget, status, phrase, code, message)
            return
        self._closed_on_budget(budget)
        if self.cycle.response_complete:  # a route that did not need the body, or the deadline's 504
            self._linger()
        else:  # an answer still going out while its body trickles in: cut short
            self._stop_answering()
            self.transport.close()

    def _too_large(self) -> tuple[str, int, str, str, str]:
        return ("header_too_large", 431, "Request Header Fields Too Large", "header_too_large",
                f"the request's line and headers exceed {self.budget.max_header_bytes} bytes")

    def _refuse(self, budget: str, status: int, phrase: str, code: str, message: str,
                extra_headers: str = "") -> None:
        """Answer ``status`` in the API's error shape and close, lingering: ``budget`` is the
        one spent, or ``bad_request`` (bytes that are not HTTP)."""
        if self.transport.is_closing() or self._linger_until:
            return
        answering = self._answering
        if answering is not None and answering.response_started and not answering.response_complete:
            self._closed_on_budget(budget)
            self._stop_answering()  # an answer is partway out: no clean place for this one
            self.transport.close()
            return
        request_id = uuid.uuid4().hex
        self._closed_on_budget(budget, request_id)
        self.transport.write(error_bytes(status, phrase, code, message, extra_headers, request_id))
        self._linger()

    def _linger(self) -> None:
        """Half-close, then drop what the client still sends until it closes, ``LINGER_S``
        pass or ``LINGER_BYTES`` have come (:mod:`service.api.connection_budget` says why)."""
        if self.transport.is_closing() or self._linger_until:
            return
        self._stop_answering()
        if not self.transport.can_write_eof():
            self.transport.close()
            return
        self.transport.write_eof()  # sent once the answer is; the client reads it, then EOF
        self._linger_until = self.loop.time() + LINGER_S
        self._linger_left = LINGER_BYTES
        self.flow.resume_reading()  # uvicorn may have paused reading behind a request
        self.clock.start(self.loop, self.connections)

    def _stop_answering(self) -> None:
        """The requests under way on this connection (the one being answered, those pipelined
        behind it) answer no more: the connection was said to close, and uvicorn would write
        after the half-close (which raises) or start the next pipelined request."""
        for cycle in (self._answering, self.cycle, *(cycle for cycle, _ in self.pipeline)):
            if cycle is not None and not cycle.response_complete:
                cycle.disconnected = True  # uvicorn's send and receive check it
                cycle.waiting_for_100_continue = False  # else receive writes "100 Continue"
                cycle.message_event.set()
        self.pipeline.clear()

    def _drop(self, size: int) -> None:
        """A read that came while lingering; the client's EOF closes the connection (uvicorn's
        ``eof_received`` returns nothing), the clock closes it after ``LINGER_S``."""
        self._linger_left -= size
        if self._linger_left < 0 and not self.transport.is_closing():
            self.transport.close()

    def _closed_on_budget(self, reason: str, request_id: str | None = None) -> None:
        self.metrics.connections_closed.labels(reason).inc()
        log.debug("closing %s: %s%s", self.client, reason, f" (answered, id={request_id})" if request_id else "")
