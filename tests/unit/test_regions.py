"""``find_regions`` against the definition it implements, written the plain way: label the
whole map, and for every component count its pixels, take its box, peak and mean, then
filter, sort and cap. The fast path labels only the box around the defective pixels, skips
the labelling when fewer than the minimum area are defective, and skips ``find_objects``
for a single component; on smooth random maps (the shape real anomaly maps have) and on
noisy ones, the two must agree exactly."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy import ndimage

from models.manifest import Calibration, ScoreStats
from service.pipeline.regions import RegionParams, find_regions
from service.schemas import Region


def calibration(pixel_threshold: float) -> Calibration:
    stats = ScoreStats(count=8, mean=1.0, std=0.1, min=0.8, p50=1.0, p95=1.2, p99=1.3, max=1.3)
    return Calibration(score_output="image_score_log", method="normal_quantile", threshold=1.5, score_min=1.0,
                       score_max=2.0, normal_scores=stats, map_low=-1.0, map_high=2.5,
                       pixel_threshold=pixel_threshold)


def reference_regions(m: np.ndarray, cal: Calibration, image_size: tuple[int, int],
                      params: RegionParams) -> list[Region]:
    if params.max_regions <= 0:
        return []
    with np.errstate(invalid="ignore"):
        mask = m > np.float32(cal.pixel_threshold)
    labels, count = ndimage.label(mask, structure=np.ones((3, 3), bool))
    min_pixels = max(1.0, params.min_area_fraction * m.size)
    low, high = cal.map_low, cal.map_high
    width, height = image_size
    sx, sy = width / m.shape[1], height / m.shape[0]
    found = []
    for label in range(1, count + 1):
        rows, cols = np.nonzero(labels == label)
        if rows.size < min_pixels:
            continue
        values = np.clip(m[rows, cols].astype(np.float64), low, high)
        peak, mean = (values.max() - low) / (high - low), (values.mean() - low) / (high - low)
        x0 = min(max(math.floor(cols.min() * sx + 1e-9), 0), width - 1)
        y0 = min(max(math.floor(rows.min() * sy + 1e-9), 0), height - 1)
        x1 = min(max(math.ceil((cols.max() + 1) * sx - 1e-9), x0 + 1), width)
        y1 = min(max(math.ceil((rows.max() + 1) * sy - 1e-9), y0 + 1), height)
        found.append((-rows.size, -peak, label, Region(
            x=x0, y=y0, width=x1 - x0, height=y1 - y0, area=max(1, round(rows.size * sx * sy)),
            peak=round(peak, 4), mean=round(mean, 4))))
    return [region for *_, region in sorted(found, key=lambda f: f[:3])][: params.max_regions]


def smooth_map(rng: np.random.Generator, shape: tuple[int, int], sigma: float) -> np.ndarray:
    m = ndimage.gaussian_filter(rng.standard_normal(shape), sigma)
    return (m / (m.std() + 1e-12)).astype(np.float32)


@pytest.mark.parametrize("seed", range(40))
def test_find_regions_equals_the_plain_definition(seed: int) -> None:
    rng = np.random.default_rng(seed)
    shape = (int(rng.choice([16, 48, 64])), int(rng.choice([16, 48, 64])))
    m = smooth_map(rng, shape, sigma=float(rng.choice([0.0, 1.0, 3.0, 6.0])))
    if seed % 5 == 0:
        m[rng.integers(0, shape[0]), rng.integers(0, shape[1])] = np.nan  # NaN is never defective
    image_size = (int(rng.integers(1, 900)), int(rng.integers(1, 900)))
    for threshold in (-0.5, 0.5, 1.5, 2.5):  # from most of the map defective to a few specks or none
        for params in (RegionParams(10, 0.0), RegionParams(10, 0.005), RegionParams(3, 0.02), RegionParams(100, 0.0)):
            cal = calibration(threshold)
            assert find_regions(m, cal, image_size, params) == reference_regions(m, cal, image_size, params)


def test_a_map_defective_everywhere_is_one_region_over_the_whole_image() -> None:
    m = np.full((32, 32), 2.0, np.float32)
    (region,) = find_regions(m, calibration(0.5), (320, 160), RegionParams(10, 0.005))
    assert (region.x, region.y, region.width, region.height, region.area) == (0, 0, 320, 160, 320 * 160)


def test_fewer_defective_pixels_than_the_minimum_area_give_no_region() -> None:
    m = np.zeros((100, 100), np.float32)
    m[10:12, 10:12] = 2.0  # 4 pixels; the minimum is 0.05% of 10,000 = 5
    assert find_regions(m, calibration(0.5), (100, 100), RegionParams(10, 0.0005)) == []
    m[12, 12] = 2.0  # 5 pixels, one 8-connected component: kept
    (region,) = find_regions(m, calibration(0.5), (100, 100), RegionParams(10, 0.0005))
    assert (region.x, region.y, region.width, region.height, region.area) == (10, 10, 3, 3, 5)
