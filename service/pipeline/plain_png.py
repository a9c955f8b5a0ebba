"""Plain 8-bit RGB PNGs decoded by libspng, their pixel stream inflated by ISA-L.

A PNG is lossless, so any correct decoder gives the trainer's pixels (Pillow's). libspng
(``pyspng``) decodes a 256 x 256 RGB PNG in about half of Pillow's time, and half of what
is left is zlib's inflate: libspng is bound to the zlib it was built with, and no decoder on
PyPI takes another inflater. So, for a non-interlaced file up to a megapixel, the pixel
stream (the joined ``IDAT`` payloads) is inflated here by ISA-L (``isal``, about a third of
zlib's time; :mod:`service.pipeline.deflate`) and handed to libspng stored, in uncompressed
deflate blocks its zlib only copies: libspng then does what it does well, undoing the row
filters. The whole decode of a good part's 23 KB 256 x 256 PNG: 0.67 -> 0.47 ms of CPU
(docs/performance-log.md). Interlaced files, larger ones and hosts without an ``isal`` wheel go
to libspng as they are.

libspng, as pyspng drives it, checks neither the chunks' CRCs nor the zlib stream's
Adler-32, so a damaged upload would decode to damaged pixels where Pillow refuses it (422).
Here every chunk's CRC is checked first (:func:`_pixel_stream`), and ISA-L's inflate checks
the Adler-32 and the stream's exact length: a file that fails any of these goes to Pillow,
whose answer (pixels or refusal) is the reference.

Memory: the inflated rows (3 bytes a pixel and one a row), then the stored copy, then
libspng's pixels live one after another, two at a time at most, each dropped before the next
but one; above the model's size the peak stays libspng's pixels beside Pillow's copy for the
resize (3 + 4 bytes a pixel), which is why only files up to 4 megapixels come here.
"""

from __future__ import annotations

import struct
import zlib

import numpy as np
from PIL import Image

try:  # a dependency (pyproject.toml); where no wheel installs it, Pillow decodes every PNG
    import pyspng
except ImportError:  # pragma: no cover - the same pixels, just slower
    pyspng = None  # type: ignore[assignment]
from service.pipeline import deflate
from service.pipeline.png_writer import PNG_SIGNATURE, png_chunk

# Inflate the pixel stream here, by ISA-L (False: libspng inflates it with its zlib, as it
# does where isal has no wheel).
INFLATE_BY_ISAL = deflate.ZLIB is not zlib

# Where Pillow finds an orientation in a PNG (``Image.getexif``, ``ImageOps.exif_transpose``):
# an eXIf chunk, before or after the pixels, and text chunks by their keyword: "exif",
# ImageMagick's "Raw profile type exif", XMP's "XML:com.adobe.xmp". A file with such a chunk
# is decoded by Pillow, which applies it. Only the keywords are read (they are never
# compressed): searching the whole file for these bytes cost a 256 x 256 upload 64 us.
_ORIENTATION_CHUNK = b"eXIf"
_TEXT_CHUNKS = frozenset({b"tEXt", b"zTXt", b"iTXt"})
_ORIENTATION_KEYWORDS = (b"exif", b"xmp")  # in a keyword, any case
# Above the model's size, libspng's array and Pillow's copy of it (the resize needs one)
# live side by side for a moment: 3 + 4 bytes per RGB pixel instead of Pillow's 4. Up to a
# 4-megapixel camera frame that is at most 12 MB more per decode thread (a mapped, copy-free
# view resizes 25% slower than the copy costs); larger files, decompression bombs among
# them, stay with Pillow, so the per-pixel price admission charges keeps bounding memory.
MAX_PIXELS = 2048 * 2048
# ISA-L's inflate pays up to about a megapixel: beyond it the rows no longer stay in the
# caches between the inflate, the stored copy and libspng's pass over fresh memory (a 2048 x
# 2048 photograph: 27.4 ms through libspng's zlib, 43.9 ms inflated here; docs/performance-log.md).
INFLATE_MAX_PIXELS = 1024 * 1024
_IHDR_END = 8 + 12 + 13  # signature, then IHDR: length, type, 13 bytes, CRC
_STORED_BLOCK = 0xFFFF  # the largest uncompressed deflate block
_ZLIB_HEADER = b"\x78\x01"  # deflate, 32 KB window, no dictionary (31 divides 0x7801)


def decode_plain_png(img: Image.Image, data: bytes) -> np.ndarray | None:
    """``img``'s pixels decoded by libspng (``[H, W, 3]`` uint8), for an 8-bit RGB PNG (IHDR
    bit depth 8, colour type 2) without transparency or orientation metadata, up to 2048 x
    2048 pixels: a PNG is lossless, so these are the pixels Pillow decodes (the trainer's).
    None for any other image, for a file whose chunks or pixel stream are not intact (see the
    module docstring) and for one libspng refuses: Pillow then decodes it, or raises the
    usual error."""
    if (pyspng is None or img.format != "PNG" or img.mode != "RGB" or "transparency" in img.info
            or img.width * img.height > MAX_PIXELS
            or data[12:16] != b"IHDR" or data[24:26] != b"\x08\x02"):  # bit depth 8, colour type 2
        return None
    stream = _pixel_stream(data)
    if stream is None:
        return None
    if INFLATE_BY_ISAL and data[28] == 0 and img.width * img.height <= INFLATE_MAX_PIXELS:  # not interlaced
        # the filtered rows: a filter byte and 3 bytes a pixel each
        rows = deflate.inflate_exactly(stream, img.height * (1 + 3 * img.width))
        if rows is None:
            return None
        del stream
        data = _with_stored_rows(data[8:_IHDR_END], rows)
        del rows
    try:
        pixels = pyspng.load(data)
    except RuntimeError:
        return None
    if pixels.dtype != np.uint8 or pixels.shape != (img.height, img.width, 3):
        return None
    return pixels


def _pixel_stream(data: bytes) -> bytes | None:
    """The file's zlib stream (its ``IDAT`` payloads joined), if every chunk is whole, with its
    CRC, up to an ``IEND`` that ends the file, and no chunk may orient the image (an eXIf
    chunk, a text chunk by its keyword); None otherwise: Pillow decodes the file. The CRCs
    catch a flipped bit in the file's compressed data at a fraction of an inflate's cost;
    what they cannot catch, a file made on purpose with CRCs recomputed over a damaged
    stream, the Adler-32 does (:func:`~service.pipeline.deflate.inflate_exactly`), except in
    the files libspng inflates itself (interlaced, or above a megapixel): those decode to
    what libspng reads from them, at no more cost than any image, and only their own verdict
    is at stake."""
    view = memoryview(data)
    idat: list[memoryview] = []
    at = 8  # after the signature
    while at + 12 <= len(data):
        length = int.from_bytes(view[at:at + 4], "big")
        end = at + 12 + length
        if end > len(data) or zlib.crc32(view[at + 4:end - 4]) != int.from_bytes(view[end - 4:end], "big"):
            return None
        kind = bytes(view[at + 4:at + 8])
        if kind == b"IDAT":
            idat.append(view[at + 8:end - 4])
        elif kind == _ORIENTATION_CHUNK or (kind in _TEXT_CHUNKS and _names_orientation(view[at + 8:end - 4])):
            return None
        elif kind == b"IEND":
            return b"".join(idat) if end == len(data) and idat else None
        at = end
    return None


def _names_orientation(text: memoryview) -> bool:
    """Whether a text chunk's keyword (up to its first NUL, at most 79 bytes) may carry an orientation."""
    keyword = bytes(text[:80]).split(b"\0", 1)[0].lower()
    return any(word in keyword for word in _ORIENTATION_KEYWORDS)


def _with_stored_rows(ihdr: bytes, rows: bytes) -> bytes:
    """A PNG of the same header whose one ``IDAT`` holds ``rows`` in stored deflate blocks."""
    view = memoryview(rows)
    parts: list[bytes | memoryview] = [_ZLIB_HEADER]
    for start in range(0, len(rows), _STORED_BLOCK):
        block = view[start:start + _STORED_BLOCK]
        final = start + _STORED_BLOCK >= len(rows)
        parts += (struct.pack("<BHH", final, len(block), len(block) ^ 0xFFFF), block)
    parts.append(struct.pack(">I", deflate.adler32(rows)))
    return b"".join((PNG_SIGNATURE, ihdr, *png_chunk(b"IDAT", *parts), *png_chunk(b"IEND")))
