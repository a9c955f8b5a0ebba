"""The service's PNG writer: heatmaps (palette) and overlays (RGB) that Pillow and libspng read
back to the very indices, palette and pixels, whichever deflate wrote them."""

from __future__ import annotations

import io
import zlib

import numpy as np
import pyspng
import pytest
from PIL import Image

from service.pipeline import deflate
from service.pipeline.png_writer import encode_palette_png, encode_rgb_png
from service.pipeline.render import LUT


def smooth_indices(height: int, width: int, seed: int) -> np.ndarray:
    """Indices like a heatmap's: smooth blobs over a cool background, with some noise."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width]
    blob = 255 * np.exp(-(((x - width * rng.random()) / (width / 5 + 1)) ** 2
                          + ((y - height * rng.random()) / (height / 5 + 1)) ** 2))
    return np.clip(blob + rng.normal(0, 3, (height, width)), 0, 255).astype(np.uint8)


# (1100, 300) and (700, 200) are deflated in several bands of rows; (1, 100_000) RGB has a row
# longer than a band
SHAPES = [(256, 256), (1, 1), (17, 5), (1, 3000), (300, 1), (1100, 300), (700, 200), (1, 100_000)]


@pytest.mark.parametrize("height,width", SHAPES)
@pytest.mark.parametrize("zlib_impl", ["isal", "zlib"])
def test_pillow_and_libspng_read_back_the_indices_and_the_palette(height: int, width: int, zlib_impl: str) -> None:
    indices = smooth_indices(height, width, seed=height * 7 + width)
    png = encode_palette_png(indices, LUT, zlib_module=zlib if zlib_impl == "zlib" else None)
    with Image.open(io.BytesIO(png)) as img:
        img.load()  # Pillow checks every chunk's CRC on the way
        assert img.format == "PNG" and img.mode == "P" and img.size == (width, height)
        np.testing.assert_array_equal(np.asarray(img), indices)
        np.testing.assert_array_equal(np.asarray(img.getpalette(), dtype=np.uint8).reshape(-1, 3), LUT)
        np.testing.assert_array_equal(np.asarray(img.convert("RGB")), LUT[indices])
    np.testing.assert_array_equal(pyspng.load(png), LUT[indices])  # libspng expands the palette


@pytest.mark.parametrize("height,width", SHAPES)
@pytest.mark.parametrize("zlib_impl", ["isal", "zlib"])
def test_pillow_and_libspng_read_back_an_rgb_image(height: int, width: int, zlib_impl: str) -> None:
    rng = np.random.default_rng(height + width)
    pixels = np.stack([smooth_indices(height, width, seed=height + c) for c in range(3)], axis=-1)
    pixels[rng.random((height, width)) < 0.01] = 255  # some speckle: differences that wrap around
    png = encode_rgb_png(pixels, zlib_module=zlib if zlib_impl == "zlib" else None)
    with Image.open(io.BytesIO(png)) as img:
        img.load()
        assert img.format == "PNG" and img.mode == "RGB" and img.size == (width, height)
        np.testing.assert_array_equal(np.asarray(img), pixels)
    np.testing.assert_array_equal(pyspng.load(png), pixels)


def test_a_photograph_costs_at_most_a_little_more_than_through_pillow() -> None:
    """A photograph of a texture (the demo's brick), rows filtered Up: within 15% of what
    Pillow's encoder wrote for overlays (zlib level 1, a filter chosen per row), where
    unfiltered rows come to 1.5 times it (docs/performance-log.md has overlays of the demo's
    parts, 5-7% smaller than Pillow's, and of busier textures, up to 12% larger)."""
    from skimage import data  # a real photograph, bundled with scikit-image

    photo = np.asarray(Image.fromarray(data.brick()).convert("RGB").resize((256, 256)))
    png = encode_rgb_png(photo)
    assert (idat_rows(png, 256)[:, 0] == 2).all()
    pillow = io.BytesIO()
    Image.fromarray(photo).save(pillow, format="PNG", compress_level=1)
    assert len(png) <= 1.15 * len(pillow.getvalue())


def test_a_large_overlay_is_written_without_a_second_full_size_copy() -> None:
    """The rows are filtered and deflated a band (about 256 KB) at a time: writing a
    12 MB RGB image allocates a small fraction of it besides the file itself."""
    import tracemalloc

    y, x = np.mgrid[0:2000, 0:2000]
    pixels = np.stack([(x // 8) % 256, (y // 8) % 256, ((x + y) // 16) % 256], axis=-1).astype(np.uint8)
    tracemalloc.start()
    try:
        png = encode_rgb_png(pixels)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    np.testing.assert_array_equal(pyspng.load(png), pixels)
    assert peak < 2 * len(png) + 2 * 1024 * 1024, (peak, len(png))  # a whole filtered copy: 12 MB


def test_the_default_deflate_is_isal_and_no_larger_than_a_tenth_over_zlib() -> None:
    """ISA-L is installed with the service; its level 1 must not cost the heatmap's size."""
    assert deflate.ZLIB.__name__.endswith("isal_zlib")
    indices = smooth_indices(256, 256, seed=3)
    ours = encode_palette_png(indices, LUT)
    with_zlib = encode_palette_png(indices, LUT, zlib_module=zlib)
    assert len(ours) <= 1.1 * len(with_zlib)


def idat_rows(png: bytes, height: int) -> np.ndarray:
    """The file's ``IDAT`` payloads joined and inflated: ``height`` rows, each its filter byte first."""
    at, stream = 8, b""
    while at < len(png):
        length = int.from_bytes(png[at:at + 4], "big")
        if png[at + 4:at + 8] == b"IDAT":
            stream += png[at + 8:at + 8 + length]
        at += 12 + length
    return np.frombuffer(zlib.decompress(stream), dtype=np.uint8).reshape(height, -1)


def test_rows_are_filtered_up_and_deflate_smaller_than_unfiltered() -> None:
    """A heatmap's indices are smooth along the colormap: the Up filter's small differences
    deflate to far fewer bytes than the raw indices, at the same deflate level."""
    indices = smooth_indices(256, 256, seed=5)
    png = encode_palette_png(indices, LUT)
    rows = idat_rows(png, 256)
    assert (rows[:, 0] == 2).all()
    np.testing.assert_array_equal(np.cumsum(rows[:, 1:], axis=0, dtype=np.uint8), indices)  # Up undone by hand
    unfiltered = np.zeros((256, 257), dtype=np.uint8)
    unfiltered[:, 1:] = indices
    assert len(png) < 0.9 * len(deflate.compress_bands([unfiltered], 1))


def test_a_short_palette_and_every_chunk_in_order() -> None:
    indices = np.array([[0, 1], [1, 0]], dtype=np.uint8)
    palette = np.array([[0, 0, 0], [255, 255, 255]], dtype=np.uint8)
    png = encode_palette_png(indices, palette)
    assert png[:8] == b"\x89PNG\r\n\x1a\n"
    kinds, at = [], 8
    while at < len(png):
        length = int.from_bytes(png[at:at + 4], "big")
        kind, data = png[at + 4:at + 8], png[at + 8:at + 8 + length]
        assert int.from_bytes(png[at + 8 + length:at + 12 + length], "big") == zlib.crc32(kind + data)
        kinds.append(kind)
        at += 12 + length
    assert kinds == [b"IHDR", b"PLTE", b"IDAT", b"IEND"]
    with Image.open(io.BytesIO(png)) as img:
        assert img.getpalette()[:6] == [0, 0, 0, 255, 255, 255]
        np.testing.assert_array_equal(np.asarray(img), indices)


@pytest.mark.parametrize("indices,palette,message", [
    (np.zeros((4, 4), np.float32), LUT, "uint8"),
    (np.zeros((4, 4, 3), np.uint8), LUT, "uint8"),
    (np.zeros((0, 4), np.uint8), LUT, "pixels a side"),
    (np.zeros((4, 4), np.uint8), np.zeros((257, 3), np.uint8), "palette"),
    (np.zeros((4, 4), np.uint8), np.zeros((0, 3), np.uint8), "palette"),
    (np.zeros((4, 4), np.uint8), np.zeros((16, 4), np.uint8), "palette"),
])
def test_what_is_not_a_palette_image_is_refused(indices: np.ndarray, palette: np.ndarray, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        encode_palette_png(indices, palette)


@pytest.mark.parametrize("pixels,message", [
    (np.zeros((4, 4, 3), np.float32), "uint8"),
    (np.zeros((4, 4), np.uint8), "uint8"),
    (np.zeros((4, 4, 4), np.uint8), "uint8"),
    (np.zeros((0, 4, 3), np.uint8), "pixels a side"),
])
def test_what_is_not_an_rgb_image_is_refused(pixels: np.ndarray, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        encode_rgb_png(pixels)
