"""The HTTP layer's per-request instrumentation, as pure ASGI middleware: the request id,
latency and status by route, and the access log's line."""

from __future__ import annotations

import logging
import re
import time
import uuid

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from service.metrics import UNKNOWN, ServiceMetrics

_REQUEST_ID = re.compile(r"^[A-Za-z0-9._:-]{1,128}$")

# The access log: one line per request, written here (uvicorn's own is off, service/server.py,
# which gives this logger its handler: UTC time, then the line). A line is the client, the
# request (its target cut at TARGET_MAX characters), the status as the metrics count it (499: the
# client left first), the latency in ms and the request id.
access_log = logging.getLogger("msflow.access")
ACCESS_LINE = '%s:%s "%s %s" %d %.2f ms id=%s'
TARGET_MAX = 256  # characters of path and query in a line; a 64 KiB query must not fill the rotated logs


# Each byte as a line shows it: printable ASCII as itself, but for the quote that ends the field
# and the backslash that starts an escape; every other byte \xNN.
_SHOWN = [chr(b) if 0x20 <= b < 0x7F and b not in b'"\\' else f"\\x{b:02x}" for b in range(256)]


def request_target(scope: Scope) -> str:
    """The request's path and query as sent (percent-encoded, not decoded), in at most
    :data:`TARGET_MAX` characters, then ``...(+N bytes)`` for the bytes left out; a byte outside
    printable ASCII (or a ``"`` or ``\\``) shows as ``\\xNN``, so that a line is one line."""
    target = scope.get("raw_path") or scope["path"].encode("utf-8")
    query = scope.get("query_string")
    if query:
        target += b"?" + query
    text = target[:TARGET_MAX].decode("latin-1")
    if text.isascii() and text.isprintable() and '"' not in text and "\\" not in text:
        shown = len(text)  # the common case: C scans of at most TARGET_MAX characters
    else:
        pieces, width = [], 0
        for byte in target:  # a hostile or broken client's: at most TARGET_MAX turns
            piece = _SHOWN[byte]
            if width + len(piece) > TARGET_MAX:
                break
            pieces.append(piece)
            width += len(piece)
        text, shown = "".join(pieces), len(pieces)
    if shown < len(target):
        return f"{text}...(+{len(target) - shown} bytes)"
    return text


# A client address as uvicorn gives it: an IP, or what a trusted proxy's X-Forwarded-For said
# (uvicorn believes loopback peers by default), which is any text the proxy passed on:
# `X-Forwarded-For: 10.9.9.9:1 "GET /v1/models/brick/reload" 200 1.00 ms id=x` wrote a forged
# request into the line. Outside an address's characters, each byte shows as \xNN.
_ADDRESS = re.compile(r"[0-9A-Za-z.:%_\[\]-]{1,64}")  # fullmatch: $ would let a final newline in


def client_address(host: object) -> str:
    text = str(host)
    if _ADDRESS.fullmatch(text):
        return text
    return "".join(c if _ADDRESS.fullmatch(c) else "".join(f"\\x{b:02x}" for b in c.encode()) for c in text[:64])


class RequestMetricsMiddleware:
    """Per-request instrumentation: a request id (the client's ``X-Request-ID`` if sane, else
    a new one; echoed in the answer), latency and status by route template, and the access
    log's line (when ``msflow.access`` is enabled for INFO; nothing is formatted otherwise).

    Pure ASGI rather than BaseHTTPMiddleware: no extra task per request, and exceptions pass
    through untouched to the app's error handler (counted and logged here as 500).
    """

    def __init__(self, app: ASGIApp, metrics: ServiceMetrics) -> None:
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.monotonic()
        incoming = dict(scope["headers"]).get(b"x-request-id", b"").decode("latin-1")
        request_id = incoming if _REQUEST_ID.fullmatch(incoming) else uuid.uuid4().hex
        # Routes read these from request.scope["state"] (deadline start, response body id).
        scope.setdefault("state", {}).update(request_id=request_id, started=started)
        status = 500  # what an exception leaves: the outermost handler answers it 500

        async def send_with_id(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                message["headers"] = [*message.get("headers", []), (b"x-request-id", request_id.encode())]
            await send(message)

        try:
            await self.app(scope, receive, send_with_id)
        finally:
            elapsed = time.monotonic() - started
            endpoint = getattr(scope.get("route"), "path", "unmatched")
            category = scope.get("path_params", {}).get("category", "")
            # Only categories of the store become label values: clients cannot grow the series.
            self.metrics.observe_request(endpoint, category if self.is_known(category) else UNKNOWN, status, elapsed)
            # 499 (the error handlers' answer to a client gone: nobody reads it, uvicorn writes
            # nothing) is logged like any status: uvicorn's access log had no line for it.
            if access_log.isEnabledFor(logging.INFO):
                client = scope.get("client") or ("-", "-")
                access_log.info(ACCESS_LINE, client_address(client[0]), client[1], scope["method"],
                                request_target(scope), status, elapsed * 1e3, request_id)

    def is_known(self, category: str) -> bool:
        return self.metrics.is_known(category)
