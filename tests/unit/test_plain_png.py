"""Plain RGB PNGs through ISA-L's inflate and libspng (service.pipeline.plain_png): Pillow's
pixels, or Pillow's own answer whenever the file's pixel stream is not exactly intact."""

from __future__ import annotations

import io
import random
import struct
import zlib

import numpy as np
import pytest
from PIL import Image

from harness import PNG_IHDR_END, damaged, noise as _noise, png_chunk as _chunk
import service.pipeline.plain_png as plain_png
from service.pipeline.decode import ImageLimits, ImageRejected, decode_image
from service.pipeline.plain_png import decode_plain_png

SIZE = 32
LIMITS = ImageLimits(max_bytes=5_000_000, max_pixels=4_000_000)


def _png(pixels: np.ndarray, **kw: object) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, "PNG", **kw)
    return buf.getvalue()


def _decode(data: bytes) -> np.ndarray | None:
    return decode_plain_png(Image.open(io.BytesIO(data)), data)


def _with_stream(png: bytes, stream: bytes) -> bytes:
    """``png`` with its pixel stream replaced by ``stream`` in one IDAT, every CRC right: a
    file damaged on purpose, past what the CRCs can see."""
    return png[:PNG_IHDR_END] + _chunk(b"IDAT", stream) + _chunk(b"IEND", b"")


def _stream(png: bytes) -> bytes:
    at, out = 8, b""
    while at < len(png):
        length = struct.unpack(">I", png[at:at + 4])[0]
        if png[at + 4:at + 8] == b"IDAT":
            out += png[at + 8:at + 8 + length]
        at += 12 + length
    return out


def _answer(data: bytes, monkeypatch: pytest.MonkeyPatch, libspng: object) -> tuple[str, bytes]:
    monkeypatch.setattr(plain_png, "pyspng", libspng)
    try:
        return "ok", decode_image(data, SIZE, LIMITS).tensor.tobytes()
    except ImageRejected as exc:
        return exc.code, b""


@pytest.mark.parametrize(("width", "height"), [(1, 1), (61, 47), (300, 200), (1456, 15), (1456, 30), (7, 3000)])
def test_inflated_by_isal_the_pixels_are_pillows_and_libspngs_own(width: int, height: int,
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    """Sizes whose rows fill less than one stored block, several, exactly one (1456 x 15: 65,535
    bytes of rows) and exactly two."""
    pixels = _noise(width, height, seed=width)
    data = _png(pixels)
    assert plain_png.INFLATE_BY_ISAL  # isal is a dependency: this is the path the server takes
    np.testing.assert_array_equal(_decode(data), pixels)
    monkeypatch.setattr(plain_png, "INFLATE_BY_ISAL", False)  # libspng inflating with its own zlib
    np.testing.assert_array_equal(_decode(data), pixels)


def test_every_row_filter_survives_the_stored_stream() -> None:
    """Pillow's adaptive filters pick per row: gradients along and down the rows and noise
    between them make it use several of the five filter types."""
    ramp = np.zeros((120, 200, 3), np.uint8)
    ramp[:40] = np.arange(200, dtype=np.uint8)[None, :, None]  # along the rows
    ramp[40:80] = _noise(200, 40)
    ramp[80:] = (np.arange(40, dtype=np.uint8) * 5)[:, None, None]  # down the columns
    data = _png(ramp)
    raw = zlib.decompress(_stream(data))
    filters = {raw[row * (1 + 3 * 200)] for row in range(120)}
    assert len(filters) >= 3, filters
    np.testing.assert_array_equal(_decode(data), ramp)


def test_a_stream_damaged_behind_recomputed_crcs_goes_to_pillow(monkeypatch: pytest.MonkeyPatch) -> None:
    """What the CRCs cannot see, the Adler-32 and the stream's length do: each file below has
    right CRCs; libspng alone would decode them; here Pillow answers each, as it alone would."""
    pixels = _noise(48, 32, seed=5)
    plain = _png(pixels)
    stream = _stream(plain)
    rows = zlib.decompress(stream)
    damaged_rows = bytearray(rows)
    damaged_rows[500] ^= 0x01
    unfinished = zlib.compressobj()
    cases = {
        "wrong Adler-32": stream[:-4] + bytes(b ^ 0xFF for b in stream[-4:]),
        "rows damaged, Adler-32 of the intact ones": zlib.compress(bytes(damaged_rows))[:-4] + stream[-4:],
        "one row short": zlib.compress(rows[:-(1 + 3 * 48)]),
        "one row too many": zlib.compress(rows + rows[:1 + 3 * 48]),
        "bytes after the stream": stream + b"\x00\x01",
        "no end of stream": unfinished.compress(rows) + unfinished.flush(zlib.Z_SYNC_FLUSH),
    }
    libspng = plain_png.pyspng
    for name, bad in cases.items():
        data = _with_stream(plain, bad)
        assert _decode(data) is None, name
        assert _answer(data, monkeypatch, libspng) == _answer(data, monkeypatch, None), name
    # and libspng alone, as pyspng drives it, would have given its own pixels for the first
    assert libspng.load(_with_stream(plain, cases["wrong Adler-32"])).shape == pixels.shape


def test_crafted_streams_are_answered_exactly_as_pillow_alone_answers_them(monkeypatch: pytest.MonkeyPatch) -> None:
    """Differential, past the CRCs: the compressed stream damaged (bytes changed, cut,
    inserted) and every CRC recomputed, each file answered through ISA-L and libspng and by
    Pillow alone: the same refusal code, or the same pixels. (Before the Adler-32 was checked,
    a fifth of such files decoded where Pillow refused them.)"""
    rng = random.Random(20261206)
    libspng = plain_png.pyspng
    seeds = [_png(_noise(w, h, seed), **kw) for (w, h, seed, kw) in
             ((48, 32, 1, {}), (40, 40, 2, {"compress_level": 9}), (5, 17, 3, {"compress_level": 0}))]
    outcomes: set[str] = set()
    for _ in range(600):
        seed = rng.choice(seeds)
        data = _with_stream(seed, damaged(_stream(seed), rng, edits=rng.randint(1, 3), longest=16))
        answer = _answer(data, monkeypatch, libspng)
        assert answer == _answer(data, monkeypatch, None)
        outcomes.add(answer[0])
    assert "undecodable_image" in outcomes
