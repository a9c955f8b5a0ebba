"""What a decode holds in memory, known from the header: the weight of a decoded pixel by
format and mode, and a JPEG's whole-image coefficient buffer.

Admission (:mod:`service.pipeline.admission`) counts in priced pixels of
:data:`PRICED_PIXEL_BYTES` each: what one pixel of an 8-bit RGB decode holds at its peak
(Pillow stores RGB in 4 bytes a pixel; the Lanczos resize to the model's size adds a little).
Other modes hold more, because the decode keeps its own buffer while :func:`to_rgb
<models.preprocessing.to_rgb>` makes the RGB one, and WEBP more again: Pillow decodes it
through libwebp's animation decoder, two RGBA canvases of its own plus a copy of the frame
before the image, even for a still or a 90-byte file. Priced as RGB, a float TIFF cost 27
bytes for every 4 the budget believed (320 MP in flight: 8.5 GB, not 1.3).

So the decode's pixels are weighted by :data:`DECODE_BYTES` / :data:`PRICED_PIXEL_BYTES`:
the peak resident memory of probe + decode + resize to 256 px of a 10-megapixel image of each
kind, in a process of its own after a warm-up decode (Pillow 13), rounded up by a quarter to
half a byte. PNG, BMP, TIFF and JPEG agreed for a given mode, so the table is by mode, with
WEBP apart. ``tests/unit/test_decode_memory_price.py`` measures the costly kinds the same way
(3 MP) and fails where a price falls below the peak or far above it: rerun it after a Pillow
or libjpeg/libwebp upgrade.

A JPEG that libjpeg cannot decode in one pass (progressive, or whose first scan lacks a
component: ``models.image_framing.jpeg_multi_scan``) is first gathered whole as DCT
coefficients, 2 bytes per sample at the stored size whatever the DCT scaling: a 39-MP
progressive JPEG for a 256 px model held 120 MB while priced at 0.74 MP (3 MB). That buffer
is priced too (:func:`jpeg_coefficient_bytes`).
"""

from __future__ import annotations

import math

from PIL import Image

__all__ = ["PRICED_PIXEL_BYTES", "DECODE_BYTES", "WEBP_BYTES", "decode_weight", "jpeg_coefficient_bytes"]

# What a priced pixel stands for: an 8-bit RGB decode measured 4.25 bytes a decoded pixel.
PRICED_PIXEL_BYTES = 4.5

# Peak bytes per decoded pixel, by the mode the header announces (measured, in brackets).
DECODE_BYTES: dict[str, float] = {
    "RGB": 4.5,  # [4.25] the decode is the RGB image
    "1": 5.5, "L": 5.5,  # [5.25] 1 byte decoded + 4 converted
    "I;16": 7.5, "I;16L": 7.5, "I;16B": 7.5, "I;16N": 7.5,  # [7.0] 2 decoded + 1 mapped + 4
    "LA": 8.5, "La": 8.5, "RGBA": 8.5, "RGBa": 8.5, "RGBX": 8.5, "CMYK": 8.5, "YCbCr": 8.5,  # [8.25] 4 + 4
    "P": 9.5, "PA": 9.5,  # [9.0] 1 decoded + 4 RGBA + 4 RGB (to_rgb goes through RGBA)
    "I": 10.0, "F": 10.0,  # [9.3] 4 decoded + 1 mapped + 4 (a band of rows at a time)
}
# A mode not measured: the dearest of the table's (never cheaper than a known one).
_OTHER_MODE_BYTES = max(DECODE_BYTES.values())
# Any WEBP, whatever its mode [16.0 - 16.3]: libwebp's two RGBA canvases, the frame's copy, the image.
WEBP_BYTES = 17.0
# libjpeg's coefficient buffer: one 16-bit coefficient per sample
_COEFFICIENT_BYTES = 2


def decode_weight(fmt: str | None, mode: str) -> float:
    """Priced pixels per decoded pixel of an image of format ``fmt`` opened in ``mode`` (>= 1)."""
    held = WEBP_BYTES if fmt == "WEBP" else DECODE_BYTES.get(mode, _OTHER_MODE_BYTES)
    return max(1.0, held / PRICED_PIXEL_BYTES)


def jpeg_coefficient_bytes(img: Image.Image) -> int:
    """The bytes of libjpeg's whole-image coefficient buffer for the JPEG ``img`` (opened,
    not loaded): every component's blocks at the stored size, in whole MCUs."""
    width, height = img.size
    layer = getattr(img, "layer", None) or []  # (component id, h sampling, v sampling, table)
    if not layer:  # no sampling known: every band at full resolution, the most it can be
        return _COEFFICIENT_BYTES * len(img.getbands()) * width * height
    h_max = max(max(int(h) for _, h, _, _ in layer), 1)
    v_max = max(max(int(v) for _, _, v, _ in layer), 1)
    mcu_w, mcu_h = 8 * h_max, 8 * v_max
    padded = math.ceil(width / mcu_w) * mcu_w * math.ceil(height / mcu_h) * mcu_h
    samples = sum(int(h) * int(v) for _, h, v, _ in layer) / (h_max * v_max)
    return math.ceil(_COEFFICIENT_BYTES * samples * padded)
