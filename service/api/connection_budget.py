"""The budgets of an HTTP connection, below the app: a request's header bytes, the time its
headers and body take, the time a client may leave its answer untaken, the requests
pipelined on a connection, and how many connections are open.

uvicorn's httptools protocol keeps a request's line and headers in memory until they are
complete, whatever their size, and sets them no time limit. Measured on the server before
these budgets: one connection sending a 64 MB header grew the process by 64 MB (which glibc
kept), and 3,000 connections that sent half a request line and then nothing stayed open for
as long as they were watched (110 s), one file descriptor each. The body's bytes have their
budgets in the app (:mod:`service.api.uploads`, :mod:`service.api.body_limits`); this is what
the app does not see, where a client could spend the server's memory and descriptors
unbounded:

* **header bytes**: a request whose line and headers pass ``max_header_bytes`` is answered
  431 ``header_too_large`` and its connection closed. Bytes are counted per read while the
  headers are under way, so a request holds at most the limit plus a read or two (uvloop
  reads up to 256 KB at a time) however much it sends. A chunked body's trailers (header
  lines after its last chunk, which the parser holds as it does headers) have the same
  budget: uncounted, 60 MB of them grew the server by 770 MB before the body's deadline;
* **header time**: the line and headers must arrive within ``header_timeout_s`` of the
  request's first byte (or of the connection's opening, for its first request); else 408
  ``request_timeout`` and the connection closes. A connection that never sends a byte is
  closed then too, silently. Between requests uvicorn's own keep-alive timeout applies;
* **body time**: a request's body must arrive within ``body_timeout_s`` (the request
  deadline, ``MSFLOW_REQUEST_DEADLINE_MS``) of its headers' end; else 408 ``request_timeout``
  if nothing was answered yet, and the connection closes either way. uvicorn sets a body no
  time limit: a route that reads a JSON body waited for it for good, and once any route had
  answered, a client sending the rest of a declared body a byte at a time kept the connection
  for as long as it went on (uvicorn's keep-alive timer is cancelled by every read and armed
  only when an answer completes). ``POST /v1/inspect`` answers its own 408 at the deadline
  (counted from the request's arrival, so before this); this closes its connection when the
  body is still coming after that;
* **answer time**: a client that takes none of its answer's bytes (its TCP window shut) for
  ``body_timeout_s`` has its connection aborted; one that reads slowly keeps it. uvicorn's app
  task waited for the client to read on, for good, holding its answer, the file or stream
  behind it and the kernel's socket buffers; nginx's ``send_timeout`` is the same rule;
* **connections**: one more than ``max_connections`` open in this process is answered 503
  ``too_many_connections`` (``Retry-After: 1``) as soon as it opens, before it reads a byte.
  Answering costs a descriptor for the answer's linger (below), so at most
  :attr:`ConnectionBudget.refusal_slots` connections beyond the budget are answered at once;
  one more is closed without a word (a full server cannot answer every connection it refuses);
* **pipelined requests**: uvicorn parses every request a read holds and queues those behind
  the one being answered, so a read of small pipelined requests held about 1 MB of the
  server per connection; more than ``MAX_PIPELINED`` waiting is answered 429
  ``too_many_pipelined_requests`` and the connection closes.

Every refusal writes its answer, half-closes the connection and then reads and drops what
the client still sends (a *lingering close*, as nginx and Apache do), until the client
closes, ``LINGER_S`` pass or ``LINGER_BYTES`` have been dropped. Closing a socket with unread
bytes in it resets the connection, and a client still writing its request sees the reset,
not the answer: a client that wrote a 3 MB header and then read got a reset four times in
five before, the 431 now.

Separate from :mod:`service.api.connections`, which keeps these budgets on uvicorn's
protocol: this is what they are, where their figures come from, and why each exists.
"""

from __future__ import annotations

from dataclasses import dataclass

from service.config import Settings

# Requests parsed and waiting on one connection behind the one being answered (HTTP/1.1
# pipelining, which browsers and HTTP libraries do not use): beyond, 429 and the connection closes.
MAX_PIPELINED = 16

# A refused connection's lingering close (module docstring): what the client may still send,
# and for how long, before the connection is closed anyway.
LINGER_S = 2.0
LINGER_BYTES = 8 * 1024 * 1024


@dataclass(frozen=True)
class ConnectionBudget:
    """What one connection may spend before the app sees its request, and how many may be open."""

    max_header_bytes: int
    header_timeout_s: float
    max_connections: int
    body_timeout_s: float

    @classmethod
    def from_settings(cls, settings: Settings) -> ConnectionBudget:
        return cls(settings.max_header_bytes, settings.header_timeout_s, settings.max_connections,
                   settings.request_deadline_ms / 1e3)

    @property
    def refusal_slots(self) -> int:
        """Connections past ``max_connections`` that are answered 503 while they linger; past
        these a connection is closed unanswered, so descriptors stay bounded under a flood."""
        return max(8, self.max_connections // 16)
