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

The uploads' bytes have a budget per process too (:class:`UploadBytes`,
``MSFLOW_MAX_INFLIGHT_UPLOAD_BYTES``): a request's body is held whole before any of its images
is priced in pixels, and 40 clients each sending a 20 MB image grew the server by 760 MB (at
1,024 connections, 20 GB). Each upload request carries a :class:`UploadCharge` (in
``scope["state"]``), which the upload reader takes from as it reads (the declared length up
front); what it took goes back once the request's answer is out. Past the budget: 503
``server_busy`` + Retry-After, as the pixel budget answers, before the bytes are read
(:class:`UploadBytesBusy`: ``msflow_rejections_total{reason="upload_bytes"}``); the bytes held
and the budget are ``msflow_upload_bytes{kind=held|budget}``.
"""

from __future__ import annotations

from collections.abc import Callable

from starlette.exceptions import HTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from service.api.errors import error_response
from service.pipeline.admission import ServerBusy

JSON_BODY_BYTES = 64 * 1024
UPLOAD_PATHS = ("/v1/inspect/", "/v1/jobs/")  # their routes read and bound their bodies themselves


class UploadBytesBusy(ServerBusy):
    """The process holds its budget of upload bytes: answered as the pixel budget's 503 (the
    client's remedy is the same), counted apart (``reason="upload_bytes"``): which budget
    refuses tells the operator what to change."""

    reason = "upload_bytes"


class UploadBytes:
    """The bytes of uploads this process holds, against ``capacity`` (one event loop: no lock).
    ``on_change`` is called with the bytes held after every change (the held gauge)."""

    def __init__(self, capacity: int, on_change: Callable[[int], None] | None = None) -> None:
        self.capacity, self.in_flight = capacity, 0
        self._on_change = on_change

    def add(self, size: int) -> None:
        self.in_flight += size
        if self._on_change is not None:
            self._on_change(self.in_flight)


class UploadCharge:
    """What one upload request has taken from :class:`UploadBytes`."""

    def __init__(self, budget: UploadBytes) -> None:
        self.budget, self.held = budget, 0

    def grow_to(self, size: int) -> None:
        """Hold ``size`` bytes in all (no less than held already), or raise :class:`ServerBusy`."""
        more = size - self.held
        if more <= 0:
            return
        budget = self.budget
        if budget.in_flight + more > budget.capacity:
            raise UploadBytesBusy(f"this server process is reading {budget.in_flight / 2**20:.0f} MiB of uploads of its "
                             f"{budget.capacity / 2**20:.0f} MiB (MSFLOW_MAX_INFLIGHT_UPLOAD_BYTES); retry shortly")
        budget.add(more)
        self.held = size

    def release(self) -> None:
        if self.held:
            self.budget.add(-self.held)
        self.held = 0


class BodyLimitMiddleware:
    """At most ``limit`` bytes of body for any request whose path is not an upload route's;
    an upload route's request gets an :class:`UploadCharge` of ``uploads`` for its life."""

    def __init__(self, app: ASGIApp, limit: int = JSON_BODY_BYTES, exempt: tuple[str, ...] = UPLOAD_PATHS,
                 uploads: UploadBytes | None = None) -> None:
        self.app, self.limit, self.exempt, self.uploads = app, limit, exempt, uploads

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        if scope["path"].startswith(self.exempt):
            if self.uploads is None:
                await self.app(scope, receive, send)
                return
            charge = scope.setdefault("state", {})["upload_charge"] = UploadCharge(self.uploads)
            try:
                await self.app(scope, receive, send)
            finally:
                charge.release()
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
