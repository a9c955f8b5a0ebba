"""Scored images -> the per-image results of the v1 API, in one place.

The synchronous API (:class:`service.pipeline.runtime.ServiceState`) and the job worker
(:mod:`service.worker`) both turn an engine's raw score and anomaly map into an
:class:`~service.schemas.ImageResult` here: the calibrated score and verdict from the
manifest of the engine that scored the image (reload-safe), the heatmap rendered in a
thread (:mod:`service.pipeline.render`) and attached inline (base64) or as a link
(``heatmap=url``), and the timings. So a job's result has exactly the shape and numbers
of a synchronous answer.

A :class:`ResultPolicy` says which calibration decides (the manifest's, or one with a
runtime threshold override: :mod:`service.pipeline.thresholds`) and how defect regions are found
(:mod:`service.pipeline.regions`); the regions are computed in the same thread-pool call as the
heatmap.
"""

from __future__ import annotations

import asyncio
import base64
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from models.manifest import Calibration, Manifest
from service.pipeline.batcher import ItemResult
from service.pipeline.decode import DecodedImage
from service.config import Settings
from service.pipeline.regions import RegionParams, find_regions
from service.pipeline.render import heatmap_for
from service.schemas import (InspectOptions, Heatmap, HeatmapLink, HeatmapMode, HeatmapSize, ImageResult, ImageSize, Region,
                             Timings)

Rendered = tuple[bytes, tuple[int, int], float]  # PNG, (width, height), milliseconds
RunBlocking = Callable[..., Awaitable[Any]]


class LinkStore(Protocol):
    """Where ``heatmap=url`` PNGs go (:class:`service.redisq.store.HeatmapLinks`)."""

    async def put(self, png: bytes, width: int, height: int) -> tuple[HeatmapLink, bool]:
        """Store ``png``; return its link and whether it is durable (in Redis, any host serves it)."""
        ...


@dataclass(frozen=True)
class Built:
    result: ImageResult
    heat: Rendered | None  # the PNG, for an ``Accept: image/png`` answer
    durable: bool  # False when its heatmap link lives only in this process's memory


def render(image: DecodedImage, scored: ItemResult, size: HeatmapSize, overlay: bool) -> Rendered:
    """Blocking: the heatmap PNG of one scored image."""
    t0 = time.perf_counter()
    png, out_size = heatmap_for(scored.anomaly_map, scored.engine.manifest.calibration, image.tensor, image.rgb,
                                size.value, overlay)
    return png, out_size, (time.perf_counter() - t0) * 1e3


def _manifest_calibration(manifest: Manifest) -> Calibration:
    return manifest.calibration


@dataclass(frozen=True)
class ResultPolicy:
    """The effective calibration of a manifest (the API passes
    :meth:`service.pipeline.thresholds.ThresholdOverrides.calibration`, so a runtime threshold
    override decides score and verdict) and the region parameters."""

    calibration: Callable[[Manifest], Calibration] = _manifest_calibration
    regions: RegionParams = RegionParams()


def policy_from_settings(settings: Settings, calibration: Callable[[Manifest], Calibration]) -> ResultPolicy:
    """The policy the API and the workers share: effective thresholds and region limits."""
    return ResultPolicy(calibration=calibration, regions=RegionParams(
        max_regions=settings.max_regions, min_area_fraction=settings.min_region_area))

def analyse(image: DecodedImage, scored: ItemResult, calibration: Calibration, size: HeatmapSize | None,
            overlay: bool, params: RegionParams) -> tuple[Rendered | None, list[Region], float]:
    """Blocking: the heatmap (``size`` None: none) and the defect regions of one scored image,
    and the milliseconds the regions took."""
    heat = render(image, scored, size, overlay) if size is not None else None
    t0 = time.perf_counter()
    regions = find_regions(scored.anomaly_map, calibration, image.size, params)
    return heat, regions, (time.perf_counter() - t0) * 1e3


def image_result(index: int, filename: str | None, image: DecodedImage, scored: ItemResult,
                 heatmap: Heatmap | HeatmapLink | None, render_ms: float, started: float,
                 calibration: Calibration | None = None, regions: Sequence[Region] = ()) -> ImageResult:
    """One image's result; ``started`` is the ``time.monotonic()`` the timings' total counts from.
    ``calibration``: the effective one (default: the scoring engine's manifest's)."""
    # Threshold and version come from the engine that scored *this* image (reload-safe).
    cal = calibration if calibration is not None else scored.engine.manifest.calibration
    return ImageResult(
        index=index, filename=filename, score=round(cal.normalise_score(scored.raw_score), 6),
        raw_score=scored.raw_score, threshold=cal.threshold, is_anomalous=scored.raw_score >= cal.threshold,
        model_version=scored.engine.manifest.version, batch_size=scored.batch_size, heatmap=heatmap,
        timings_ms=Timings(decode=round(image.decode_ms, 3), queue=round(scored.queue_ms, 3),
                           engine=round(scored.engine_ms, 3), render=round(render_ms, 3),
                           total=round((time.monotonic() - started) * 1e3, 3)),
        image_size=ImageSize(width=image.size[0], height=image.size[1]), regions=list(regions),
    )


def inline_heatmap(heat: Rendered) -> Heatmap:
    return Heatmap(data=base64.b64encode(heat[0]).decode("ascii"), width=heat[1][0], height=heat[1][1])


async def build_results(items: Sequence[tuple[int, str | None, DecodedImage, ItemResult]], options: InspectOptions,
                        run_blocking: RunBlocking, links: LinkStore | None, started: float, *,
                        render_all: bool = False, policy: ResultPolicy | None = None) -> list[Built]:
    """Results of ``(index, filename, decoded image, scored item)`` tuples, in order.

    Heatmaps are rendered (in ``run_blocking``'s threads) for ``heatmap=inline`` and ``url``,
    or for every image with ``render_all`` (an ``Accept: image/png`` answer, which then
    carries the PNG itself: no link is stored for it). Defect regions are found for every
    image, in the same thread-pool call.
    """
    policy = policy or ResultPolicy()
    wanted = render_all or options.heatmap is not HeatmapMode.none
    cals = [policy.calibration(sc.engine.manifest) for _, _, _, sc in items]
    analysed = await asyncio.gather(*(run_blocking(analyse, im, sc, cal, options.heatmap_size if wanted else None,
                                                   options.overlay, policy.regions)
                                      for (_, _, im, sc), cal in zip(items, cals)))
    heats: list[Rendered | None] = [a[0] for a in analysed]
    built: list[Built] = []
    for (index, filename, image, scored), heat, cal, (_, regions, regions_ms) in zip(items, heats, cals, analysed):
        field: Heatmap | HeatmapLink | None = None
        durable = True
        if heat is not None:
            if options.heatmap is HeatmapMode.url and not render_all:
                if links is None:
                    raise RuntimeError("heatmap=url needs a link store")
                field, durable = await links.put(heat[0], heat[1][0], heat[1][1])
            else:
                field = inline_heatmap(heat)
        built.append(Built(image_result(index, filename, image, scored, field,
                                        (heat[2] if heat else 0.0) + regions_ms, started, cal, regions),
                           heat, durable))
    return built
