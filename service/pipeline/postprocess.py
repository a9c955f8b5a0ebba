"""Scored images -> the per-image results of the v1 API, in one place.

The pipeline runtime (:class:`service.pipeline.runtime.PipelineRuntime`), which serves both
the synchronous API and the job worker, turns each scored image record
(:class:`~service.pipeline.item.InspectedImage`: raw score and anomaly map) into an
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

import base64
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np

from models.manifest import Calibration, Manifest
from service.config import Settings
from service.pipeline.item import InspectedImage
from service.pipeline.offload import gather_in_order
from service.pipeline.regions import RegionParams, find_regions
from service.pipeline.render import heatmap_for
from service.schemas import (InspectOptions, Heatmap, HeatmapLink, HeatmapMode, HeatmapSize, ImageResult, ImageSize,
                             Timings)

RunBlocking = Callable[..., Awaitable[Any]]


class LinkStore(Protocol):
    """Where ``heatmap=url`` PNGs go (:class:`service.redisq.store.HeatmapLinks`)."""

    async def put(self, png: bytes, width: int, height: int,
                  deadline: float | None = None) -> tuple[HeatmapLink, bool]:
        """Store ``png``; return its link and whether it is durable (in Redis, any host serves it).
        ``deadline``: the request's (``time.monotonic()``), which a durable write must not cost."""
        ...


def _manifest_calibration(manifest: Manifest) -> Calibration:
    return manifest.calibration


@dataclass(frozen=True)
class ResultPolicy:
    """The effective calibration of a manifest (the runtime passes
    :meth:`service.pipeline.thresholds.ThresholdOverrides.calibration`, so a runtime threshold
    override decides score and verdict) and the region parameters."""

    calibration: Callable[[Manifest], Calibration] = _manifest_calibration
    regions: RegionParams = RegionParams()


def policy_from_settings(settings: Settings, calibration: Callable[[Manifest], Calibration]) -> ResultPolicy:
    """The policy the API and the workers share: effective thresholds and region limits."""
    return ResultPolicy(calibration=calibration, regions=RegionParams(
        max_regions=settings.max_regions, min_area_fraction=settings.min_region_area))


def render(item: InspectedImage, calibration: Calibration, size: HeatmapSize, overlay: bool) -> None:
    """Blocking: the heatmap PNG of one scored image (coloured with the manifest's calibration:
    the colours are the model's, whatever threshold override decides the verdict), at the
    size the probe priced (``render_size``: an original-size heatmap is capped)."""
    t0 = time.perf_counter()
    side = int(item.score_map.shape[0])
    out_size = item.render_size or ((side, side) if size is HeatmapSize.model else item.size)
    item.heatmap_png = heatmap_for(item.score_map, calibration, item.model_input, item.display, out_size, overlay)
    item.heatmap_width, item.heatmap_height = out_size
    item.display = None  # the background is spent: free it before the answer is assembled
    item.render_ms = (time.perf_counter() - t0) * 1e3


class NonFiniteMaps(Exception):
    """Scored images whose maps hold NaN or infinity (``map_finite`` False): no heatmap, no
    regions and no result were made for any image of the call; the caller refuses them."""

    def __init__(self, items: list[InspectedImage]) -> None:
        super().__init__(f"{len(items)} map(s) with NaN or infinity")
        self.items = items


class NonFiniteOutput(RuntimeError):
    """The engine returned NaN/inf for an image: an error, never a verdict."""

    code = "non_finite_output"

    def __init__(self, message: str, index: int, filename: str | None) -> None:
        super().__init__(message)
        self.details = {"index": index, "filename": filename}


def analyse(item: InspectedImage, manifest: Manifest, calibration: Calibration, size: HeatmapSize | None,
            overlay: bool, params: RegionParams) -> None:
    """Blocking: the heatmap (``size`` None: none) and the defect regions of one scored image,
    with the milliseconds each took. ``calibration`` is the effective one (regions follow it).
    A map with NaN or infinity gets neither (``map_finite``): it is checked here, in the
    thread that reads it anyway, rather than on the event loop (docs/performance-log.md)."""
    item.map_finite = bool(np.isfinite(item.score_map).all())
    if not item.map_finite:
        return
    if size is not None:
        render(item, manifest.calibration, size, overlay)
    t0 = time.perf_counter()
    item.regions = find_regions(item.score_map, calibration, item.size, params)
    item.regions_ms = (time.perf_counter() - t0) * 1e3


def image_result(item: InspectedImage, version: str, heatmap: Heatmap | HeatmapLink | None, started: float,
                 cal: Calibration) -> ImageResult:
    """One scored image's result; ``started`` is the ``time.monotonic()`` the timings' total
    counts from. ``cal``: the effective calibration of the pinned model version."""
    raw = item.raw
    width, height = item.size
    return ImageResult(
        index=item.index, filename=item.filename, score=cal.reported_score(raw),
        raw_score=raw, threshold=cal.threshold, is_anomalous=raw >= cal.threshold, verdict=cal.verdict(raw),
        ng_threshold=cal.ng_bound,
        model_version=version, batch_size=item.batch_size, heatmap=heatmap,
        timings_ms=Timings(decode=round(item.decode_ms, 3), queue=round(item.queue_ms, 3),
                           engine=round(item.engine_ms, 3), render=round(item.render_ms + item.regions_ms, 3),
                           total=round((time.monotonic() - started) * 1e3, 3)),
        image_size=ImageSize(width=width, height=height), regions=list(item.regions),
    )


def inline_heatmap(item: InspectedImage) -> Heatmap:
    if item.heatmap_png is None:
        raise ValueError(f"image {item.index} has no rendered heatmap")
    return Heatmap(data=base64.b64encode(item.heatmap_png).decode("ascii"), width=item.heatmap_width,
                   height=item.heatmap_height)


async def postprocess(items: Sequence[InspectedImage], manifest: Manifest, options: InspectOptions,
                      run_blocking: RunBlocking, links: LinkStore | None, started: float,
                      *, render_all: bool = False, policy: ResultPolicy | None = None,
                      deadline: float | None = None) -> None:
    """Fill ``result`` (and heatmap, regions, ``durable``) of scored records, all scored by the
    model version of ``manifest`` (the request's pinned version).

    Heatmaps are rendered (in ``run_blocking``'s threads) for ``heatmap=inline`` and ``url``,
    or for every image with ``render_all`` (an ``Accept: image/png`` answer, which then
    carries the PNG itself: no link is stored for it). Defect regions are found for every
    image, in the same thread-pool call. Raises :class:`NonFiniteMaps` (before any result or
    link exists) if a map holds NaN or infinity.
    """
    policy = policy or ResultPolicy()
    wanted = render_all or options.heatmap is not HeatmapMode.none
    cal = policy.calibration(manifest)
    size = options.heatmap_size if wanted else None
    await gather_in_order([run_blocking(analyse, item, manifest, cal, size, options.overlay, policy.regions)
                           for item in items])
    if bad := [item for item in items if not item.map_finite]:
        raise NonFiniteMaps(bad)
    for item in items:
        heatmap: Heatmap | HeatmapLink | None = None
        if item.heatmap_png is not None:
            if options.heatmap is HeatmapMode.url and not render_all:
                if links is None:
                    raise RuntimeError("heatmap=url needs a link store")
                heatmap, item.durable = await links.put(item.heatmap_png, item.heatmap_width, item.heatmap_height,
                                                        deadline=deadline)
            else:
                heatmap = inline_heatmap(item)
        item.result = image_result(item, manifest.version, heatmap, started, cal)
