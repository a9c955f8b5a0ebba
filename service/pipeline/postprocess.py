"""Scored images -> the per-image results of the v1 API, in one place.

The synchronous API (:class:`service.pipeline.runtime.ServiceState`) and the job worker
(:mod:`service.worker`) both turn an engine's raw score and anomaly map into an
:class:`~service.schemas.ImageResult` here: the calibrated score and verdict from the
manifest of the model version the request was pinned to, the heatmap rendered in a
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
import numpy as np

from service.pipeline.decode import DecodedImage
from service.config import Settings
from service.pipeline.regions import RegionParams, find_regions
from service.pipeline.render import heatmap_for
from service.schemas import (InspectOptions, Heatmap, HeatmapLink, HeatmapMode, HeatmapSize, ImageResult, ImageSize, Region,
                             Timings)

RunBlocking = Callable[..., Awaitable[Any]]


@dataclass(frozen=True)
class ItemResult:
    """One image as the engine scored it, and the batch it ran in."""

    raw_score: float
    anomaly_map: np.ndarray  # float32 [S, S]
    batch_size: int
    queue_ms: float
    engine_ms: float


@dataclass(frozen=True)
class Rendered:
    """A rendered heatmap PNG."""

    png: bytes
    width: int
    height: int
    render_ms: float


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


def render(image: DecodedImage, scored: ItemResult, calibration: Calibration, size: HeatmapSize,
           overlay: bool) -> Rendered:
    """Blocking: the heatmap PNG of one scored image (coloured with the manifest's calibration)."""
    t0 = time.perf_counter()
    png, (width, height) = heatmap_for(scored.anomaly_map, calibration, image.tensor, image.rgb, size.value, overlay)
    return Rendered(png, width, height, (time.perf_counter() - t0) * 1e3)


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

@dataclass(frozen=True)
class Analysis:
    heat: Rendered | None
    regions: list[Region]
    regions_ms: float


def analyse(image: DecodedImage, scored: ItemResult, manifest: Manifest, calibration: Calibration,
            size: HeatmapSize | None, overlay: bool, params: RegionParams) -> Analysis:
    """Blocking: the heatmap (``size`` None: none) and the defect regions of one scored image,
    and the milliseconds the regions took."""
    heat = render(image, scored, manifest.calibration, size, overlay) if size is not None else None
    t0 = time.perf_counter()
    regions = find_regions(scored.anomaly_map, calibration, image.size, params)
    return Analysis(heat, regions, (time.perf_counter() - t0) * 1e3)


def image_result(index: int, filename: str | None, image: DecodedImage, scored: ItemResult, version: str,
                 heatmap: Heatmap | HeatmapLink | None, render_ms: float, started: float,
                 cal: Calibration, regions: Sequence[Region] = ()) -> ImageResult:
    """One image's result; ``started`` is the ``time.monotonic()`` the timings' total counts from.
    ``cal``: the effective calibration of the pinned model version."""
    return ImageResult(
        index=index, filename=filename, score=round(cal.normalise_score(scored.raw_score), 6),
        raw_score=scored.raw_score, threshold=cal.threshold, is_anomalous=scored.raw_score >= cal.threshold,
        model_version=version, batch_size=scored.batch_size, heatmap=heatmap,
        timings_ms=Timings(decode=round(image.decode_ms, 3), queue=round(scored.queue_ms, 3),
                           engine=round(scored.engine_ms, 3), render=round(render_ms, 3),
                           total=round((time.monotonic() - started) * 1e3, 3)),
        image_size=ImageSize(width=image.size[0], height=image.size[1]), regions=list(regions),
    )


def inline_heatmap(heat: Rendered) -> Heatmap:
    return Heatmap(data=base64.b64encode(heat.png).decode("ascii"), width=heat.width, height=heat.height)


async def build_results(items: Sequence[tuple[int, str | None, DecodedImage, ItemResult]], manifest: Manifest,
                        options: InspectOptions, run_blocking: RunBlocking, links: LinkStore | None, started: float,
                        *, render_all: bool = False, policy: ResultPolicy | None = None) -> list[Built]:
    """Results of ``(index, filename, decoded image, scored item)`` tuples, in order, all scored
    by the model version of ``manifest`` (the request's pinned version).

    Heatmaps are rendered (in ``run_blocking``'s threads) for ``heatmap=inline`` and ``url``,
    or for every image with ``render_all`` (an ``Accept: image/png`` answer, which then
    carries the PNG itself: no link is stored for it). Defect regions are found for every
    image, in the same thread-pool call.
    """
    policy = policy or ResultPolicy()
    wanted = render_all or options.heatmap is not HeatmapMode.none
    cal = policy.calibration(manifest)
    analysed: list[Analysis] = await asyncio.gather(*(
        run_blocking(analyse, im, sc, manifest, cal, options.heatmap_size if wanted else None, options.overlay,
                     policy.regions) for _, _, im, sc in items))
    built: list[Built] = []
    for (index, filename, image, scored), a in zip(items, analysed):
        field: Heatmap | HeatmapLink | None = None
        durable = True
        if a.heat is not None:
            if options.heatmap is HeatmapMode.url and not render_all:
                if links is None:
                    raise RuntimeError("heatmap=url needs a link store")
                field, durable = await links.put(a.heat.png, a.heat.width, a.heat.height)
            else:
                field = inline_heatmap(a.heat)
        render_ms = (a.heat.render_ms if a.heat else 0.0) + a.regions_ms
        built.append(Built(image_result(index, filename, image, scored, manifest.version, field, render_ms, started,
                                        cal, a.regions), a.heat, durable))
    return built
