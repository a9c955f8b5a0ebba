"""The HTTP layer's per-request instrumentation, as pure ASGI middleware."""

from __future__ import annotations

import re
import time
import uuid

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from service.metrics import UNKNOWN, ServiceMetrics

_REQUEST_ID = re.compile(r"^[A-Za-z0-9._:-]{1,128}$")


class RequestMetricsMiddleware:
    """Per-request instrumentation: a request id (the client's ``X-Request-ID`` if sane, else
    a new one; echoed in the answer), and latency and status by route template.

    Pure ASGI rather than BaseHTTPMiddleware: no extra task per request, and exceptions pass
    through untouched to the app's error handler (counted here as 500).
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
        request_id = incoming if _REQUEST_ID.match(incoming) else uuid.uuid4().hex
        # Routes read these from request.scope["state"] (deadline start, response body id).
        scope.setdefault("state", {}).update(request_id=request_id, started=started)
        status = 500

        async def send_with_id(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                message["headers"] = [*message.get("headers", []), (b"x-request-id", request_id.encode())]
            await send(message)

        try:
            await self.app(scope, receive, send_with_id)
        finally:
            endpoint = getattr(scope.get("route"), "path", "unmatched")
            category = scope.get("path_params", {}).get("category", "")
            # Only categories of the store become label values: clients cannot grow the series.
            self.metrics.observe_request(endpoint, category if self.is_known(category) else UNKNOWN, status,
                                         time.monotonic() - started)

    def is_known(self, category: str) -> bool:
        return self.metrics.is_known(category)
