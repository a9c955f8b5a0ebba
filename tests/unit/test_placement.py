"""Where a request's blocking work runs (service.pipeline.placement): small requests on the
event loop, larger ones and containers an upload can make slow to walk in the decode threads."""

from __future__ import annotations

from PIL import Image

from harness import PNG_IHDR_END, jpeg_segment, png_chunk, png_of
from service.pipeline.decode import ImageLimits, Rendering, probe_into
from service.pipeline.item import InspectedImage
from models.image_framing import container_segments
from service.pipeline.placement import BYTES_PER_PIXEL, MAX_LOOP_SEGMENTS, probe_on_loop, work_on_loop, work_pixels

LIMITS = ImageLimits(max_bytes=50 << 20, max_pixels=100_000_000, max_heatmap_pixels=4_000_000)
LIMIT = 500_000


def encoded(side: int, fmt: str, **params: object) -> bytes:
    """A flat ``side`` x ``side`` image in ``fmt``."""
    return png_of(Image.new("RGB", (side, side), (120, 60, 30)), fmt, **params)


def probed(data: bytes, rendering: Rendering = Rendering(), model: int = 256) -> InspectedImage:
    """A probed record of ``data`` for a ``model`` px model."""
    item = InspectedImage(index=0, filename="upload", data=data)
    probe_into(item, model, LIMITS, rendering)
    return item


def test_work_counts_what_the_decoder_reads_and_what_the_pipeline_holds() -> None:
    small = probed(encoded(256, "JPEG"))
    assert work_pixels(small) == 256 * 256 + small.cost
    camera = probed(encoded(2048, "JPEG"))  # decoded at 1/8 scale: cheap to hold, not to read
    assert camera.cost < small.cost + 256 * 256 and work_pixels(camera) > 2048 * 2048
    with_heatmap = probed(encoded(256, "PNG"), Rendering(heatmap="model"))
    assert work_pixels(with_heatmap) == work_pixels(probed(encoded(256, "PNG"))) + 256 * 256


def test_small_requests_work_on_the_loop_and_large_ones_in_the_threads() -> None:
    one = probed(encoded(256, "PNG"), Rendering(heatmap="model"))
    assert probe_on_loop([one], LIMIT) and work_on_loop([one], LIMIT)
    assert not work_on_loop([one] * 2, LIMIT)  # the request's images add up: the loop is held per request
    assert not work_on_loop([probed(encoded(2048, "JPEG"))], LIMIT)
    assert work_on_loop([probed(encoded(384, "PNG"))], LIMIT)
    assert not work_on_loop([probed(encoded(384, "PNG"), Rendering(heatmap="original", overlay=True))], LIMIT)
    progressive = probed(encoded(256, "JPEG", progressive=True))  # scans, not pixels, bound its decode
    assert probe_on_loop([progressive], LIMIT) and not work_on_loop([progressive], LIMIT)
    assert not probe_on_loop([one], 0)  # 0: always in the threads


def test_the_probe_runs_on_the_loop_for_few_bytes_and_few_segments_only() -> None:
    png = encoded(64, "PNG")
    padded = png[:PNG_IHDR_END] + png_chunk(b"prVt", bytes(BYTES_PER_PIXEL * LIMIT - len(png) - 12)) + png[PNG_IHDR_END:]
    assert len(padded) == BYTES_PER_PIXEL * LIMIT and probe_on_loop([probed(padded)], LIMIT)
    assert not probe_on_loop([probed(padded), probed(png)], LIMIT)  # the request's bytes add up
    # Pillow walks chunks in Python: as many as the upload's bytes allow go to the threads.
    chunky = png[:PNG_IHDR_END] + png_chunk(b"prVt", b"") * MAX_LOOP_SEGMENTS + png[PNG_IHDR_END:]
    assert container_segments(chunky, MAX_LOOP_SEGMENTS) == MAX_LOOP_SEGMENTS + 1
    assert not probe_on_loop([InspectedImage(index=0, filename=None, data=chunky)], LIMIT)
    jpeg = encoded(64, "JPEG")
    assert container_segments(jpeg, MAX_LOOP_SEGMENTS) is not None and probe_on_loop([probed(jpeg)], LIMIT)
    comments = jpeg[:2] + jpeg_segment(0xFE) * MAX_LOOP_SEGMENTS + jpeg[2:]
    assert not probe_on_loop([InspectedImage(index=0, filename=None, data=comments)], LIMIT)
    assert not probe_on_loop([probed(encoded(64, "BMP"))], LIMIT)  # formats whose walk is not counted here


def test_container_segments_counts_the_framing_only() -> None:
    png = encoded(32, "PNG")
    assert container_segments(png, 64) == 3  # IHDR, IDAT, IEND
    assert container_segments(png[:-6], 64) is None  # no IEND: the decoders judge it
    jpeg = encoded(32, "JPEG")
    # SOI is not counted; APP0, DQT x2, SOF0, DHT x4, then the first SOS
    assert container_segments(jpeg, 64) == 9
    assert container_segments(jpeg, 3) == 4  # stops once above the bound
    assert container_segments(b"GIF89a" + bytes(20), 64) is None
