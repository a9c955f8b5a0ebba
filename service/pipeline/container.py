"""The framing of an upload, counted before any decoder walks it: PNG chunks, JPEG segments.

Pillow walks a PNG's chunks (all of them: before the pixels at open, after them at load) and
a JPEG's segments up to its first scan in Python, about two microseconds each. An upload
can be made of nothing else: 20 MB of empty chunks took 4.4 s to probe and 6.2 s to decode
(a 20 MB JPEG of empty comments 4.8 + 4.9 s), most of it holding the GIL, against about half
a second for a real 20 MB image. So every PNG and JPEG is counted first, by lengths only,
and refused (422) past its budget: 1024 chunks or segments, and one more per KiB of upload
beyond that. Encoders cut the pixel stream into 8 to 64 KiB chunks (libpng, Pillow, Java,
Go) and write a few dozen segments at most (an ICC profile may take up to 255), so real
files stay far below it, while a hostile one costs about what any upload of its size costs.

Placement (:mod:`service.pipeline.placement`) uses the same count, with a far lower bound,
to decide whether an upload is small enough to decode on the event loop.
"""

from __future__ import annotations

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
JPEG_SOI = b"\xff\xd8"
_JPEG_SOS = 0xDA
_JPEG_UNSIZED = frozenset({0x01, *range(0xD0, 0xD8)})  # markers without a length (TEM, RSTn)
BASE_SEGMENTS = 1024
BYTES_PER_EXTRA_SEGMENT = 1024


def segment_budget(size: int) -> int:
    """How many chunks or segments an upload of ``size`` bytes may hold (module docstring)."""
    return BASE_SEGMENTS + size // BYTES_PER_EXTRA_SEGMENT


def container_segments(data: bytes, stop_after: int) -> int | None:
    """How many chunks a PNG holds (to ``IEND``) or segments a JPEG holds before its first
    scan (SOI not counted), counted up to ``stop_after + 1``; None for another format or a
    walk that runs off the data (the decoders judge those). Lengths only: nothing is read or
    checked but the framing."""
    view = memoryview(data)
    count = 0
    if data.startswith(PNG_SIGNATURE):
        at = len(PNG_SIGNATURE)
        while at + 12 <= len(data) and count <= stop_after:
            count += 1
            if view[at + 4:at + 8] == b"IEND":
                return count
            at += 12 + int.from_bytes(view[at:at + 4], "big")
        return count if count > stop_after else None
    if data.startswith(JPEG_SOI):
        at = len(JPEG_SOI)
        while at + 4 <= len(data) and count <= stop_after:
            if data[at] != 0xFF:
                return None
            marker = data[at + 1]
            if marker == 0xFF:  # a fill byte before a marker
                at += 1
                continue
            count += 1
            if marker == _JPEG_SOS:
                return count
            at += 2 if marker in _JPEG_UNSIZED else 2 + int.from_bytes(view[at + 2:at + 4], "big")
        return count if count > stop_after else None
    return None


def over_budget(data: bytes) -> str | None:
    """Why ``data`` holds more chunks or segments than its budget allows, or None."""
    budget = segment_budget(len(data))
    count = container_segments(data, budget)
    if count is None or count <= budget:
        return None
    kind = "PNG chunks" if data.startswith(PNG_SIGNATURE) else "JPEG segments before its first scan"
    return (f"holds more than {budget} {kind} (the budget: {BASE_SEGMENTS}, plus one per "
            f"{BYTES_PER_EXTRA_SEGMENT} bytes of upload)")
