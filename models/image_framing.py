"""The framing of an image file, counted before any decoder walks it: PNG chunks, JPEG
segments, a TIFF's tags and strips, a run-length BMP's bytes and pixels.

One of the server's rules on an upload (:mod:`models.image_acceptance`), here in ``models`` so
that the trainer refuses what the server refuses (``models.preprocessing.open_image``): a
file trained on that the line's server answers 422 is a mismatch found only in production.

Pillow walks a PNG's chunks (all of them: before the pixels at open, after them at load) and
a JPEG's segments up to its first scan in Python, about two microseconds each. An upload
can be made of nothing else: 20 MB of empty chunks took 4.4 s to probe and 6.2 s to decode
(a 20 MB JPEG of empty comments 4.8 + 4.9 s), most of it holding the GIL, against about half
a second for a real 20 MB image. So every PNG and JPEG is counted first, by lengths only,
and refused (422) past its budget: 1024 chunks or segments, and one more per KiB of upload
beyond that. Encoders cut the pixel stream into 8 to 64 KiB chunks (libpng, Pillow, Java,
Go) and write a few dozen segments at most (an ICC profile may take up to 255), so real
files stay far below it, while a hostile one costs about what any upload of its size costs.

A JPEG's scans are counted too: libjpeg passes over every block of the image once per scan,
however little data the scan holds, so a 256² JPEG with 5,000 repeated scans (1 MB) took
25 ms to decode, and the same at 20 MB and 40 megapixels would take minutes of a decode
thread. Encoders write about 10 (libjpeg's default progression; mozjpeg's a few more); past
``MAX_JPEG_SCANS`` the upload is refused (422). Only a file that may hold several scans is
walked (progressive, or a first scan without every component: libjpeg refuses a second scan
in any other), marker by marker from its first scan to the end of the image: entropy-coded
data holds no marker (a 0xFF there is followed by 0x00 or a restart marker), so a regular
expression finds the next one at C speed; segments are skipped by their lengths (an EXIF
thumbnail's scans are not the image's) and what follows the end of the image (a phone's
motion-photo video) is not read.

A TIFF is counted too, its first image (the one Pillow opens): the tags of its first IFD, which
Pillow reads one by one in Python, and its strips or tiles (the most values its offset and
byte-count tags hold). Pillow makes a Python tuple per strip when it opens a file, then passes
over each one as it decodes: a 16 MB TIFF of two pixels in 4 million one-row strips (two bytes
an offset, all pointing at the same byte) grew the server by a gigabyte and kept a decode
thread busy past the deadline, priced as two pixels. Encoders cut an image into strips of 8 KiB
or more, or 256 x 256 tiles: a first IFD may hold the tags of the budget above, and an image as
many strips or tiles, or one per 256 pixels if more (a row of 256, TIFF's smallest tile: a
compressed file may be cut finer than its bytes, never that fine).

A BMP compressed with run lengths (BI_RLE8 = 1, BI_RLE4 = 2 in its BITMAPINFOHEADER's
compression field) is decoded by Pillow in Python, in slices of the GIL: up to 230 ns per byte
of the upload (runs of one pixel) and 112 ns per pixel of the image (a row ended early is padded
a byte at a time; RLE4 runs are expanded a pixel at a time), measured here with Pillow 13. A
20 MiB RLE8 of one-pixel runs kept a decode thread busy for 7.5 s, and a 16 KB one of rows
ended after their first pixel can cost as much at 40 megapixels. So such a BMP may cost at most
:data:`MAX_RLE_BMP_WORK` work units, a byte of upload or two pixels of the header's size each:
about a quarter second of a decode thread at worst, room for an RLE image of a megapixel or so;
past it, 422, with what to send instead (an uncompressed BMP or a PNG: both decode in C).

Placement (:mod:`service.pipeline.placement`) uses the same count, with a far lower bound,
to decide whether an upload is small enough to decode on the event loop.
"""

from __future__ import annotations

import re

from models.image_acceptance import max_image_pixels


JPEG_SOI = b"\xff\xd8"
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
_JPEG_SOS = 0xDA
_JPEG_UNSIZED = frozenset({0x01, *range(0xD0, 0xD8)})  # markers without a length (TEM, RSTn)
BASE_SEGMENTS = 1024
BYTES_PER_EXTRA_SEGMENT = 1024
MAX_JPEG_SCANS = 256
_JPEG_EOI = 0xD9
_JPEG_SOF = frozenset(range(0xC0, 0xD0)) - {0xC4, 0xC8, 0xCC}  # frame headers (not DHT, JPG, DAC)
_JPEG_PROGRESSIVE_SOF = frozenset({0xC2, 0xC6, 0xCA, 0xCE})
_JPEG_MARKER = re.compile(rb"\xff[^\x00\xd0-\xd7\xff]")  # a marker: not stuffing, not a restart, not fill
_TIFF_CLASSIC = (b"II*\x00", b"MM\x00*")
_TIFF_BIG = (b"II+\x00", b"MM\x00+")
_TIFF_STRIP_TAGS = frozenset({273, 279, 324, 325})  # StripOffsets, StripByteCounts, TileOffsets, TileByteCounts
_TIFF_INT_BYTES = {3: 2, 4: 4, 16: 8}  # SHORT, LONG, LONG8
MIN_PIXELS_PER_STRIP = 256  # a 256-pixel row, a 16 x 16 tile (TIFF's smallest)
BMP_SIGNATURE = b"BM"
_BMP_RLE = {1: "RLE8", 2: "RLE4"}  # BITMAPINFOHEADER's compression: BI_RLE8, BI_RLE4
MAX_RLE_BMP_WORK = 1 << 20  # bytes of upload + pixels / 2: ~0.24 s of Pillow's Python decoder at worst


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
        return _jpeg_segments(data, stop_after)[0]
    return None


def _jpeg_segments(data: bytes, stop_after: int) -> tuple[int | None, int, bool]:
    """(segments up to and including the first SOS, or None as above; where that SOS starts;
    whether the image may hold more scans: progressive, or a first scan without every
    component. libjpeg refuses a second scan in any other file.)"""
    view = memoryview(data)
    at, count, progressive, components = len(JPEG_SOI), 0, False, 0
    while at + 4 <= len(data) and count <= stop_after:
        if data[at] != 0xFF:
            return None, at, False
        marker = data[at + 1]
        if marker == 0xFF:  # a fill byte before a marker
            at += 1
            continue
        count += 1
        if marker in _JPEG_SOF and at + 10 <= len(data):
            progressive, components = marker in _JPEG_PROGRESSIVE_SOF, data[at + 9]
        if marker == _JPEG_SOS:
            in_scan = data[at + 4] if at + 5 <= len(data) else 0
            return count, at, progressive or in_scan < components
        at += 2 if marker in _JPEG_UNSIZED else 2 + int.from_bytes(view[at + 2:at + 4], "big")
    return (count if count > stop_after else None), at, False


def jpeg_multi_scan(data: bytes) -> bool:
    """Whether the JPEG ``data`` may hold several scans (progressive, or a first scan without
    every component): libjpeg then gathers the whole image's coefficients before any pixel
    (the server prices that buffer). False for another format or framing that leads to no scan."""
    if not data.startswith(JPEG_SOI):
        return False
    return _jpeg_segments(data, segment_budget(len(data)))[2]


def jpeg_scans(data: bytes, stop_after: int) -> int:
    """How many scans a JPEG holds from its first to the end of the image (EOI, or the end of
    the data), counted up to ``stop_after + 1``; 0 where its segments do not lead to a scan."""
    count, first_scan, _ = _jpeg_segments(data, segment_budget(len(data)))
    return 0 if count is None else _scans_from(data, first_scan, stop_after)


def _scans_from(data: bytes, at: int, stop_after: int) -> int:
    scans = 0
    while scans <= stop_after and at + 4 <= len(data):
        marker = data[at + 1]
        if marker == _JPEG_EOI:
            break
        scans += marker == _JPEG_SOS
        # Past the marker and its segment (for a scan, its header); then the next marker,
        # beyond a scan's entropy-coded data, which holds none.
        at += 2 if marker in _JPEG_UNSIZED else 2 + int.from_bytes(data[at + 2:at + 4], "big")
        found = _JPEG_MARKER.search(data, at)
        if found is None:
            break
        at = found.start()
    return scans


def tiff_framing(data: bytes, stop_after: int) -> tuple[int, int, int] | None:
    """A TIFF's first image as Pillow opens it: (tags in its IFD, strips or tiles it is cut
    into: the most values its offset and byte-count tags hold, width x height its tags state);
    None for another format or a header that runs off the data (the decoder judges those).
    Past ``stop_after`` tags nothing more is read (strips and pixels 0), nor past the data."""
    head = data[:4]
    if head in _TIFF_CLASSIC:
        offset_at, count_bytes, entry_bytes, value_bytes = 4, 2, 12, 4
    elif head in _TIFF_BIG:  # BigTIFF: 8-byte offsets and counts, 20-byte entries
        offset_at, count_bytes, entry_bytes, value_bytes = 8, 8, 20, 8
    else:
        return None
    order = "little" if head.startswith(b"II") else "big"
    if len(data) < offset_at + value_bytes:
        return None
    at = int.from_bytes(data[offset_at:offset_at + value_bytes], order)
    if at + count_bytes > len(data):
        return None
    entries = int.from_bytes(data[at:at + count_bytes], order)
    if entries > stop_after:
        return entries, 0, 0
    at += count_bytes
    strips, size = 0, {256: 0, 257: 0}
    for entry in range(at, at + min(entries, (len(data) - at) // entry_bytes) * entry_bytes, entry_bytes):
        tag = int.from_bytes(data[entry:entry + 2], order)
        if tag in _TIFF_STRIP_TAGS:
            strips = max(strips, int.from_bytes(data[entry + 4:entry + 4 + value_bytes], order))
        elif tag in size:  # ImageWidth, ImageLength: SHORT, LONG or LONG8, held in the entry
            width = _TIFF_INT_BYTES.get(int.from_bytes(data[entry + 2:entry + 4], order), 0)
            value_at = entry + 4 + value_bytes
            size[tag] = int.from_bytes(data[value_at:value_at + width], order) if width else 0
    return entries, strips, size[256] * size[257]


def bmp_rle(data: bytes) -> tuple[str, int] | None:
    """For a run-length compressed BMP, ("RLE8" or "RLE4", width x height its header states);
    None for another format or compression, or an OS/2 1.x header (it has no compression)."""
    if not data.startswith(BMP_SIGNATURE) or len(data) < 34:
        return None
    if int.from_bytes(data[14:18], "little") < 40:  # BITMAPCOREHEADER: 12 bytes, uncompressed
        return None
    kind = _BMP_RLE.get(int.from_bytes(data[30:34], "little"))
    if kind is None:
        return None
    width = int.from_bytes(data[18:22], "little", signed=True)
    height = int.from_bytes(data[22:26], "little", signed=True)  # negative: stored top-down
    return kind, abs(width) * abs(height)


def over_budget(data: bytes) -> str | None:
    """Why ``data`` holds more chunks, segments or scans than its budget allows, or None."""
    budget = segment_budget(len(data))
    if data.startswith(PNG_SIGNATURE):
        count = container_segments(data, budget)
        kind = "PNG chunks"
    elif data.startswith(JPEG_SOI):
        count, first_scan, multi_scan = _jpeg_segments(data, budget)
        # Only a multi-scan file can repeat scans; the walk passes over its entropy-coded data
        # (about 0.3 us per KB), which a single-scan file (most of them) does not pay.
        if (multi_scan and count is not None and count <= budget
                and _scans_from(data, first_scan, MAX_JPEG_SCANS) > MAX_JPEG_SCANS):
            return (f"holds more than {MAX_JPEG_SCANS} JPEG scans (the decoder passes over the whole image "
                    "once per scan)")
        kind = "JPEG segments before its first scan"
    elif (framing := tiff_framing(data, budget)) is not None:
        count, strips, pixels = framing
        kind = "TIFF tags in its first image"
        # Pillow makes the strips before it checks the pixels: a size claimed past the limit earns none
        strip_budget = max(budget, min(pixels, max_image_pixels()) // MIN_PIXELS_PER_STRIP)
        if count <= budget and strips > strip_budget:
            return (f"is cut into more than {strip_budget} TIFF strips or tiles (the budget: {BASE_SEGMENTS} plus one "
                    f"per {BYTES_PER_EXTRA_SEGMENT} bytes of upload, or one per {MIN_PIXELS_PER_STRIP} pixels of "
                    "the image if more)")
    elif (rle := bmp_rle(data)) is not None:
        kind, pixels = rle
        if len(data) + pixels // 2 > MAX_RLE_BMP_WORK:
            return (f"is an {kind}-compressed BMP of {len(data):,} bytes and {pixels:,} pixels, more than the "
                    f"run-length decoder may take ({MAX_RLE_BMP_WORK:,} bytes of upload plus half its pixels: "
                    "Pillow decodes it in Python, a quarter second at that size): send it as an uncompressed BMP "
                    "or a PNG instead")
        return None
    else:
        return None
    if count is not None and count > budget:
        return (f"holds more than {budget} {kind} (the budget: {BASE_SEGMENTS}, plus one per "
                f"{BYTES_PER_EXTRA_SEGMENT} bytes of upload)")
    return None
