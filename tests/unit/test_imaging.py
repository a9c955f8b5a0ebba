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
from PIL import Image, PngImagePlugin

from harness import PNG_IHDR_END, damaged as harness_damaged, noise as _noise, png_chunk as _chunk
from models.data import MVTecCategory, Sample
from models.data_loading import load_images
from models.image_acceptance import max_image_pixels
from models.preprocessing import draft_size, load_image
from service.pipeline.decode import (MAX_PNG_TEXT_BYTES, ImageLimits, ImageRejected, ImageTooLarge, Rendering,
                                     UndecodableImage, UnsupportedImageType, configure_pillow, decode_image, fit_within)
from service.pipeline.plain_png import decode_plain_png

SIZE = 32
LIMITS = ImageLimits(max_bytes=5_000_000, max_pixels=4_000_000)


@pytest.fixture(autouse=True)
def pillow_limit() -> Iterator[None]:
    """configure_pillow changes Pillow globals and the process's pixel limit (the trainer's
    too: models.image_acceptance); restore them for the rest of the suite."""
    before = Image.MAX_IMAGE_PIXELS, PngImagePlugin.MAX_TEXT_MEMORY, max_image_pixels()
    configure_pillow(LIMITS.max_pixels)
    yield
    configure_pillow(before[2])
    Image.MAX_IMAGE_PIXELS, PngImagePlugin.MAX_TEXT_MEMORY = before[:2]


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
    assert decoded.size == (40, 30) and decoded.display is None  # no full-size copy outlives the decode
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


def photo(width: int, height: int, seed: int = 0) -> np.ndarray:
    """A smooth camera-like RGB image (JPEG compresses it as it would a photograph)."""
    y, x = np.mgrid[0:height, 0:width].astype(np.float32)
    noise = np.random.default_rng(seed).normal(0, 6, (height, width, 1))
    base = np.stack([128 + 80 * np.sin(x / 37), 128 + 80 * np.cos(y / 53), 128 + 60 * np.sin((x + y) / 71)], -1)
    return np.clip(base + noise, 0, 255).astype(np.uint8)


@pytest.mark.parametrize("orientation", [1, 6])
def test_large_jpeg_decodes_at_reduced_scale_like_the_trainer(orientation: int, tmp_path: Path) -> None:
    """A 2048 x 1536 camera JPEG for a 128 px model is decoded at 1/8 scale (256 x 192) on
    both sides: the served tensor is the trainer's, bit for bit, and the price admission
    sees is the reduced decode, not the full one."""
    img = Image.fromarray(photo(2048, 1536))
    exif = img.getexif()
    exif[0x0112] = orientation
    data = encode(img, "JPEG", quality=92, exif=exif.tobytes())
    path = tmp_path / "camera.jpg"
    path.write_bytes(data)
    size = 128
    assert draft_size("JPEG", (2048, 1536), size) == (256, 192)
    with Image.open(io.BytesIO(data)) as probe:  # Pillow's own choice agrees with the header-only rule
        probe.draft(None, (size, size))
        assert probe.size == (256, 192)
    decoded = decode_image(data, size, LIMITS)
    np.testing.assert_array_equal(decoded.tensor, load_image(path, size))
    assert decoded.size == ((2048, 1536) if orientation == 1 else (1536, 2048))
    assert decoded.cost == 256 * 192 + 2 * size * size  # decode + model input and map; no heatmap asked for
    full = np.asarray(Image.open(path).convert("RGB").resize((size, size), Image.Resampling.LANCZOS))
    if orientation == 1:  # DCT scaling is a proper low-pass: close to the full decode's Lanczos
        assert np.abs(decoded.tensor.astype(int) - full.astype(int)).mean() < 3.0


def test_draft_size_never_goes_below_the_model_size() -> None:
    assert draft_size("JPEG", (300, 300), 256) == (300, 300)  # 1/2 would be 150 < 256
    assert draft_size("JPEG", (1024, 600), 256) == (512, 300)  # 1/4 would be 150 on the short side
    assert draft_size("PNG", (4096, 4096), 256) == (4096, 4096)  # only JPEG scales while decoding


def test_original_size_heatmap_is_capped_and_priced() -> None:
    """An original-size overlay of a 3000 x 1000 image under a 1 MP cap is rendered at
    1732 x 577 (aspect kept); the display copy kept for it is that size, not the upload's."""
    limits = ImageLimits(max_bytes=LIMITS.max_bytes, max_pixels=LIMITS.max_pixels, max_heatmap_pixels=1_000_000)
    data = encode(Image.fromarray(photo(3000, 1000)), "PNG", compress_level=1)
    decoded = decode_image(data, SIZE, limits, rendering=Rendering(heatmap="original", overlay=True))
    assert decoded.render_size == fit_within((3000, 1000), 1_000_000) == (1732, 577)
    assert decoded.display is not None and decoded.display.size == (1732, 577)
    assert decoded.cost == 3000 * 1000 + 2 * 1732 * 577 + 2 * SIZE * SIZE
    model_only = decode_image(data, SIZE, limits, rendering=Rendering(heatmap="model", overlay=True))
    assert model_only.display is None and model_only.render_size == (SIZE, SIZE)


def test_original_overlay_of_a_large_jpeg_decodes_a_sharp_background(tmp_path: Path) -> None:
    """The model decode of a 2000 px JPEG is 1/8 scale (250 px); an original-size overlay
    capped at 0.25 MP needs a 500 px background, so a second decode at 1/4 scale provides it."""
    data = encode(Image.fromarray(photo(2000, 2000)), "JPEG", quality=90)
    limits = ImageLimits(max_bytes=LIMITS.max_bytes, max_pixels=LIMITS.max_pixels, max_heatmap_pixels=250_000)
    decoded = decode_image(data, 128, limits, rendering=Rendering(heatmap="original", overlay=True))
    assert decoded.redecode_size == (500, 500) and decoded.display.size == (500, 500)
    assert decoded.cost == 250 * 250 + 500 * 500 + 500 * 500 + 500 * 500 + 2 * 128 * 128


# ---------------------------------------------------------------------- PNGs decoded by libspng
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
