"""The two messages every image crosses the engine link in, packed with ``struct``.

Control messages (``hello``, ``slab``, ``acquire``, ``reload`` ...) are rare and stay JSON
(:mod:`service.ipc.channel`). ``submit`` and ``result`` go once per request each way, at
thousands a second; as JSON they cost both processes an encode and a parse of a dict, the
result's floats printed and read back as text. Packed, each is one ``struct`` call plus one
per image, and the floats cross bit for bit.

A third, ``part``, is rare (an admin's request, :meth:`EngineClient.collect`) but large: a
front end's share of what every front end holds (its ring of recent scores), which the
engine process relays to the front end that asked without parsing it (only the header is
rewritten), so a large gather never costs the process that forms every batch a JSON parse.

A packed frame's first byte is its kind, never ``{`` (which starts every JSON frame): the
channel tells the two apart by that byte alone.

``submit``: request id, the version's handle (a number the engine process gave on
``acquire``, so no path is sent per request), slab id, deadline (``time.monotonic()``
seconds; CLOCK_MONOTONIC is system-wide), then the slot of each image.

``result``: request id, then per image its outcome: a code, and for ``ok`` the score, the
batch size and the image's queue and batch run times; for an engine error, its message.
"""

from __future__ import annotations

import struct
from collections.abc import Sequence
from dataclasses import dataclass

SUBMIT = 1
RESULT = 2
PART = 3

# Outcome codes of an image (the client maps them back to its exceptions).
OK, QUEUE_FULL, CLOSED, DEADLINE, CANCELLED, ENGINE_ERROR, NOT_LOADED = range(7)

_SUBMIT = struct.Struct("<BQIId")  # kind, rid, handle, slab, deadline; then uint32 slots
_RESULT = struct.Struct("<BQH")  # kind, rid, image count; then the outcomes
_OUTCOME = struct.Struct("<BdIddH")  # code, score, batch size, queue ms, run ms, message bytes
_SCORED = struct.Struct("<BQHBdIddH")  # _RESULT then one _OUTCOME: a result of one image, no message
_PART = struct.Struct("<BQB")  # kind, gather id (or the asker's request id, relayed), last; then the payload
_MAX_MESSAGE = 1024  # an engine error's text, cut to this many bytes
MAX_IMAGES = 0xFFFF  # a result counts its images in 16 bits: a submit of more could not be answered

# What reading a malformed frame raises (a cut or padded frame, an empty one).
UNREADABLE = (ValueError, IndexError, struct.error)


@dataclass(slots=True)
class Submit:
    rid: int
    handle: int
    slab: int
    deadline: float
    slots: list[int]


@dataclass(slots=True)
class Outcome:
    code: int
    score: float = 0.0
    batch_size: int = 0
    queue_ms: float = 0.0
    run_ms: float = 0.0
    message: str = ""


def kind(frame: bytes) -> int:
    return frame[0]


def pack_submit(rid: int, handle: int, slab: int, deadline: float, slots: Sequence[int]) -> bytes:
    return _SUBMIT.pack(SUBMIT, rid, handle, slab, deadline) + struct.pack(f"<{len(slots)}I", *slots)


def unpack_submit(frame: bytes) -> Submit:
    _, rid, handle, slab, deadline = _SUBMIT.unpack_from(frame)
    count, rest = divmod(len(frame) - _SUBMIT.size, 4)
    if rest or not count:
        raise ValueError(f"submit frame of {len(frame)} bytes: no whole list of slots")
    if count > MAX_IMAGES:  # refused as unreadable: no result frame could carry its answer
        raise ValueError(f"submit frame of {count} slots: more than the {MAX_IMAGES} a result answers")
    return Submit(rid, handle, slab, deadline, list(struct.unpack_from(f"<{count}I", frame, _SUBMIT.size)))


def pack_result(rid: int, outcomes: Sequence[Outcome]) -> bytes:
    parts = [_RESULT.pack(RESULT, rid, len(outcomes))]
    for o in outcomes:
        text = o.message.encode()[:_MAX_MESSAGE] if o.message else b""
        parts.append(_OUTCOME.pack(o.code, o.score, o.batch_size, o.queue_ms, o.run_ms, len(text)))
        if text:
            parts.append(text)
    return b"".join(parts)


def pack_scored(rid: int, score: float, batch_size: int, queue_ms: float, run_ms: float) -> bytes:
    """``pack_result(rid, [Outcome(OK, score, batch_size, queue_ms, run_ms)])``, the same bytes,
    without the objects: the answer to a request of one image that ran."""
    return _SCORED.pack(RESULT, rid, 1, OK, score, batch_size, queue_ms, run_ms, 0)


def pack_part(ident: int, last: bool, payload: bytes) -> bytes:
    """One piece of a front end's answer to a gather (``payload``: opaque here, JSON in practice);
    ``last``: its final piece."""
    return _PART.pack(PART, ident, last) + payload


def unpack_part(frame: bytes) -> tuple[int, bool, bytes]:
    _, ident, last = _PART.unpack_from(frame)
    return ident, bool(last), frame[_PART.size:]


def readdress_part(frame: bytes, ident: int) -> bytes:
    """``frame`` with another id (the engine process relays a piece to the front end that asked,
    under that front end's request id): a header and a copy of the payload, nothing parsed."""
    _, _, last = _PART.unpack_from(frame)
    return _PART.pack(PART, ident, last) + memoryview(frame)[_PART.size:]


def unpack_result(frame: bytes) -> tuple[int, list[Outcome]]:
    _, rid, count = _RESULT.unpack_from(frame)
    at = _RESULT.size
    outcomes: list[Outcome] = []
    for _ in range(count):
        code, score, batch_size, queue_ms, run_ms, length = _OUTCOME.unpack_from(frame, at)
        at += _OUTCOME.size
        message = frame[at:at + length].decode(errors="replace") if length else ""
        at += length
        outcomes.append(Outcome(code, score, batch_size, queue_ms, run_ms, message))
    if at != len(frame):
        raise ValueError(f"result frame of {len(frame)} bytes: {len(frame) - at} bytes left over")
    return rid, outcomes
