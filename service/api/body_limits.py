"""Request bodies under budget before the app reads them: every route but the image uploads
takes at most ``JSON_BODY_BYTES``.

FastAPI reads and parses a route's whole JSON body before any dependency runs (the API key
included) and sets no limit of its own: a client without a key sent a 100 MB JSON body to the
review-label and threshold routes, and the server held 232 MB for it (the bytes and the parsed
string, glibc keeping them) before answering 403. Those bodies are a few hundred bytes: a
label, a note, a threshold. The image routes (``POST /v1/inspect/...``, ``/v1/jobs/...``)
read their bodies themselves, streamed under ``MSFLOW_MAX_REQUEST_BYTES``
(:mod:`service.api.uploads`), and pass through here untouched.

A declared ``Content-Length`` over the budget is answered 413 before the app runs; a body
without one (chunked) is counted as the app reads it, and the read fails with 413 at the
budget. Both in the API's error shape (``request_too_large``). Pure ASGI, as
:mod:`service.api.request_metrics`: the uploads' path costs one prefix test.
"""

from __future__ import annotations

from starlette.exceptions import HTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from service.api.errors import error_response

JSON_BODY_BYTES = 64 * 1024
UPLOAD_PATHS = ("/v1/inspect/", "/v1/jobs/")  # their routes read and bound their bodies themselves


class BodyLimitMiddleware:
    """At most ``limit`` bytes of body for any request whose path is not an upload route's."""

    def __init__(self, app: ASGIApp, limit: int = JSON_BODY_BYTES, exempt: tuple[str, ...] = UPLOAD_PATHS) -> None:
        self.app, self.limit, self.exempt = app, limit, exempt

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["path"].startswith(self.exempt):
            await self.app(scope, receive, send)
            return
        message = f"this route takes a body of at most {self.limit} bytes"
        declared = dict(scope["headers"]).get(b"content-length", b"")
        if declared.isdigit() and int(declared) > self.limit:
            await error_response(413, "request_too_large", message)(scope, receive, send)
            return
        read = 0

        async def receive_within_limit() -> Message:
            nonlocal read
            incoming = await receive()
            if incoming["type"] == "http.request":
                read += len(incoming.get("body", b""))
                if read > self.limit:
                    raise HTTPException(413, message)  # FastAPI lets it through its body parsing
            return incoming

        await self.app(scope, receive_within_limit, send)
