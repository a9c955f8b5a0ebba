"""Large answers hold their pixels until their client has taken them.

A request's pixel ticket (:mod:`service.pipeline.admission`) used to go back as soon as its
answer was built, before any of it was sent: uvicorn writes a whole body into the connection's
buffer at once, so a client reading slowly (a byte now and then keeps its connection:
:mod:`service.api.connection_budget`) held all of it in the server, and the budget counted
none of it. Eight clients each reading a 90 MB answer (twelve 267 KB JPEGs inspected with
original-size overlays) at 2 KB/s held a gigabyte past the budget, while the budget, empty,
admitted as much again; nothing bounded it but the connections open.

So an answer past :data:`HELD_BYTES` is sent in chunks, each once the client has taken the last
(uvicorn's flow control), and the request's ticket stays admitted until the last chunk is out
or the client is gone (cut off as before when it takes nothing for the request deadline). An
answer worth more than its ticket (results from the cache, which no ticket priced) takes the
rest of the pixel budget first, at the bytes one priced pixel stands for
(:data:`~service.pipeline.decode_memory.PRICED_PIXEL_BYTES`), or is 503 ``server_busy`` with
Retry-After, as a request is when the budget is taken. Slow readers thus make the server shed
load rather than grow; smaller answers are sent as before.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

from fastapi.responses import Response
from starlette.types import Receive, Scope, Send

from service.pipeline.admission import PixelBudget, Ticket
from service.pipeline.decode_memory import PRICED_PIXEL_BYTES

HELD_BYTES = 256 * 1024  # answers up to this are sent whole and hold nothing once built
CHUNK_BYTES = 256 * 1024


def release(tickets: list[Ticket]) -> None:
    """The answer is out (or will never be): its pixels go back."""
    while tickets:
        tickets.pop().call_done()


def held_answer(content: bytes, media_type: str, tickets: list[Ticket], budget: PixelBudget,
                headers: Mapping[str, str] | None = None) -> Response:
    """The answer for ``content``, holding ``tickets`` (the request's, from ``hold=``) until its
    client has taken it; raises :class:`~service.pipeline.admission.ServerBusy` (``tickets``
    released) when the budget has no room for what they do not cover."""
    try:
        if len(content) <= HELD_BYTES:
            release(tickets)
            return Response(content, media_type=media_type, headers=headers)
        uncovered = math.ceil(len(content) / PRICED_PIXEL_BYTES) - sum(ticket.pixels for ticket in tickets)
        if uncovered > 0:
            extra = budget.admit(uncovered, tickets[0].category if tickets else "")
            extra.call_started()  # released like the request's: by call_done
            extra.close()
            tickets.append(extra)
    except BaseException:
        release(tickets)
        raise
    return _HeldAnswer(content, media_type, tickets, headers)


class _HeldAnswer(Response):
    def __init__(self, content: bytes, media_type: str, tickets: list[Ticket],
                 headers: Mapping[str, str] | None) -> None:
        super().__init__(content, media_type=media_type, headers=headers)
        self._tickets = tickets

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await send({"type": "http.response.start", "status": self.status_code, "headers": self.raw_headers})
            body = memoryview(self.body)
            for at in range(0, len(body), CHUNK_BYTES):
                # uvicorn waits here while the client has not taken what was written (or returns
                # at once once it is gone)
                await send({"type": "http.response.body", "body": bytes(body[at:at + CHUNK_BYTES]),
                            "more_body": at + CHUNK_BYTES < len(body)})
        finally:
            release(self._tickets)
