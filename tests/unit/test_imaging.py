"""Upload decoding: modes, EXIF, limits (bytes, pixels, bombs), bad data, and exact
parity with the trainer's preprocessing."""

from __future__ import annotations

import io
import struct
import tracemalloc
import zlib
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from models.data import MVTecCategory, Sample, load_images
from models.preprocessing import load_image
from service.pipeline.decode import (ImageLimits, ImageTooLarge, UndecodableImage, UnsupportedImageType, configure_pillow,
                             decode_image)

SIZE = 32
LIMITS = ImageLimits(max_bytes=5_000_000, max_pixels=4_000_000)


@pytest.fixture(autouse=True)
def pillow_limit() -> Iterator[None]:
    """configure_pillow changes a Pillow global; restore it for the rest of the suite."""
    before = Image.MAX_IMAGE_PIXELS
    configure_pillow(LIMITS.max_pixels)
    yield
    Image.MAX_IMAGE_PIXELS = before


def encode(img: Image.Image, fmt: str = "PNG", **kw: object) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt, **kw)
    return buf.getvalue()


def gradient(w: int = 40, h: int = 30) -> np.ndarray:
    y, x = np.mgrid[0:h, 0:w]
    return np.stack([x * 6 % 256, y * 8 % 256, (x + y) * 3 % 256], axis=-1).astype(np.uint8)


def png_header(width: int, height: int) -> bytes:
    """A valid PNG signature + IHDR claiming a huge size, with almost no data behind it."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")


def sample_images() -> dict[str, tuple[bytes, str]]:
    rgb = Image.fromarray(gradient())
    gray = rgb.convert("L")
    cases: dict[str, tuple[Image.Image, str]] = {
        "1": (gray.convert("1"), "PNG"),
        "L": (gray, "PNG"),
        "LA": (rgb.convert("LA"), "PNG"),
        "P": (rgb.convert("P"), "PNG"),
        "P-transparent": (rgb.convert("P"), "PNG"),
        "RGB": (rgb, "PNG"),
        "RGBA": (rgb.convert("RGBA"), "PNG"),
        "I;16": (Image.fromarray((np.asarray(gray, dtype=np.uint16) * 257)), "PNG"),
        "I": (Image.fromarray(np.asarray(gray, dtype=np.int32) * 200), "TIFF"),
        "F": (Image.fromarray(np.asarray(gray, dtype=np.float32) * 0.9), "TIFF"),
        "CMYK": (rgb.convert("CMYK"), "JPEG"),
        "JPEG-L": (gray, "JPEG"),
        "BMP": (rgb, "BMP"),
        "WEBP": (rgb, "WEBP"),
    }
    out = {}
    for name, (img, fmt) in cases.items():
        kw = {"transparency": 0} if name == "P-transparent" else {}
        out[name] = (encode(img, fmt, **kw), fmt)
    return out


@pytest.mark.parametrize("case", list(sample_images()))
def test_every_mode_converts_like_the_trainer(case: str, tmp_path: Path) -> None:
    data, fmt = sample_images()[case]
    decoded = decode_image(data, SIZE, LIMITS, name=case)
    assert decoded.rgb.mode == "RGB" and decoded.size == (40, 30)
    assert decoded.tensor.dtype == np.uint8 and decoded.tensor.shape == (SIZE, SIZE, 3)
    assert decoded.tensor.flags["C_CONTIGUOUS"]
    path = tmp_path / f"x.{fmt.lower()}"
    path.write_bytes(data)
    np.testing.assert_array_equal(decoded.tensor, load_image(path, SIZE))


def test_16_bit_is_scaled_not_clipped() -> None:
    data = encode(Image.fromarray(np.full((8, 8), 40000, dtype=np.uint16)))
    decoded = decode_image(data, 8, LIMITS)
    assert int(decoded.tensor[0, 0, 0]) == 40000 >> 8


def test_exif_orientation_applied(tmp_path: Path) -> None:
    img = Image.fromarray(gradient(40, 20))
    exif = img.getexif()
    exif[0x0112] = 6  # stored sideways: rotate 90 degrees clockwise to view
    data = encode(img, "JPEG", exif=exif.tobytes(), quality=95)
    decoded = decode_image(data, SIZE, LIMITS)
    assert decoded.size == (20, 40)  # upright: width and height swapped
    path = tmp_path / "exif.jpg"
    path.write_bytes(data)
    np.testing.assert_array_equal(decoded.tensor, load_image(path, SIZE))


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
    with pytest.raises(ImageTooLarge, match="5000000 pixels"):
        decode_image(png_header(2500, 2000), SIZE, LIMITS)


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


def test_server_decode_matches_trainer_on_demo_files(demo_root: Path) -> None:
    """The service's decode + resize gives exactly the trainer's uint8 tensor."""
    samples = MVTecCategory(demo_root, "brick").test_samples()
    picked = [s for s in samples if s.defect_type == "good"][:2] + [s for s in samples if s.label == 1][:2]
    size = 128
    trainer = load_images(picked, size)
    for i, s in enumerate(picked):
        server = decode_image(s.path.read_bytes(), size, LIMITS, name=s.path.name)
        assert server.size == Image.open(s.path).size
        np.testing.assert_array_equal(server.tensor, trainer[i])


def test_server_decode_matches_trainer_on_rotated_jpeg(tmp_path: Path) -> None:
    path = tmp_path / "rot.jpg"
    img = Image.fromarray(gradient(64, 48))
    exif = img.getexif()
    exif[0x0112] = 8
    path.write_bytes(encode(img, "JPEG", exif=exif.tobytes()))
    trainer = load_images([Sample(path=path, label=0, defect_type="good")], 64)
    np.testing.assert_array_equal(decode_image(path.read_bytes(), 64, LIMITS).tensor, trainer[0])
