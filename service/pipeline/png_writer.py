"""The PNGs the service writes, deflated by ISA-L: heatmaps (palette images) and overlays (RGB).

Pillow's PNG encoder is bound to the zlib it was built with, and deflate was most of what
an image's PNG cost. A 256 x 256 palette heatmap: 0.56 ms of its 0.96 ms through Pillow at
zlib level 1 on a 2.1 GHz Xeon, where ISA-L's level 1 (``isal``, Intel's Intelligent
Storage Acceleration Library; the same zlib format, any inflater reads it) deflates the same
indices in 0.09 ms, to a stream a few percent *smaller*. A 256 x 256 overlay: 3.96 ms
through Pillow (level 1, its adaptive row filters), 0.3-0.45 ms here, and 5% smaller on a
demo part (docs/performance-log.md). Where ``isal`` has no wheel, the standard library's zlib writes the
same files, only slower.

Every row is filtered with type 2 (Up: each byte minus the one above it). The PNG
specification advises no filter for palette images, whose indices usually jump between
unrelated colours; a heatmap's indices are positions along one colormap, as smooth as the
anomaly map, so row differences are small numbers that deflate far better: on the demo
brick's ten test maps 27-48% fewer bytes than unfiltered rows at the same deflate time,
better than Sub, Average or Paeth on all but one. An overlay (a photograph under the
heatmap) is smooth from row to row too: on the demo's parts Up is within 1% of the best of
the five filters, and costs one numpy subtraction (busier textures do up to 12% worse than
Pillow's per-row choice).

The file is the minimal valid one: signature, ``IHDR`` (8-bit samples), ``PLTE`` for a
palette image, one ``IDAT``, ``IEND``. Rows are filtered and deflated a band of about 256 KB
at a time, so an original-size overlay of a large photograph needs no second full-size copy
of its pixels (Pillow's encoder, which this replaces for overlays, also went row by row).
"""

from __future__ import annotations

import struct
from collections.abc import Iterator
from types import ModuleType

import numpy as np

from service.pipeline import deflate

DEFLATE_LEVEL = 1  # heatmaps are smooth: level 1 is within a few percent of the best size
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
_MAX_SIDE = 2**31 - 1  # the PNG format's limit on width and height
_COLOUR_TYPE_RGB = 2
_COLOUR_TYPE_PALETTE = 3
_FILTER_UP = 2
_BAND_BYTES = 256 * 1024  # filtered rows deflated at a time


def encode_palette_png(indices: np.ndarray, palette: np.ndarray, zlib_module: ModuleType | None = None) -> bytes:
    """PNG bytes of ``indices`` (uint8 ``[H, W]``) coloured by ``palette`` (uint8 ``[N, 3]``,
    1 <= N <= 256). ``zlib_module`` deflates instead of ISA-L (:mod:`service.pipeline.deflate`)."""
    if indices.dtype != np.uint8 or indices.ndim != 2:
        raise ValueError(f"palette indices must be uint8 [H, W], not {indices.dtype} {indices.shape}")
    if palette.dtype != np.uint8 or palette.ndim != 2 or palette.shape[1] != 3 or not 1 <= len(palette) <= 256:
        raise ValueError(f"a PNG palette is uint8 [N, 3] with 1 <= N <= 256, not {palette.dtype} {palette.shape}")
    return _png(indices, _COLOUR_TYPE_PALETTE, png_chunk(b"PLTE", palette.tobytes()), zlib_module)


def encode_rgb_png(pixels: np.ndarray, zlib_module: ModuleType | None = None) -> bytes:
    """PNG bytes of an RGB image (uint8 ``[H, W, 3]``)."""
    if pixels.dtype != np.uint8 or pixels.ndim != 3 or pixels.shape[2] != 3:
        raise ValueError(f"RGB pixels must be uint8 [H, W, 3], not {pixels.dtype} {pixels.shape}")
    return _png(pixels, _COLOUR_TYPE_RGB, [], zlib_module)


def png_chunk(kind: bytes, *data: bytes | memoryview) -> list[bytes | memoryview]:
    """A PNG chunk as pieces to join (its data may come in several, never copied here): the
    data's length, ``kind``, the data, the CRC-32 of kind and data."""
    size = sum(len(piece) for piece in data)
    return [struct.pack(">I", size), kind, *data, struct.pack(">I", deflate.crc32([kind, *data]))]


def _png(pixels: np.ndarray, colour_type: int, before_pixels: list[bytes | memoryview],
         zlib_module: ModuleType | None) -> bytes:
    height, width = pixels.shape[:2]
    if not (0 < width <= _MAX_SIDE and 0 < height <= _MAX_SIDE):
        raise ValueError(f"a PNG is 1 to {_MAX_SIDE} pixels a side, not {width} x {height}")
    rows = np.ascontiguousarray(pixels).reshape(height, -1)  # each row's bytes (a view, normally)
    stream = deflate.compress_bands(_filtered_up(rows), DEFLATE_LEVEL, zlib_module)
    header = struct.pack(">IIBBBBB", width, height, 8, colour_type, 0, 0, 0)
    return b"".join((PNG_SIGNATURE, *png_chunk(b"IHDR", header), *before_pixels, *png_chunk(b"IDAT", stream),
                     *png_chunk(b"IEND")))


def _filtered_up(rows: np.ndarray) -> Iterator[np.ndarray]:
    """``rows`` filtered Up, each with its filter-type byte first, a band of rows at a time
    (one buffer, reused: each band is deflated before the next is written)."""
    height, row_bytes = rows.shape
    per_band = max(1, _BAND_BYTES // (row_bytes + 1))
    band = np.empty((min(per_band, height), row_bytes + 1), dtype=np.uint8)
    band[:, 0] = _FILTER_UP
    for top in range(0, height, per_band):
        bottom = min(top + per_band, height)
        out = band[:bottom - top, 1:]
        if top == 0:  # above the first row the format reads zeros: its bytes are its own
            out[0] = rows[0]
            np.subtract(rows[1:bottom], rows[:bottom - 1], out=out[1:])  # modulo 256, as the format wants
        else:
            np.subtract(rows[top:bottom], rows[top - 1:bottom - 1], out=out)
        yield band[:bottom - top]
