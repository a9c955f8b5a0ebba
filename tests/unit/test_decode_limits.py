"""Upload decoding's refusals: the byte and pixel limits (413, decided from the header, before
any pixel buffer, in the service's words even past Pillow's own guard), PNG text beyond its
budget and truncated files (422), non-images and unsupported formats (415)."""

from __future__ import annotations

import struct
import tracemalloc
import zlib

import numpy as np
import pytest
from PIL import Image

from decode_fixtures import LIMITS, SIZE, encode, gradient
from decode_fixtures import pillow_limit  # noqa: F401  (an autouse fixture)
from harness import PNG_IHDR_END, png_chunk as _chunk
from service.pipeline.decode import (MAX_PNG_TEXT_BYTES, ImageLimits, ImageTooLarge, UndecodableImage,
                                     UnsupportedImageType, decode_image)


def png_header(width: int, height: int) -> bytes:
    """A valid PNG signature + IHDR claiming a huge size, with almost no data behind it."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")


def test_byte_limit() -> None:
    data = encode(Image.fromarray(gradient()))
    with pytest.raises(ImageTooLarge) as info:
        decode_image(data, SIZE, ImageLimits(max_bytes=len(data) - 1, max_pixels=LIMITS.max_pixels))
    assert info.value.status_code == 413
    decode_image(data, SIZE, ImageLimits(max_bytes=len(data), max_pixels=LIMITS.max_pixels))


def test_pixel_bomb_refused_from_header_without_allocating() -> None:
    bomb = png_header(100_000, 100_000)  # 10 gigapixels claimed in ~100 bytes
    tracemalloc.start()
    try:
        with pytest.raises(ImageTooLarge) as info:
            decode_image(bomb, SIZE, LIMITS)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert info.value.status_code == 413
    assert peak < 5_000_000, peak  # a decoded buffer would be 30 GB


def test_pixel_limit_below_pillows_own_guard() -> None:
    # 2500 x 2000 = 5 MP: above our 4 MP limit, below Pillow's 2x error threshold; still 413.
    with pytest.raises(ImageTooLarge) as info:
        decode_image(png_header(2500, 2000), SIZE, LIMITS, name="wide.png")
    assert info.value.message == ("'wide.png' is 2500x2000 = 5,000,000 pixels; at most 4,000,000 per image "
                                  "(MSFLOW_MAX_IMAGE_PIXELS)")


@pytest.mark.parametrize("fmt", ["PNG", "BMP"])
def test_a_bomb_past_pillows_guard_is_refused_in_our_words_only(fmt: str) -> None:
    """Above twice the limit Pillow refuses the header itself; the 413 still names the size
    and our limit (the setting), never Pillow's text with its own, other limit."""
    if fmt == "PNG":
        bomb = png_header(20_000, 20_000)
    else:  # a BMP header claiming 20000 x 20000, with no pixels behind it
        bomb = b"BM" + struct.pack("<IHHI", 54, 0, 0, 54) + struct.pack("<IiiHHIIiiII", 40, 20_000, 20_000, 1, 24,
                                                                           0, 0, 2835, 2835, 0, 0)
    with pytest.raises(ImageTooLarge) as info:
        decode_image(bomb, SIZE, LIMITS)
    assert info.value.status_code == 413 and info.value.code == "image_too_large"
    assert info.value.message == ("the image is 20000x20000 = 400,000,000 pixels; at most 4,000,000 per image "
                                  "(MSFLOW_MAX_IMAGE_PIXELS)")


def test_png_text_beyond_its_budget_is_422_before_it_is_all_inflated() -> None:
    """Small zTXt chunks that inflate to a megabyte each: Pillow's own cap (64 MiB) let a
    1.5 MB upload cost a third of a second; the service's stops it at MAX_PNG_TEXT_BYTES."""
    png = encode(Image.new("RGB", (SIZE, SIZE)))
    bomb = zlib.compress(b"a" * (1 << 20), 9)  # about a kilobyte
    text = b"".join(_chunk(b"zTXt", b"k%d\0\0" % i + bomb) for i in range(64))
    upload = png[:PNG_IHDR_END] + text + png[PNG_IHDR_END:]
    tracemalloc.start()
    try:
        with pytest.raises(UndecodableImage, match="text chunks"):
            decode_image(upload, SIZE, LIMITS)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 4 * MAX_PNG_TEXT_BYTES, peak  # 64 MiB inflated under Pillow's default
    small_text = png[:PNG_IHDR_END] + _chunk(b"zTXt", b"Comment\0\0" + zlib.compress(b"lot 7" * 1000)) + png[PNG_IHDR_END:]
    assert decode_image(small_text, SIZE, LIMITS).model_input.shape == (SIZE, SIZE, 3)  # what cameras write decodes


def test_truncated_is_422() -> None:
    data = encode(Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8)))
    with pytest.raises(UndecodableImage) as info:
        decode_image(data[: len(data) // 2], SIZE, LIMITS)
    assert info.value.status_code == 422
    with pytest.raises(UndecodableImage):
        decode_image(b"", SIZE, LIMITS)


@pytest.mark.parametrize("data", [b"hello, not an image", b"%PDF-1.4\n...", encode(Image.new("RGB", (8, 8)), "GIF")])
def test_non_image_and_unsupported_format_are_415(data: bytes) -> None:
    with pytest.raises(UnsupportedImageType) as info:
        decode_image(data, SIZE, LIMITS)
    assert info.value.status_code == 415
