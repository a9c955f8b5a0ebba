"""Palette PNGs deflated by ISA-L: the heatmap's container, written here because Pillow's
PNG encoder is bound to the zlib it was built with.

Deflate was most of a heatmap's cost: 0.56 ms of the 0.96 ms that a 256 x 256 palette
heatmap took through Pillow at zlib level 1, on a 2.1 GHz Xeon. ISA-L's level 1 (``isal``,
Intel's Intelligent Storage Acceleration Library; the same zlib format, any inflater reads
it) deflates the same indices in 0.09 ms, to a stream a few percent *smaller* than zlib's
level 1 (docs/PERFORMANCE.md). Where ``isal`` has no wheel, the standard library's zlib
writes the same PNG, only slower.

The file is the minimal valid one: signature, ``IHDR`` (8-bit palette), ``PLTE``, one
``IDAT``, ``IEND``. Every row is filtered with type 2 (Up: each byte minus the one above
it). The PNG specification advises no filter for palette images, whose indices usually
jump between unrelated colours; a heatmap's indices are positions along one colormap, as
smooth as the anomaly map, so row differences are small numbers that deflate far better:
on the demo brick's ten test maps 27-48% fewer bytes than unfiltered rows at the same
deflate time, better than Sub, Average or Paeth on all but one (docs/PERFORMANCE.md).
"""

from __future__ import annotations

import struct
from types import ModuleType

import numpy as np

from service.pipeline import deflate

DEFLATE_LEVEL = 1  # heatmaps are smooth: level 1 is within a few percent of the best size
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
_MAX_SIDE = 2**31 - 1  # the PNG format's limit on width and height
_COLOUR_TYPE_PALETTE = 3
_FILTER_UP = 2


def encode_palette_png(indices: np.ndarray, palette: np.ndarray, zlib_module: ModuleType | None = None) -> bytes:
    """PNG bytes of ``indices`` (uint8 ``[H, W]``) coloured by ``palette`` (uint8 ``[N, 3]``,
    1 <= N <= 256). ``zlib_module`` deflates instead of ISA-L (:mod:`service.pipeline.deflate`)."""
    if indices.dtype != np.uint8 or indices.ndim != 2:
        raise ValueError(f"palette indices must be uint8 [H, W], not {indices.dtype} {indices.shape}")
    if palette.dtype != np.uint8 or palette.ndim != 2 or palette.shape[1] != 3 or not 1 <= len(palette) <= 256:
        raise ValueError(f"a PNG palette is uint8 [N, 3] with 1 <= N <= 256, not {palette.dtype} {palette.shape}")
    height, width = indices.shape
    if not (0 < width <= _MAX_SIDE and 0 < height <= _MAX_SIDE):
        raise ValueError(f"a PNG is 1 to {_MAX_SIDE} pixels a side, not {width} x {height}")
    rows = np.empty((height, width + 1), dtype=np.uint8)
    rows[:, 0] = _FILTER_UP  # each row's filter type
    rows[0, 1:] = indices[0]  # above the first row the format reads zeros: its bytes are its own
    np.subtract(indices[1:], indices[:-1], out=rows[1:, 1:])  # modulo 256, as the format wants
    stream = deflate.compress(rows, DEFLATE_LEVEL, zlib_module)
    header = struct.pack(">IIBBBBB", width, height, 8, _COLOUR_TYPE_PALETTE, 0, 0, 0)
    return b"".join((PNG_SIGNATURE, *png_chunk(b"IHDR", header), *png_chunk(b"PLTE", palette.tobytes()),
                     *png_chunk(b"IDAT", stream), *png_chunk(b"IEND")))


def png_chunk(kind: bytes, *data: bytes | memoryview) -> list[bytes | memoryview]:
    """A PNG chunk as pieces to join (its data may come in several, never copied here): the
    data's length, ``kind``, the data, the CRC-32 of kind and data."""
    size = sum(len(piece) for piece in data)
    return [struct.pack(">I", size), kind, *data, struct.pack(">I", deflate.crc32([kind, *data]))]
