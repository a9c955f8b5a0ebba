"""Headers every answer carries, as pure ASGI middleware (no task per request).

The console page set its own (no framing, no sniffing), but the same origin served other
HTML without them: the console's file again under ``/static``, the OpenAPI explorer under
``/docs``. Framed by another site, the console's admin buttons could be clicked through
an invisible frame (reproduced on a loopback server with the development switch: a
threshold moved by three clicks on another site's page). So every answer refuses framing
and MIME sniffing, and ``GET /v1/...`` answers, which carry what a key was needed for,
tell shared caches not to keep them (the key travels in ``X-API-Key``, not
``Authorization``, so a cache does not know the answer is authenticated) unless the route
said otherwise (heatmap links: private, a minute).
"""

from __future__ import annotations

from starlette.types import ASGIApp, Message, Receive, Scope, Send

EVERY_ANSWER = [(b"x-frame-options", b"DENY"), (b"x-content-type-options", b"nosniff")]
# Answers made outside this middleware write these themselves: the connection layer's refusals
# (service/api/connections.py) and Starlette's outermost 500 (service/api/errors.py).
EVERY_ANSWER_HEADERS = {name.decode(): value.decode() for name, value in EVERY_ANSWER}
_NOT_STORED = (b"cache-control", b"no-store")


class SecurityHeadersMiddleware:
    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        keep_out_of_caches = scope["method"] == "GET" and scope["path"].startswith("/v1/")

        async def send_with_headers(message: Message) -> None:
            if message["type"] == "http.response.start":
                headers = [*message.get("headers", []), *EVERY_ANSWER]
                if keep_out_of_caches and not any(name.lower() == b"cache-control" for name, _ in headers):
                    headers.append(_NOT_STORED)
                message["headers"] = headers
            await send(message)

        await self.app(scope, receive, send_with_headers)
