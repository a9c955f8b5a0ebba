"""Run-length compressed BMPs (BI_RLE8, BI_RLE4), which Pillow decodes in Python: past the
framing budget's work (bytes of upload plus half the pixels, models.image_framing) they are
refused with 422 before Pillow decodes them, by the server and the trainer alike, with what to
send instead; an RLE image within it decodes as the trainer reads it."""

from __future__ import annotations

import struct
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from models.image_framing import MAX_RLE_BMP_WORK, bmp_rle, over_budget
from models.preprocessing import ImageReadError, load_image
from service.pipeline.decode import ImageLimits, UndecodableImage, decode_image

LIMITS = ImageLimits(max_bytes=20 << 20, max_pixels=40_000_000)


def rle_bmp(width: int, height: int, body: bytes, rle4: bool = False) -> bytes:
    """A BMP with a BITMAPINFOHEADER, a grey palette and ``body`` as its RLE pixel data."""
    bits = 4 if rle4 else 8
    colors = 1 << bits
    palette = b"".join(bytes([i * 255 // (colors - 1)] * 3 + [0]) for i in range(colors))
    info = struct.pack("<IiiHHIIiiII", 40, width, height, 1, bits, 2 if rle4 else 1, len(body), 2835, 2835, colors, 0)
    offset = 14 + len(info) + len(palette)
    return b"BM" + struct.pack("<IHHI", offset + len(body), 0, 0, offset) + info + palette + body


def encode_rle8(rows: np.ndarray) -> bytes:
    """A real encoder's RLE8 stream: runs of equal pixels (at most 255), rows bottom-up, each
    ended by an end-of-line, then the end of the bitmap."""
    out = bytearray()
    for row in rows[::-1]:
        at = 0
        while at < len(row):
            run = 1
            while at + run < len(row) and run < 255 and row[at + run] == row[at]:
                run += 1
            out += bytes([run, int(row[at])])
            at += run
        out += b"\x00\x00"
    return bytes(out + b"\x00\x01")


HOSTILE = {
    # 2 MB of one-pixel runs (the 20 MiB upload kept a decode thread busy 7.5 s; this one 0.3 s)
    "RLE8 runs of one pixel": rle_bmp(2000, 500, (b"\x01\x07" * 2000 + b"\x00\x00") * 500),
    # 16 KB: each row ended after its first pixel, padded a byte at a time in Python (0.45 s)
    "RLE8 rows ended early": rle_bmp(4000, 1000, b"\x01\x07\x00\x00" * 1000),
    # 32 KB: runs of 255 pixels that Pillow expands a pixel at a time (0.2 s)
    "RLE4 long runs": rle_bmp(4080, 1000, (b"\xff\x12" * 16 + b"\x00\x00") * 1000, rle4=True),
}


@pytest.mark.parametrize("kind", list(HOSTILE))
def test_an_rle_bmp_past_the_decoders_budget_is_refused_before_it_is_decoded(kind: str, tmp_path: Path) -> None:
    upload = HOSTILE[kind]
    rle, pixels = bmp_rle(upload) or ("", 0)
    assert rle == kind[:4] and len(upload) + pixels // 2 > MAX_RLE_BMP_WORK
    started = time.process_time()
    with pytest.raises(UndecodableImage) as refused:
        decode_image(upload, 64, LIMITS, name="scan.bmp")
    assert time.process_time() - started < 0.05  # from the header, not after Pillow's decode
    message = str(refused.value)
    assert refused.value.status_code == 422 and refused.value.code == "undecodable_image"
    assert f"'scan.bmp' is an {rle}-compressed BMP" in message and "uncompressed BMP or a PNG instead" in message
    path = tmp_path / "scan.bmp"
    path.write_bytes(upload)
    with pytest.raises(ImageReadError, match="uncompressed BMP or a PNG instead") as trainer:
        load_image(path, 64)  # the trainer refuses what the server refuses
    assert "422 undecodable_image" in str(trainer.value) and "ordinary encoder" not in str(trainer.value)


def test_an_rle_bmp_within_the_budget_decodes_as_the_trainer_reads_it(tmp_path: Path) -> None:
    """A 640 x 480 palette image of a real encoder's runs (a few KB, 0.15 M work units)."""
    y, x = np.mgrid[0:480, 0:640]
    rows = ((x // 40 + y // 30) % 16 * 17).astype(np.uint8)
    upload = rle_bmp(640, 480, encode_rle8(rows))
    assert bmp_rle(upload) == ("RLE8", 640 * 480) and over_budget(upload) is None
    path = tmp_path / "real.bmp"
    path.write_bytes(upload)
    with Image.open(path) as img:
        assert img.info["compression"] == 1 and np.array_equal(np.asarray(img.convert("L")), rows)
    decoded = decode_image(upload, 64, LIMITS, name="real.bmp")
    np.testing.assert_array_equal(decoded.tensor, load_image(path, 64))


def test_uncompressed_bmps_and_other_headers_are_not_counted() -> None:
    plain = rle_bmp(4000, 1000, b"")[:30] + b"\x00\x00\x00\x00" + rle_bmp(4000, 1000, b"")[34:]
    assert bmp_rle(plain) is None and over_budget(plain) is None  # BI_RGB: decoded in C
    core = b"BM" + b"\x00" * 12 + struct.pack("<IHHHH", 12, 4000, 1000, 1, 8) + b"\x01\x00\x00\x00"
    assert bmp_rle(core) is None  # an OS/2 1.x header has no compression field
    assert bmp_rle(b"BM\x00") is None and bmp_rle(b"\x89PNG\r\n\x1a\n" + b"\x00" * 40) is None
