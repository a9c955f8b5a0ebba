"""Defect regions: where in the image the anomaly map says "defective".

The anomaly map the heatmap shows is thresholded at the calibration's ``pixel_threshold``
(the map value above which a pixel counts as defective, fixed at export), split into
8-connected components (:func:`scipy.ndimage.label`), and each component becomes a
:class:`~service.schemas.Region`:

* ``x, y, width, height``: its bounding box in pixels of the *upright original* upload.
  The model input is a plain (aspect-changing) resize of the upright image to ``S x S``
  (:func:`models.preprocessing.resize_for_model`), so map pixel ``[r, c]`` covers original
  ``[r*H/S, (r+1)*H/S) x [c*W/S, (c+1)*W/S)``; the box is the union of those cells (floor
  of the start, ceiling of the end), so it never cuts into the region.
* ``area``: defective map pixels times the area of one map pixel in the original
  (``W*H / S^2``), rounded.
* ``peak`` and ``mean``: map values normalised exactly as the heatmap colours them,
  ``(value - map_low) / (map_high - map_low)`` clipped to [0, 1] (the manifest's absolute
  range, never per image), so 1.0 is "as hot as the heatmap gets".

Regions are sorted largest first (then hottest) and capped at ``MSFLOW_MAX_REGIONS``.

``MSFLOW_MIN_REGION_AREA`` is a **fraction of the image area** (default 0.005 = 0.5 %),
applied on the map (``pixels < fraction * S^2`` are dropped): a fraction means the same
physical size whatever the camera resolution, and since the map is a uniform rescale of
the image the test is identical in original pixels. Why 0.5 %: ``pixel_threshold`` is the
99.9th percentile of held-out normal pixels, so a normal image lets about 0.1 % of its
pixels through, and because maps are smooth they come as one or two small blobs; 5x that
budget keeps such blobs off good parts while real defects (holes, foreign material:
several percent) stay. Lines inspecting fine scratches lower it (e.g. 0.001).

Pure numpy/scipy and cheap (a 256x256 map labels in well under a millisecond); the
service runs it in its thread pool next to the heatmap rendering.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from scipy import ndimage

from models.manifest import Calibration
from service.schemas import Region

DEFAULT_MAX_REGIONS = 10
DEFAULT_MIN_REGION_AREA = 0.005  # fraction of the image area
_EIGHT_CONNECTED = np.ones((3, 3), dtype=bool)  # diagonal neighbours belong to the same region
_FEW = 32  # components visited box by box without first counting them all


@dataclass(frozen=True)
class RegionParams:
    """``MSFLOW_MAX_REGIONS`` and ``MSFLOW_MIN_REGION_AREA`` (fraction of the image area)."""

    max_regions: int = DEFAULT_MAX_REGIONS
    min_area_fraction: float = DEFAULT_MIN_REGION_AREA


def defect_mask(anomaly_map: np.ndarray, calibration: Calibration) -> np.ndarray:
    """Boolean map of defective pixels (``value > pixel_threshold``; NaN is not defective)."""
    m = np.asarray(anomaly_map, dtype=np.float32)
    # NaN > t is already False; nan_to_num's extra passes cost more than the labelling here.
    with np.errstate(invalid="ignore"):
        return m > np.float32(calibration.pixel_threshold)


def find_regions(anomaly_map: np.ndarray, calibration: Calibration, image_size: tuple[int, int],
                 params: RegionParams = RegionParams()) -> list[Region]:
    """Regions of one ``[S_h, S_w]`` anomaly map, boxes in the ``image_size`` = (width, height) image."""
    if params.max_regions <= 0:
        return []
    m = np.asarray(anomaly_map, dtype=np.float32)
    if m.ndim != 2 or m.size == 0:
        raise ValueError(f"anomaly map must be 2-D, got shape {m.shape}")
    mask = defect_mask(m, calibration)
    min_pixels = max(1.0, params.min_area_fraction * m.size)
    # A kept component needs min_pixels defective pixels, so a mask with fewer in all holds
    # none: a good part's few hot pixels cost one count, not a labelling of the whole map.
    if np.count_nonzero(mask) < min_pixels:
        return []
    # Label only the box around every defective pixel: components never leave it, and their
    # raster order (hence the labels' order, the last sort key) is the same as in the map.
    row_hits, col_hits = np.flatnonzero(mask.any(axis=1)), np.flatnonzero(mask.any(axis=0))
    top, left = int(row_hits[0]), int(col_hits[0])
    window = np.s_[top:int(row_hits[-1]) + 1, left:int(col_hits[-1]) + 1]
    mask, values_map = mask[window], m[window]
    labels, count = ndimage.label(mask, structure=_EIGHT_CONNECTED)
    # One component (a single defect, or a map hot all over) fills the box: no second pass
    # over the labels for its box or its pixels.
    boxes = [np.s_[0:mask.shape[0], 0:mask.shape[1]]] if count == 1 else ndimage.find_objects(labels)
    # Every statistic inside each component's own box, never a pass over the whole map per
    # statistic: a real map has a few components, and the boxes are small. A box smaller than
    # the minimum area cannot hold a kept component, so specks are skipped unvisited; if many
    # boxes remain (a noisy mask), one bincount sizes them so that only kept ones are visited.
    candidates = [i for i, (rows, cols) in enumerate(boxes)
                  if (rows.stop - rows.start) * (cols.stop - cols.start) >= min_pixels]
    if len(candidates) > _FEW:
        candidates = np.flatnonzero(np.bincount(labels.ravel(), minlength=count + 1)[1:] >= min_pixels)
    # Clipping to [map_low, map_high] and then normalising the max and the mean equals
    # normalising each value and clipping to [0, 1] (an increasing affine map), in four numpy
    # calls per component. A defective value is never NaN (NaN > threshold is False); +inf clips.
    low, high = float(calibration.map_low), float(calibration.map_high)
    span = max(high - low, 1e-12)
    pixels, peaks, means = {}, {}, {}
    for i in candidates:
        rows, cols = boxes[i]
        inside = mask[rows, cols] if count == 1 else labels[rows, cols] == i + 1
        values = values_map[rows, cols][inside].astype(np.float64)
        if values.size < min_pixels:
            continue
        pixels[i] = values.size
        np.clip(values, low, high, out=values)
        peaks[i], means[i] = (float(values.max()) - low) / span, (float(values.mean()) - low) / span
    if not pixels:
        return []
    sh, sw = m.shape
    width, height = int(image_size[0]), int(image_size[1])
    sx, sy = width / sw, height / sh
    pixel_area = sx * sy
    order = sorted(pixels, key=lambda i: (-pixels[i], -peaks[i], i))
    regions = []
    for i in order[: params.max_regions]:
        rows, cols = boxes[i]
        r0, r1, c0, c1 = rows.start + top, rows.stop + top, cols.start + left, cols.stop + left  # map coordinates
        x0 = min(max(int(math.floor(c0 * sx + 1e-9)), 0), width - 1)
        y0 = min(max(int(math.floor(r0 * sy + 1e-9)), 0), height - 1)
        x1 = min(max(int(math.ceil(c1 * sx - 1e-9)), x0 + 1), width)
        y1 = min(max(int(math.ceil(r1 * sy - 1e-9)), y0 + 1), height)
        regions.append(Region(x=x0, y=y0, width=x1 - x0, height=y1 - y0,
                              area=max(1, int(round(float(pixels[i]) * pixel_area))),
                              peak=round(float(peaks[i]), 4), mean=round(float(means[i]), 4)))
    return regions


def box_mask(regions: list[Region], image_size: tuple[int, int]) -> np.ndarray:
    """Boolean ``[H, W]`` union of the regions' boxes (tests and tools compare it with masks)."""
    out = np.zeros((int(image_size[1]), int(image_size[0])), dtype=bool)
    for r in regions:
        out[r.y: r.y + r.height, r.x: r.x + r.width] = True
    return out
