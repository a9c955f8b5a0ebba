"""Post-processing on a constructed map, no engine: score normalisation, verdict (calibrated and
overridden), defect regions, heatmap modes, and the per-image record's stages."""

from __future__ import annotations

import asyncio
import base64
import io
import time
from datetime import datetime, timezone
from collections.abc import Callable
from typing import Any

import numpy as np
import pytest
from PIL import Image

from models.manifest import Calibration, Manifest, ScoreStats
from service.pipeline.decode import ImageLimits, decode_image
from service.pipeline.item import InspectedImage, StageMissing
from service.pipeline.postprocess import ResultPolicy, postprocess
from service.pipeline.regions import RegionParams
from service.schemas import HeatmapLink, HeatmapMode, HeatmapSize, InspectOptions, Upload

S = 16  # map and model input size
WIDTH, HEIGHT = 64, 32  # the "upload": not square, so boxes show the rescale

CAL = Calibration(score_output="image_score", method="target_fpr", threshold=2.0, score_min=0.0, score_max=4.0,
                  normal_scores=ScoreStats(count=10, mean=1.0, std=0.1, min=0.8, p50=1.0, p95=1.2, p99=1.3, max=1.4),
                  map_low=0.0, map_high=1.0, pixel_threshold=0.5)
# Only what post-processing reads (version, calibration); a full manifest needs an export.
MANIFEST = Manifest.model_construct(category="brick", version="7", input_size=S, calibration=CAL)


async def inline(fn: Callable[..., Any], *args: Any) -> Any:
    """``run_blocking`` without a pool: the stage functions are plain blocking calls."""
    return fn(*args)


class Links:
    """A link store that keeps PNGs in a dict and says they are not durable (memory only)."""

    def __init__(self) -> None:
        self.pngs: dict[str, bytes] = {}

    async def put(self, png: bytes, width: int, height: int,
                  deadline: float | None = None) -> tuple[HeatmapLink, bool]:
        link_id = f"id{len(self.pngs)}"
        self.pngs[link_id] = png
        return HeatmapLink(url=f"/v1/heatmaps/{link_id}.png", expires_at=datetime.now(timezone.utc),
                           width=width, height=height), False


def scored(raw: float, index: int = 0) -> InspectedImage:
    """A record as the engine stage leaves it: a hot 4x4 block at map rows 4-7, columns 8-11."""
    anomaly_map = np.zeros((S, S), dtype=np.float32)
    anomaly_map[4:8, 8:12] = 0.9
    rgb = Image.fromarray(np.full((HEIGHT, WIDTH, 3), 120, dtype=np.uint8))
    return InspectedImage(index=index, filename=f"{index}.png", width=WIDTH, height=HEIGHT, display=rgb,
                          tensor=np.full((S, S, 3), 120, np.uint8),
                          format="PNG", decode_ms=1.5, raw_score=raw, anomaly_map=anomaly_map, batch_size=2,
                          queue_ms=3.0, engine_ms=4.0, engine="fake")


def run(items: list[InspectedImage], options: InspectOptions = InspectOptions(), links: Any = None,
        **kw: Any) -> None:
    asyncio.run(postprocess(items, MANIFEST, options, inline, links, time.monotonic(), **kw))


def test_score_normalisation_verdict_and_timings() -> None:
    items = [scored(3.0, 0), scored(1.0, 1), scored(10.0, 2), scored(2.0, 3)]
    run(items, InspectOptions(heatmap=HeatmapMode.none))
    results = [item.answer for item in items]
    # (raw - threshold) / (max - min) + 0.5, clamped: the threshold maps to 0.5
    assert [r.score for r in results] == [0.75, 0.25, 1.0, 0.5]
    assert [r.is_anomalous for r in results] == [True, False, True, True]  # at the threshold counts
    assert all(r.threshold == 2.0 and r.model_version == "7" and r.heatmap is None for r in results)
    assert [(r.index, r.filename) for r in results] == [(i, f"{i}.png") for i in range(4)]
    t = results[0].timings_ms
    assert (t.decode, t.queue, t.engine, results[0].batch_size) == (1.5, 3.0, 4.0, 2)
    assert t.total >= 0 and t.render >= 0
    assert results[0].image_size.width == WIDTH and results[0].image_size.height == HEIGHT
    assert all(item.stage == "answered" for item in items)


def test_three_way_verdict_from_two_bounds() -> None:
    # CAL: threshold 2.0, span 4.0, no recorded ng bound: the default margin puts it at 2.4
    items = [scored(raw, i) for i, raw in enumerate((1.99, 2.0, 2.39, 2.4, 9.0))]
    run(items, InspectOptions(heatmap=HeatmapMode.none))
    assert [i.answer.verdict for i in items] == ["ok", "review", "review", "ng", "ng"]
    assert [i.answer.is_anomalous for i in items] == [False, True, True, True, True]  # unchanged meaning
    assert all(i.answer.ng_threshold == pytest.approx(2.4) for i in items)
    # both bounds overridden: 3.0 <= review < 5.0
    moved = [scored(raw, i) for i, raw in enumerate((2.5, 3.0, 4.9, 5.0))]
    run(moved, InspectOptions(heatmap=HeatmapMode.none),
        policy=ResultPolicy(calibration=lambda m: m.calibration.with_threshold(3.0, 5.0)))
    assert [i.answer.verdict for i in moved] == ["ok", "review", "review", "ng"]
    assert {(i.answer.threshold, i.answer.ng_threshold) for i in moved} == {(3.0, 5.0)}


def test_regions_are_boxes_in_the_upload() -> None:
    item = scored(3.0)
    run([item], InspectOptions(heatmap=HeatmapMode.none))
    (region,) = item.answer.regions
    # map column 8..11 of 16 -> x 32..48 of 64; map row 4..7 of 16 -> y 8..16 of 32
    assert (region.x, region.y, region.width, region.height) == (32, 8, 16, 8)
    assert region.area == 16 * (WIDTH * HEIGHT) // (S * S)
    assert region.peak == pytest.approx(0.9) and region.mean == pytest.approx(0.9)
    # too small for a 10 % minimum area: no region, the verdict is unchanged
    small = scored(3.0)
    run([small], InspectOptions(heatmap=HeatmapMode.none), policy=ResultPolicy(regions=RegionParams(
        min_area_fraction=0.1)))
    assert small.answer.regions == [] and small.answer.is_anomalous


def test_a_threshold_override_decides_score_and_verdict() -> None:
    item = scored(3.0)
    policy = ResultPolicy(calibration=lambda m: m.calibration.with_threshold(3.5))
    run([item], InspectOptions(heatmap=HeatmapMode.none), policy=policy)
    r = item.answer
    assert r.threshold == 3.5 and not r.is_anomalous and r.score == pytest.approx(0.375)
    assert len(r.regions) == 1  # regions follow the pixel threshold, which an override leaves alone


def test_heatmap_modes() -> None:
    inline_item, linked, png_only = scored(3.0, 0), scored(3.0, 1), scored(3.0, 2)
    run([inline_item])  # default: inline, at the model's size
    heat = inline_item.answer.heatmap
    assert heat is not None and not isinstance(heat, HeatmapLink)
    assert Image.open(io.BytesIO(base64.b64decode(heat.data))).size == (S, S) == (heat.width, heat.height)
    assert inline_item.heatmap_png == base64.b64decode(heat.data) and inline_item.durable

    links = Links()
    run([linked], InspectOptions(heatmap=HeatmapMode.url, heatmap_size=HeatmapSize.original, overlay=True), links)
    link = linked.answer.heatmap
    assert isinstance(link, HeatmapLink) and (link.width, link.height) == (WIDTH, HEIGHT)
    assert links.pngs[link.url.split("/")[-1][:-4]] == linked.heatmap_png
    assert linked.durable is False  # the link store said memory only: the runtime will not cache it

    # an image/png answer renders even with heatmap=none, and stores no link
    run([png_only], InspectOptions(heatmap=HeatmapMode.none), links, render_all=True)
    assert png_only.heatmap_png is not None and len(links.pngs) == 1


def test_the_record_says_how_far_an_image_got() -> None:
    data = io.BytesIO()
    Image.fromarray(np.full((HEIGHT, WIDTH, 3), 50, dtype=np.uint8)).save(data, format="PNG")
    item = InspectedImage.received(3, Upload(filename="x.png", data=data.getvalue()), queue_ms=12.0)
    assert item.stage == "received" and item.queue_ms == 12.0
    with pytest.raises(StageMissing, match="not decoded"):
        _ = item.model_input
    decoded = decode_image(item.data, S, ImageLimits(max_bytes=1 << 20, max_pixels=1 << 20), "x.png")
    assert decoded.stage == "decoded" and decoded.size == (WIDTH, HEIGHT) and decoded.model_input.shape == (S, S, 3)
    with pytest.raises(StageMissing, match="not scored"):
        run([decoded])
    assert decoded.stage == "decoded" and decoded.result is None



def test_bare_heatmap_is_a_palette_png_with_the_colormap_colours() -> None:
    """heatmap without overlay: mode P with the colormap as palette, the very colours of the
    RGB rendering, in a third of the bytes to filter and deflate."""
    from service.pipeline.render import colorize, render_heatmap

    item = scored(3.0)
    png = Image.open(io.BytesIO(render_heatmap(item.score_map, MANIFEST.calibration, (S, S))))
    assert png.mode == "P"
    np.testing.assert_array_equal(np.asarray(png.convert("RGB")), colorize(item.score_map, MANIFEST.calibration))


def test_colorize_is_the_colormap_looked_up_and_blend_rounds_its_fixed_point() -> None:
    """The overlay's two steps, against their definitions: each index's colour from the
    colormap, and ``(base * (256 - w) + heat * w + 128) >> 8`` with w = alpha * 256, at the
    overlays' alpha (one half, computed without widening) and at another."""
    from service.pipeline.render import LUT, blend, colorize, colour_indices

    rng = np.random.default_rng(1)
    amap = rng.normal(0.5, 0.4, (40, 24)).astype(np.float32)
    rgb = colorize(amap, CAL, (30, 50))
    assert rgb.shape == (50, 30, 3) and rgb.dtype == np.uint8
    np.testing.assert_array_equal(rgb, LUT[colour_indices(amap, CAL, (30, 50))])
    base = rng.integers(0, 256, (50, 30, 3), dtype=np.uint8)
    base[0, 0], rgb_ends = (255, 255, 0), rgb.copy()
    rgb_ends[0, 0] = (255, 0, 0)  # both ends of the range: 255 + 255 and 255 + 0
    for alpha in (0.5, 0.25):
        w = round(alpha * 256)
        expected = ((base.astype(np.int64) * (256 - w) + rgb_ends.astype(np.int64) * w + 128) >> 8).astype(np.uint8)
        out = blend(base, rgb_ends, alpha)
        assert out.dtype == np.uint8
        np.testing.assert_array_equal(out, expected)


def test_an_overlay_is_the_blend_written_as_an_rgb_png() -> None:
    from service.pipeline.render import OVERLAY_ALPHA, blend, colorize, render_heatmap

    item = scored(3.0)
    background = Image.fromarray(np.random.default_rng(2).integers(0, 256, (S, S, 3), dtype=np.uint8))
    png = Image.open(io.BytesIO(render_heatmap(item.score_map, MANIFEST.calibration, (S, S), background)))
    assert png.mode == "RGB" and png.size == (S, S)
    expected = blend(np.asarray(background), colorize(item.score_map, MANIFEST.calibration), OVERLAY_ALPHA)
    np.testing.assert_array_equal(np.asarray(png), expected)


def test_no_heatmap_png_is_larger_than_the_bound_the_link_budget_is_checked_against() -> None:
    from service.config import largest_heatmap_png_bytes
    from service.pipeline.render import render_heatmap

    rng = np.random.default_rng(3)
    noise = rng.random((S, S), dtype=np.float32)  # a map deflate cannot shrink either
    for width, height in ((640, 480), (1, 5000), (5000, 1)):  # a thin image: a filter byte per pixel
        background = Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))
        png = render_heatmap(noise, MANIFEST.calibration, (width, height), background)
        assert 0.9 * 3 * width * height < len(png) <= largest_heatmap_png_bytes(width * height)


def test_normalise_map_clips_and_paints_non_finite_values_at_their_ends() -> None:
    """low -> 0, high -> 255, clipped outside; NaN counts as low, infinities as their end,
    and a finite value that overflows float32 when scaled as high."""
    from service.pipeline.render import normalise_map

    m = np.array([[0.0, 1.0, 2.0, -5.0], [np.nan, np.inf, -np.inf, 3e38], [3e38, 3e38, 1.5, 0.5]], dtype=np.float32)
    with np.errstate(over="ignore"):  # 3e38 * 255 overflows float32, on purpose
        out = normalise_map(m, low=1.0, high=2.0)
    np.testing.assert_array_equal(out, [[0, 0, 255, 0], [0, 255, 0, 255], [255, 255, 128, 0]])
    smooth = np.linspace(1.0, 2.0, 256, dtype=np.float32).reshape(16, 16)
    np.testing.assert_array_equal(normalise_map(smooth, 1.0, 2.0), np.rint((smooth - 1.0) * 255.0).astype(np.uint8))
