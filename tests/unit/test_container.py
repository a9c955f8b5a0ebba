"""The framing budget (models.image_framing): PNG chunks, JPEG segments and a TIFF's tags and
strips counted before Pillow walks them one by one in Python; real files pass, made-up ones are refused from the count."""

from __future__ import annotations

import struct

import pytest
from PIL import Image

from harness import PNG_IHDR_END, jpeg_segment, noise, png_chunk, png_of
from models.image_framing import (BASE_SEGMENTS, BYTES_PER_EXTRA_SEGMENT, MAX_JPEG_SCANS, container_segments,
                                        jpeg_scans, over_budget, segment_budget, tiff_framing)
from service.pipeline.decode import ImageLimits, UndecodableImage, decode_image

LIMITS = ImageLimits(max_bytes=20 << 20, max_pixels=40_000_000)


def split_idat(png: bytes, size: int) -> bytes:
    """``png`` with its pixel stream cut into ``size``-byte IDAT chunks (what libpng writes at 8 KiB)."""
    at, stream, ancillary = 8, b"", b""
    while at < len(png):
        length = int.from_bytes(png[at:at + 4], "big")
        kind, body = png[at + 4:at + 8], png[at + 8:at + 8 + length]
        if kind == b"IDAT":
            stream += body
        elif kind not in (b"IHDR", b"IEND"):
            ancillary += png_chunk(kind, body)
        at += 12 + length
    idats = b"".join(png_chunk(b"IDAT", stream[i:i + size]) for i in range(0, len(stream), size))
    return png[:PNG_IHDR_END] + ancillary + idats + png_chunk(b"IEND", b"")


def test_real_files_are_far_below_the_budget() -> None:
    img = Image.fromarray(noise(512, 512))
    png = split_idat(png_of(img, "PNG"), 1024)  # 1 KiB chunks: smaller than any encoder's
    count = container_segments(png, segment_budget(len(png)))
    assert count is not None and count > 700 and over_budget(png) is None
    assert decode_image(png, 64, LIMITS).model_input.shape == (64, 64, 3)
    profile = bytes(range(256)) * 16_000  # a 4 MB ICC profile: 63 APP2 segments
    jpeg = png_of(img, "JPEG", icc_profile=profile, progressive=True)
    assert 63 < container_segments(jpeg, 10_000) < 100 and over_budget(jpeg) is None
    assert decode_image(jpeg, 64, LIMITS).model_input.shape == (64, 64, 3)


@pytest.mark.parametrize("kind", ["png chunks before the pixels", "png chunks after the pixels", "jpeg comments"])
def test_an_upload_of_empty_segments_is_refused_before_pillow_walks_them(kind: str) -> None:
    """2 MB of empty chunks or segments: Pillow took about half a second of CPU (most of it
    holding the GIL) to probe such a file and as long again to decode it; refused from the
    count, before Pillow opens it, with a 422 that says why."""
    size = 2 << 20
    if kind.startswith("png"):
        png = png_of(Image.new("RGB", (64, 64)), "PNG")
        filler = png_chunk(b"prVt", b"") * ((size - len(png)) // 12)
        at = PNG_IHDR_END if "before" in kind else len(png) - 12
        upload = png[:at] + filler + png[at:]
    else:
        jpeg = png_of(Image.new("RGB", (64, 64)), "JPEG")
        upload = jpeg[:2] + jpeg_segment(0xFE) * ((size - len(jpeg)) // 4) + jpeg[2:]
    assert segment_budget(len(upload)) == BASE_SEGMENTS + len(upload) // BYTES_PER_EXTRA_SEGMENT
    with pytest.raises(UndecodableImage, match=f"more than {segment_budget(len(upload))}") as refused:
        decode_image(upload, 64, LIMITS, name="made.up")  # the count's own message: before Pillow opened it
    assert refused.value.status_code == 422 and "'made.up'" in str(refused.value)


def test_other_formats_and_broken_framing_are_left_to_the_decoders() -> None:
    assert container_segments(png_of(Image.new("RGB", (8, 8)), "BMP"), 10) is None
    png = png_of(Image.new("RGB", (8, 8)), "PNG")
    assert container_segments(png[:-6], 10) is None and over_budget(png[:-6]) is None  # no IEND: Pillow's 422
    assert container_segments(b"\xff\xd8\x00\x00\x00", 10) is None


def last_scan(jpeg: bytes) -> bytes:
    """The last scan of a progressive JPEG: its SOS segment and entropy-coded data, up to EOI."""
    start = jpeg.rindex(b"\xff\xda")
    return jpeg[start:jpeg.rindex(b"\xff\xd9")]


def test_a_jpeg_of_repeated_scans_is_refused_before_the_decoder_passes_over_it_per_scan() -> None:
    """libjpeg passes over every block once per scan: 5,000 copies of a small scan made a
    256² JPEG take 25 ms to decode (minutes at 40 megapixels and 20 MB). Encoders write
    about ten; past MAX_JPEG_SCANS the upload is a 422 before any decoding."""
    progressive = png_of(Image.fromarray(noise(256, 256)), "JPEG", quality=90, progressive=True)
    assert 5 <= progressive.count(b"\xff\xda") <= 20 and over_budget(progressive) is None
    assert decode_image(progressive, 64, LIMITS).model_input.shape == (64, 64, 3)
    eoi = progressive.rindex(b"\xff\xd9")
    repeated = progressive[:eoi] + last_scan(progressive) * MAX_JPEG_SCANS + progressive[eoi:]
    with pytest.raises(UndecodableImage, match=f"more than {MAX_JPEG_SCANS} JPEG scans"):
        decode_image(repeated, 64, LIMITS)  # libjpeg would decode it (every scan, one after the other)
    assert jpeg_scans(progressive, MAX_JPEG_SCANS) == progressive.count(b"\xff\xda")
    assert jpeg_scans(repeated, 10**6) == progressive.count(b"\xff\xda") + MAX_JPEG_SCANS


def test_only_the_images_own_scans_count() -> None:
    """What follows the end of the image (a phone's motion-photo video) and an EXIF thumbnail
    (a JPEG inside a segment, skipped by its length) hold start-of-scan bytes of their own."""
    img = Image.fromarray(noise(128, 128))
    baseline = png_of(img, "JPEG")
    trailer = b"\xff\xda\x00\x08" * 100_000  # 400 KB of what a video might hold
    with_video = baseline + trailer
    assert jpeg_scans(with_video, MAX_JPEG_SCANS) == 1 and over_budget(with_video) is None
    thumbnail = png_of(img.resize((32, 32)), "JPEG", progressive=True)
    exif = Image.Exif()
    with_thumbnail = png_of(img, "JPEG", exif=exif.tobytes() + thumbnail * 40)  # 40 thumbnails' scans in APP1
    assert with_thumbnail.count(b"\xff\xda") > 40 and jpeg_scans(with_thumbnail, MAX_JPEG_SCANS) == 1


def strips_tiff(strips: int, width: int = 1, height: int = 2) -> bytes:
    """An 8-bit grey uncompressed TIFF whose first IFD cuts it into ``strips`` one-row strips,
    every offset pointing at the same byte (two bytes an offset, two a byte count)."""
    def entry(tag: int, kind: int, count: int, value: int) -> bytes:
        return struct.pack("<HHII", tag, kind, count, value)
    offsets_at = 8 + 2 + 12 * 8 + 4
    counts_at = offsets_at + 2 * strips
    ifd = [entry(256, 4, 1, width), entry(257, 4, 1, height), entry(258, 3, 1, 8), entry(259, 3, 1, 1),
           entry(262, 3, 1, 1), entry(273, 3, strips, offsets_at), entry(278, 4, 1, 1), entry(279, 3, strips, counts_at)]
    return (b"II*\x00" + struct.pack("<IH", 8, len(ifd)) + b"".join(ifd) + b"\x00" * 4
            + struct.pack(f"<{strips}H", *[8] * strips) + struct.pack(f"<{strips}H", *[1] * strips))


def test_a_tiff_cut_into_more_strips_than_its_budget_is_refused_before_pillow_opens_it() -> None:
    """Pillow makes a tuple per strip as it opens a TIFF, before it checks the pixels, and passes
    over each as it decodes: 4 million one-row strips of a 2-pixel image (16 MB) grew the server
    by a gigabyte and held a decode thread past the deadline, priced as 2 pixels. 200,000 of
    them here (800 KB: a second or two of Pillow, and 50 MB); and the same claiming a size past
    the pixel limit, whose strips Pillow makes before its own check refuses the size."""
    for upload in (strips_tiff(200_000), strips_tiff(200_000, width=100_000, height=100_000)):
        with pytest.raises(UndecodableImage, match="TIFF strips or tiles") as refused:
            decode_image(upload, 64, LIMITS, name="strips.tif")
        assert refused.value.status_code == 422 and "'strips.tif'" in str(refused.value)
    tags = strips_tiff(2)
    tags = tags[:8] + struct.pack("<H", 5000) + tags[10:]  # an IFD claiming 5,000 tags in a 100-byte file
    with pytest.raises(UndecodableImage, match="TIFF tags"):
        decode_image(tags, 64, LIMITS)


def test_real_tiffs_are_within_the_strip_budget() -> None:
    """Encoders cut a compressed image finer than its bytes (Pillow's libtiff: 64 KiB of pixels a
    strip, here one row of 16,384 float pixels, 1,300 strips in a file of 100 KB or so), never
    below a row of 256 pixels."""
    fine = png_of(Image.new("F", (16384, 1300), 0.5), "TIFF", compression="tiff_adobe_deflate")
    framing = tiff_framing(fine, 10**6)
    assert framing is not None and framing[1] == 1300 > segment_budget(len(fine)) and over_budget(fine) is None
    for img in (Image.fromarray(noise(300, 200)), Image.new("L", (256, 3000), 9)):
        tiff = png_of(img, "TIFF")
        assert over_budget(tiff) is None
        assert decode_image(tiff, 64, LIMITS).model_input.shape == (64, 64, 3)
    assert over_budget(strips_tiff(3000, width=256, height=3000)) is None  # one row of 256 pixels a strip
