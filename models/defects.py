"""Synthetic defects on texture crops, with exact masks and a measured visibility.

Why this is its own module: the demo data set (:mod:`models.demo_data`) decides *where*
images come from; this module decides *what a defect looks like* and *how visible it is*,
which is what makes a benchmark honest. Every defect has

* an **exact mask** by construction: a pixel is defective iff the defect changed it by at
  least :data:`MASK_TOLERANCE` grey levels; smaller changes (the faint tail of a soft edge)
  are reverted, so ``mask == (defective != clean)``;
* a **visibility**: the mean absolute change inside the mask divided by the standard
  deviation of the clean texture around it (the mask dilated by :data:`VISIBILITY_RING`
  of the crop). 1.0 means the defect changes its pixels by one local texture sigma;
* a **tier**: ``visible`` at or above the type's cut-off in :data:`VISIBLE_CUTOFF`, else
  ``subtle``. The cut-offs were chosen by looking at sheets of generated grass crops at
  100% zoom (``scripts/visibility_sheet.py``): a thin scratch needs about one local sigma
  before it stops reading as one more blade of grass, a stain spreads its change over a
  large area and is seen from about half a sigma, and a foreign patch of similar
  brightness needs ~1.25 because the measure counts brightness change, not the change of
  texture that a person also sees (so it under-rates some foreign patches: they are
  reported as subtle, never dropped).

Two recipes per type: ``subtle`` and ``visible``. The first benchmark's defects are kept
as they were (1-3 px lines of 25-60 grey levels, stains changing 6-14%, foreign patches of
similar brightness: the ``subtle`` recipe; dark holes: the ``visible`` one), and the other
recipe is added beside them (bold lines, deep stains, bright or dark foreign patches,
shallow dents). ``visible``-recipe candidates are redrawn until they measure visible. The
tier recorded is always the *measured* one, never the recipe's name.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Literal

import numpy as np
from scipy import ndimage

DEFECT_TYPES: tuple[str, ...] = ("scratch", "stain", "hole", "foreign")
RECIPES: tuple[str, ...] = ("subtle", "visible")
Tier = Literal["visible", "subtle"]
MASK_TOLERANCE = 2  # grey levels; a pixel changed by less is not a defect pixel (and is reverted)
# Visibility (local sigmas) from which a person sees the defect at 100% zoom, per type.
VISIBLE_CUTOFF: dict[str, float] = {"scratch": 1.0, "stain": 0.5, "hole": 1.0, "foreign": 1.25}
VISIBILITY_RING = 1 / 16  # neighbourhood radius for the local sigma, as a fraction of the crop

_ALPHA_EPS = 1e-3
_MAX_TRIES = 50


def _blob(shape: tuple[int, int], rng: np.random.Generator, radius: float, irregularity: float) -> np.ndarray:
    """Irregular hard-edged blob at a random position: alpha in [0, 1] with a 1-px anti-aliasing ramp.

    The boundary is a circle perturbed by random low harmonics (k = 2..6), a
    star-shaped outline like a chip, splash or hole.
    """
    h, w = shape
    cy, cx = rng.uniform(0.1 * h, 0.9 * h), rng.uniform(0.1 * w, 0.9 * w)
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float64)
    dy, dx = yy - cy, xx - cx
    theta = np.arctan2(dy, dx)
    bound = np.ones_like(theta)
    for k in range(2, 7):
        bound += rng.uniform(0.0, irregularity / k) * np.cos(k * theta + rng.uniform(0.0, 2.0 * np.pi))
    return np.clip(radius * np.clip(bound, 0.35, None) - np.hypot(dy, dx) + 0.5, 0.0, 1.0)


def _curve(shape: tuple[int, int], rng: np.random.Generator, length: float) -> np.ndarray:
    """Points (y, x) every 0.25 px along a smooth random curve (constant bend plus a gentle wobble)."""
    h, w = shape
    n = max(2, int(length / 0.25))
    start = np.array([rng.uniform(0.15 * h, 0.85 * h), rng.uniform(0.15 * w, 0.85 * w)])
    arc = 0.25 * np.arange(n)
    bend = rng.uniform(-1.5, 1.5) / length  # total turn of up to ~85 degrees
    wobble = rng.uniform(0.0, 0.15) * np.sin(2.0 * np.pi * rng.uniform(0.5, 1.5) * arc / length + rng.uniform(0, 6.3))
    heading = rng.uniform(0.0, 2.0 * np.pi) + bend * arc + wobble
    steps = 0.25 * np.stack([np.sin(heading), np.cos(heading)], axis=1)
    return start + np.cumsum(steps, axis=0)


def _line_alpha(shape: tuple[int, int], points: np.ndarray, width: float, supersample: int = 4) -> np.ndarray:
    """Coverage of a ``width``-px stroke along ``points``, by supersampled distance transform."""
    h, w = shape
    alpha = np.zeros(shape, dtype=np.float64)
    pad = int(np.ceil(width)) + 2
    y0, x0 = max(0, int(points[:, 0].min()) - pad), max(0, int(points[:, 1].min()) - pad)
    y1, x1 = min(h, int(points[:, 0].max()) + pad + 1), min(w, int(points[:, 1].max()) + pad + 1)
    if y1 <= y0 or x1 <= x0:  # the whole curve lies outside the crop
        return alpha
    s = supersample
    hi = np.ones(((y1 - y0) * s, (x1 - x0) * s), dtype=bool)
    iy = np.floor((points[:, 0] - y0) * s).astype(int)
    ix = np.floor((points[:, 1] - x0) * s).astype(int)
    keep = (iy >= 0) & (iy < hi.shape[0]) & (ix >= 0) & (ix < hi.shape[1])
    hi[iy[keep], ix[keep]] = False
    covered = ndimage.distance_transform_edt(hi) <= width * s / 2.0
    alpha[y0:y1, x0:x1] = covered.reshape(y1 - y0, s, x1 - x0, s).mean(axis=(1, 3))
    return alpha


# Per recipe: scratch (width px, amplitude grey levels), stain relative depth.
_SCRATCH = {"subtle": ((1.0, 3.0), (25.0, 60.0)), "visible": ((2.0, 4.0), (70.0, 130.0))}
_STAIN_DEPTH = {"subtle": (0.06, 0.14), "visible": (0.25, 0.45)}
_FOREIGN_GAIN = {"subtle": ((0.85, 1.15),), "visible": ((0.5, 0.7), (1.35, 1.7))}


def _render(
    defect_type: str, clean: np.ndarray, rng: np.random.Generator, foreign: Sequence[np.ndarray], recipe: str
) -> tuple[np.ndarray, np.ndarray, dict[str, Any]]:
    """One candidate defect: (target image as float, alpha, parameters). Sizes scale with the crop."""
    shape = clean.shape
    size = float(min(shape))
    base = clean.astype(np.float64)
    if defect_type == "scratch":
        (w_lo, w_hi), (a_lo, a_hi) = _SCRATCH[recipe]
        width = rng.uniform(w_lo, w_hi)
        length = rng.uniform(0.2, 0.6) * size
        sign = 1.0 if rng.random() < 0.5 else -1.0
        amplitude = rng.uniform(a_lo, a_hi)
        alpha = _line_alpha(shape, _curve(shape, rng, length), width)
        target = base + sign * amplitude * alpha
        params = {"width": width, "length": length, "amplitude": sign * amplitude}
    elif defect_type == "stain":
        radius = rng.uniform(0.07, 0.18) * size
        softness = rng.uniform(0.15, 0.35) * radius
        alpha = ndimage.gaussian_filter(_blob(shape, rng, radius, 0.6), sigma=softness)
        sign = -1.0 if rng.random() < 0.8 else 1.0  # most stains darken (oil, water), some bleach
        depth = rng.uniform(*_STAIN_DEPTH[recipe])
        target = base * (1.0 + sign * depth * alpha)
        params = {"radius": radius, "softness": softness, "relative_change": sign * depth}
    elif defect_type == "hole" and recipe == "subtle":  # a shallow dent: hard edge, little shadow
        radius = rng.uniform(0.04, 0.11) * size
        alpha = _blob(shape, rng, radius, 0.8)
        depth = rng.uniform(0.06, 0.16)
        target = base * (1.0 - depth * alpha)
        params = {"radius": radius, "relative_change": -depth}
    elif defect_type == "hole":
        radius = rng.uniform(0.04, 0.11) * size
        alpha = _blob(shape, rng, radius, 0.8)
        floor = rng.uniform(5.0, 35.0)
        # Deeper (darker) towards the middle, with grain: a cavity in shadow, not a flat paint dot.
        depth = ndimage.gaussian_filter(alpha, sigma=max(1.0, radius / 3.0))
        grain = ndimage.gaussian_filter(rng.normal(0.0, 6.0, shape), 0.8)
        inside = floor + 25.0 * (1.0 - depth / max(depth.max(), 1e-9)) + grain
        target = base * (1.0 - alpha) + inside * alpha
        params = {"radius": radius, "floor": floor}
    elif defect_type == "foreign":
        if not foreign:
            raise ValueError("a foreign defect needs at least one other texture")
        src_index = int(rng.integers(len(foreign)))
        src = foreign[src_index]
        h, w = shape
        y = int(rng.integers(0, src.shape[0] - h + 1))
        x = int(rng.integers(0, src.shape[1] - w + 1))
        turn = int(rng.integers(8))  # any dihedral transform: the foreign texture's orientation is arbitrary
        patch = np.rot90(src[y : y + h, x : x + w], turn % 4)
        patch = (patch[:, ::-1] if turn >= 4 else patch).astype(np.float64)
        ranges = _FOREIGN_GAIN[recipe]
        gain = rng.uniform(*ranges[int(rng.integers(len(ranges)))])
        radius = rng.uniform(0.06, 0.14) * size
        alpha = _blob(shape, rng, radius, 0.9)
        target = base * (1.0 - alpha) + np.clip(patch * gain, 0, 255) * alpha
        params = {"radius": radius, "source_index": src_index, "gain": gain}
    else:
        raise ValueError(f"unknown defect type {defect_type!r}; known: {', '.join(DEFECT_TYPES)}")
    return target, alpha, params


def visibility(clean: np.ndarray, defective: np.ndarray, mask: np.ndarray) -> float:
    """Mean absolute change inside ``mask`` over the clean texture's sigma around it (see module doc)."""
    if not mask.any():
        return 0.0
    radius = max(2, int(round(VISIBILITY_RING * min(mask.shape))))
    around = ndimage.binary_dilation(mask, structure=ndimage.generate_binary_structure(2, 1), iterations=radius)
    sigma = float(clean[around].astype(np.float64).std())
    change = float(np.abs(defective[mask].astype(np.float64) - clean[mask].astype(np.float64)).mean())
    return change / max(sigma, 1.0)  # a flat background (sigma ~ 0) makes any change stand out


def tier_of(defect_type: str, visibility_value: float) -> Tier:
    return "visible" if visibility_value >= VISIBLE_CUTOFF[defect_type] else "subtle"


def synthesize_defect(
    clean: np.ndarray, defect_type: str, rng: np.random.Generator,
    foreign: Sequence[np.ndarray] = (), min_pixels: int | None = None, recipe: str = "subtle",
) -> tuple[np.ndarray, np.ndarray, dict[str, Any]]:  # fmt: skip
    """Add one defect to a clean 2-D uint8 crop: returns (defective uint8, mask bool, parameters).

    ``parameters`` carries the recipe, the measured ``visibility`` and its ``tier``. A
    candidate that changes fewer than ``min_pixels`` pixels (e.g. a dark hole drawn over a
    dark shadow) is redrawn, and so is a ``visible``-recipe candidate that measures below
    :data:`VISIBLE_CUTOFF` for its type.
    """
    if clean.ndim != 2 or clean.dtype != np.uint8:
        raise ValueError(f"clean crop must be 2-D uint8, got {clean.shape} {clean.dtype}")
    if recipe not in RECIPES:
        raise ValueError(f"recipe must be one of {RECIPES}, got {recipe!r}")
    if min_pixels is None:
        min_pixels = max(8, clean.size // 4000)
    for _ in range(_MAX_TRIES):
        target, alpha, params = _render(defect_type, clean, rng, foreign, recipe)
        candidate = np.clip(np.rint(target), 0, 255).astype(np.uint8)
        changed = np.abs(candidate.astype(np.int16) - clean.astype(np.int16)) >= MASK_TOLERANCE
        mask = changed & (alpha > _ALPHA_EPS)
        if int(mask.sum()) < min_pixels:
            continue
        defective = np.where(mask, candidate, clean)
        seen = visibility(clean, defective, mask)
        if recipe == "visible" and seen < VISIBLE_CUTOFF[defect_type]:
            continue
        params = {k: (round(float(v), 4) if isinstance(v, float) else v) for k, v in params.items()}
        params.update(type=defect_type, pixels=int(mask.sum()), recipe=recipe,
                      visibility=round(seen, 4), tier=tier_of(defect_type, seen))
        return defective, mask, params
    raise RuntimeError(f"could not place a {recipe} {defect_type} defect in {_MAX_TRIES} tries")
