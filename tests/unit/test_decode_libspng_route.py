"""Which PNGs upload decoding gives libspng and which Pillow: plain RGB PNGs take libspng and
decode to Pillow's (and the trainer's) pixels; grey, transparency, palettes, 16 bits,
orientation metadata anywhere in the file and damaged files go through Pillow, and randomly
damaged PNGs are answered exactly as Pillow alone answers them."""

from __future__ import annotations

import io
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from decode_fixtures import LIMITS, SIZE, encode
from decode_fixtures import pillow_limit  # noqa: F401  (an autouse fixture)
from harness import PNG_IHDR_END, damaged as harness_damaged, noise as _noise, png_chunk as _chunk
from models.preprocessing import load_image
from service.pipeline.decode import ImageRejected, Rendering, UndecodableImage, decode_image
from service.pipeline.plain_png import decode_plain_png


def _with_chunk_before_pixels(png: bytes, kind: bytes, data: bytes) -> bytes:
    return png[:PNG_IHDR_END] + _chunk(kind, data) + png[PNG_IHDR_END:]


def _with_chunk_before_iend(png: bytes, kind: bytes, data: bytes) -> bytes:
    end = png.rindex(b"IEND") - 4  # the IEND chunk's length field
    return png[:end] + _chunk(kind, data) + png[end:]


def _opened_png(data: bytes) -> Image.Image:
    return Image.open(io.BytesIO(data))


@pytest.mark.parametrize("case", ["RGB", "RGB-interlaced", "RGB-compress-9"])
def test_plain_pngs_take_libspng_and_decode_to_pillows_pixels(case: str, tmp_path: Path) -> None:
    img = Image.fromarray(_noise(61, 47))
    kw = {"interlace": 1} if case == "RGB-interlaced" else {"compress_level": 9} if case == "RGB-compress-9" else {}
    data = encode(img, "PNG", **kw)
    fast = decode_plain_png(_opened_png(data), data)
    assert fast is not None and fast.dtype == np.uint8
    np.testing.assert_array_equal(fast, np.asarray(img))
    (tmp_path / "x.png").write_bytes(data)
    for size in (SIZE, 61, 100):  # down, the input's own width (the height still differs), up
        decoded = decode_image(data, size, LIMITS)
        np.testing.assert_array_equal(decoded.tensor, load_image(tmp_path / "x.png", size))  # the trainer's pixels
        assert decoded.tensor.flags["C_CONTIGUOUS"] and decoded.tensor.shape == (size, size, 3)
    # an original-size overlay's display copy: the image's own pixels, in RGB
    overlaid = decode_image(data, SIZE, LIMITS, rendering=Rendering(heatmap="original", overlay=True))
    assert overlaid.display is not None and overlaid.display.mode == "RGB"
    np.testing.assert_array_equal(np.asarray(overlaid.display), np.asarray(img))


def test_a_plain_png_at_the_models_size_is_the_model_input_as_decoded(tmp_path: Path) -> None:
    pixels = _noise(48, 48)
    data = encode(Image.fromarray(pixels))
    decoded = decode_image(data, 48, LIMITS)
    np.testing.assert_array_equal(decoded.tensor, pixels)
    assert decoded.tensor.flags["C_CONTIGUOUS"] and decoded.tensor.shape == (48, 48, 3)
    (tmp_path / "x.png").write_bytes(data)
    np.testing.assert_array_equal(decoded.tensor, load_image(tmp_path / "x.png", 48))
    # an original-size overlay still gets its display copy
    overlaid = decode_image(data, 48, LIMITS, rendering=Rendering(heatmap="original", overlay=True))
    assert overlaid.display is not None and overlaid.display.size == (48, 48)
    np.testing.assert_array_equal(np.asarray(overlaid.display), pixels)


def test_pngs_libspng_must_not_decide_go_through_pillow(tmp_path: Path) -> None:
    """Grey, transparency, alpha, palettes, 16 bits, orientation metadata anywhere in the file,
    and files libspng refuses: Pillow decodes them (or refuses them), as before."""
    rgb = Image.fromarray(_noise(40, 20))
    sideways = rgb.getexif()
    sideways[0x0112] = 6  # rotate 90 degrees clockwise to view
    plain = encode(rgb)
    exif_after_pixels = _with_chunk_before_iend(plain, b"eXIf", sideways.tobytes())
    cases = {
        "L": encode(rgb.convert("L")),
        "RGB-tRNS": encode(rgb, "PNG", transparency=(1, 2, 3)),
        "RGBA": encode(rgb.convert("RGBA")),
        "P": encode(rgb.convert("P")),
        "RGB-16": png_with_depth(_noise(40, 20), 16),
        "I;16": encode(Image.fromarray(np.asarray(rgb.convert("L"), dtype=np.uint16) * 257)),
        "eXIf-before-pixels": encode(rgb, "PNG", exif=sideways.tobytes()),
        "eXIf-after-pixels": exif_after_pixels,
        **_orientation_in_text(plain, sideways.tobytes()),
    }
    for name, data in cases.items():
        assert decode_plain_png(_opened_png(data), data) is None, name
        decoded = decode_image(data, SIZE, LIMITS, name=name)
        (tmp_path / "x.png").write_bytes(data)
        np.testing.assert_array_equal(decoded.tensor, load_image(tmp_path / "x.png", SIZE), err_msg=name)
        if name.startswith(("eXIf", "text")):
            assert decoded.size == (20, 40), name  # upright, wherever the orientation is in the file
    # Damaged pixel data (one bit, as a bad line or disk would flip it): libspng, as pyspng
    # drives it, checks neither the CRC nor zlib's Adler-32 and would decode damaged pixels;
    # the CRCs send the file to Pillow, which refuses it (422), as before libspng.
    idat = plain.index(b"IDAT")
    length = struct.unpack(">I", plain[idat - 4:idat])[0]
    flipped = plain[:idat + 40] + bytes([plain[idat + 40] ^ 0x10]) + plain[idat + 41:]
    assert decode_plain_png(_opened_png(flipped), flipped) is None
    with pytest.raises(UndecodableImage):
        decode_image(flipped, SIZE, LIMITS)
    # A bad CRC over intact data: Pillow (which does not check it) decodes it, as before.
    crc_at = idat + 4 + length
    bad_crc = plain[:crc_at] + bytes(b ^ 0xFF for b in plain[crc_at:crc_at + 4]) + plain[crc_at + 4:]
    assert decode_plain_png(_opened_png(bad_crc), bad_crc) is None
    np.testing.assert_array_equal(decode_image(bad_crc, SIZE, LIMITS).tensor, decode_image(plain, SIZE, LIMITS).tensor)
    # Bytes after IEND: Pillow's business too.
    trailing = plain + b"\0" * 16
    assert decode_plain_png(_opened_png(trailing), trailing) is None
    # Twenty damaged bytes: refused (422), as before.
    corrupt = plain[:idat + 10] + bytes(b ^ 0x5A for b in plain[idat + 10:idat + 30]) + plain[idat + 30:]
    assert decode_plain_png(_opened_png(corrupt), corrupt) is None
    with pytest.raises(UndecodableImage):
        decode_image(corrupt, SIZE, LIMITS)
    # Up to a 2048 x 2048 frame only (beyond it, Pillow's decode holds less memory).
    frame, beyond = encode(Image.new("RGB", (2048, 2048), (9, 8, 7))), encode(Image.new("RGB", (2049, 2048), (9, 8, 7)))
    assert decode_plain_png(_opened_png(frame), frame) is not None
    assert decode_plain_png(_opened_png(beyond), beyond) is None
    # Truncated pixel data stays a 422.
    with pytest.raises(UndecodableImage):
        decode_image(plain[: len(plain) * 2 // 3], SIZE, LIMITS)


def _orientation_in_text(png: bytes, exif: bytes) -> dict[str, bytes]:
    """``png`` with a rotation (``exif``: orientation 6) in each kind of text chunk Pillow reads
    one from, before or after the pixels."""
    hexed = exif.hex()
    profile = f"\nexif\n{len(exif):8d}\n" + "\n".join(hexed[i:i + 72] for i in range(0, len(hexed), 72)) + "\n"
    xmp = ('<x:xmpmeta xmlns:x="adobe:ns:meta/"><rdf:RDF xmlns:rdf="http://www.w3.org/1999/02/22-rdf-syntax-ns#">'
           '<rdf:Description xmlns:tiff="http://ns.adobe.com/tiff/1.0/" tiff:Orientation="6"/></rdf:RDF></x:xmpmeta>')
    raw_profile = b"Raw profile type exif\0" + profile.encode()
    return {
        "text-tEXt-raw-profile": _with_chunk_before_pixels(png, b"tEXt", raw_profile),
        "text-zTXt-raw-profile": _with_chunk_before_pixels(
            png, b"zTXt", b"Raw profile type exif\0\0" + zlib.compress(profile.encode())),
        "text-tEXt-raw-profile-after-pixels": _with_chunk_before_iend(png, b"tEXt", raw_profile),
        "text-iTXt-xmp": _with_chunk_before_pixels(png, b"iTXt", b"XML:com.adobe.xmp\0\0\0\0\0" + xmp.encode()),
    }


def test_text_that_cannot_orient_keeps_a_png_on_libspng() -> None:
    """Only a text chunk's keyword decides (a comment mentioning EXIF or XMP does not), so
    an ordinary annotated PNG keeps the fast path; its pixels are Pillow's."""
    pixels = _noise(40, 20)
    plain = encode(Image.fromarray(pixels))
    for kind, payload in ((b"tEXt", b"Software\0camera firmware: exif off, xmp off"),
                          (b"iTXt", b"Comment\0\0\0\0\0no XMP or Exif here")):
        data = _with_chunk_before_pixels(plain, kind, payload)
        decoded = decode_plain_png(_opened_png(data), data)
        assert decoded is not None, kind
        np.testing.assert_array_equal(decoded, pixels)


def png_with_depth(pixels: np.ndarray, depth: int) -> bytes:
    """An RGB PNG at ``depth`` bits per sample (Pillow writes 8-bit RGB only)."""
    h, w, _ = pixels.shape
    samples = pixels.astype(">u2") * 257 if depth == 16 else pixels
    raw = b"".join(b"\0" + samples[row].tobytes() for row in range(h))
    ihdr = struct.pack(">IIBBBBB", w, h, depth, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", ihdr) + _chunk(b"IDAT", zlib.compress(raw)) + _chunk(b"IEND", b"")


def test_damaged_pngs_are_answered_exactly_as_pillow_alone_answers_them(monkeypatch: pytest.MonkeyPatch) -> None:
    """Differential: randomly damaged PNGs (bytes changed, cut, inserted), each answered with
    the libspng path and with Pillow alone: the same refusal code, or the same pixels
    (docs/performance-log.md has the long run: 404,543 files, no difference)."""
    import random

    import service.pipeline.plain_png as plain_png

    libspng = plain_png.pyspng
    assert libspng is not None
    rng = random.Random(20261205)
    seeds = [encode(Image.fromarray(_noise(w, h, seed)), "PNG", **kw)
             for (w, h, seed, kw) in ((48, 32, 1, {}), (40, 40, 2, {"interlace": 1}), (5, 17, 3, {"compress_level": 0}))]
    assert all(decode_plain_png(_opened_png(seed), seed) is not None for seed in seeds)  # intact: libspng's

    def outcome(data: bytes, libspng: object) -> tuple[str, bytes]:
        monkeypatch.setattr(plain_png, "pyspng", libspng)
        try:
            return "ok", decode_image(data, SIZE, LIMITS).tensor.tobytes()
        except ImageRejected as exc:
            return exc.code, b""

    codes: set[str] = set()
    for _ in range(1500):
        # the signature stays: Pillow opens it as PNG
        damaged = harness_damaged(rng.choice(seeds), rng, edits=rng.randint(1, 4), longest=32, start=8)
        answer = outcome(damaged, libspng)
        assert answer == outcome(damaged, None)
        codes.add(answer[0])
    assert {"ok", "undecodable_image"} <= codes  # damage Pillow tolerates, and damage it refuses
