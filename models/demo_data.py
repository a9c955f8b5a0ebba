"""A demo inspection data set in MVTec AD layout, built from real texture photographs.

Why: the product needs an end-to-end data set that ships with the code (no
download), is hard enough that accuracy numbers mean something, and has exact
pixel ground truth. Each of scikit-image's real 512x512 grayscale photographs
``brick``, ``grass``, ``gravel`` becomes one category.

* **Disjoint train/test regions.** Training crops come from the top rows of the
  photograph, test crops from the bottom rows, with ``gap`` rows between them,
  so no test pixel was ever seen in training (recorded in ``dataset.json``).
* **Crop size 224 (default).** Two 256 crops plus any gap do not fit in 512
  rows, so 256 is impossible with disjoint regions. 224 is the largest crop that
  keeps a gap (8 rows) and still leaves the training strip 56 rows of vertical
  slack, so training crops cover different phases of the brick rows. At model
  input 224 the pixels are used 1:1; at 256 the Lanczos upscale is a mild 1.14x.
* **Augmentation** by flips; 90-degree turns only for isotropic textures (bricks
  have a direction). **RGB PNG** (gray replicated), like the product's cameras.
* **Four defect types**, hard like real ones: thin 1-3 px ``scratch``, subtle
  low-contrast ``stain`` with soft edges, ``hole`` (dark, hard irregular edge),
  ``foreign`` (irregular patch of another texture).
* **Exact masks by construction**: a pixel is defective iff the defect changed
  it by at least ``MASK_TOLERANCE`` gray levels; smaller changes (the faint tail
  of a soft edge) are reverted, so mask == (defective != clean) exactly.
* **Deterministic**: each image has its own RNG stream (seed, category, role,
  index): same seed, same bytes; changing one count reshuffles nothing else.
"""

from __future__ import annotations

import json
import shutil
import zlib
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image
from scipy import ndimage

__all__ = [
    "TEXTURES", "ANISOTROPIC_TEXTURES", "DEFECT_TYPES", "MASK_TOLERANCE", "DEFAULT_CROP", "DEFAULT_GAP",
    "Region", "CropSpec", "load_texture", "plan_regions", "allowed_transforms", "apply_transform",
    "extract_crop", "synthesize_defect", "make_defect_example", "build_demo_dataset",
]  # fmt: skip

TEXTURES: tuple[str, ...] = ("brick", "grass", "gravel")
ANISOTROPIC_TEXTURES: frozenset[str] = frozenset({"brick"})
DEFECT_TYPES: tuple[str, ...] = ("scratch", "stain", "hole", "foreign")
MASK_TOLERANCE = 2  # gray levels; a pixel changed by less is not a defect pixel (and is reverted)
DEFAULT_CROP = 224
DEFAULT_GAP = 8
TEST_FRACTION = 0.4  # share of the photograph's rows reserved for test crops (at least one crop)
GENERATOR = "models.demo_data"
FORMAT_VERSION = 1

_ALPHA_EPS = 1e-3
_PNG_LEVEL = 1  # 3x faster than Pillow's default 6 and no larger on these noisy textures
_WRITERS = 4  # zlib releases the GIL: PNG encoding, the slowest step, runs in parallel
_MAX_TRIES = 50
_ROLE_TRAIN, _ROLE_TEST_GOOD, _ROLE_TEST_DEFECT = 0, 1, 2


@dataclass(frozen=True)
class Region:
    """Half-open pixel rectangle [top, bottom) x [left, right) of a photograph."""

    top: int
    bottom: int
    left: int
    right: int


@dataclass(frozen=True)
class CropSpec:
    """Where a crop comes from: top-left (y, x) in the photograph and a dihedral transform index."""

    y: int
    x: int
    transform: int


def load_texture(name: str) -> np.ndarray:
    """The bundled scikit-image photograph ``name`` as a 2-D uint8 array (no download needed)."""
    if name not in TEXTURES:
        raise ValueError(f"unknown texture {name!r}; available: {', '.join(TEXTURES)}")
    from skimage import data as skdata  # local import: only the demo generator needs scikit-image

    photo = np.asarray(getattr(skdata, name)())
    if photo.ndim != 2 or photo.dtype != np.uint8:
        raise ValueError(f"skimage.data.{name}() is {photo.shape} {photo.dtype}, expected 2-D uint8")
    return np.ascontiguousarray(photo)


def plan_regions(
    height: int, width: int, crop: int, gap: int = DEFAULT_GAP, test_fraction: float = TEST_FRACTION
) -> tuple[Region, Region]:
    """(train, test) regions: test takes the bottom rows, train the top rows, ``gap`` rows apart.

    The test strip is ``max(crop, test_fraction * height)`` rows; training gets
    the rest above the gap. Raises ValueError when a crop does not fit.
    """
    if not 8 <= crop <= width or gap < 0:
        raise ValueError(f"need 8 <= crop <= {width} and gap >= 0, got crop {crop}, gap {gap}")
    test_h = max(crop, int(round(test_fraction * height)))
    train_h = height - test_h - gap
    if train_h < crop:
        raise ValueError(
            f"crop {crop} with gap {gap} does not fit a {height}-row photograph: train and test strips "
            f"need 2 x {crop} + {gap} rows; use a smaller crop or gap"
        )
    return Region(0, train_h, 0, width), Region(height - test_h, height, 0, width)


def allowed_transforms(texture: str) -> tuple[int, ...]:
    """Dihedral transforms (see :func:`apply_transform`) that keep a texture's statistics.

    Isotropic textures get all eight; anisotropic ones (brick) only those that
    keep the axes: identity, half turn, and the two mirror flips.
    """
    return (0, 2, 4, 6) if texture in ANISOTROPIC_TEXTURES else tuple(range(8))


def apply_transform(a: np.ndarray, transform: int) -> np.ndarray:
    """Transform ``t``: ``t % 4`` quarter turns (``np.rot90``), then a left-right flip if ``t >= 4``."""
    if not 0 <= transform < 8:
        raise ValueError(f"transform must be in 0..7, got {transform}")
    out = np.rot90(a, transform % 4)
    if transform >= 4:
        out = out[:, ::-1]
    return np.ascontiguousarray(out)


def extract_crop(photo: np.ndarray, spec: CropSpec, crop: int) -> np.ndarray:
    """The clean crop described by ``spec`` (the exact pixels a generated image started from)."""
    window = photo[spec.y : spec.y + crop, spec.x : spec.x + crop]
    if window.shape[:2] != (crop, crop):
        raise ValueError(f"crop {spec} of size {crop} leaves the {photo.shape} photograph")
    return apply_transform(window, spec.transform)


def _random_spec(rng: np.random.Generator, region: Region, crop: int, transforms: Sequence[int]) -> CropSpec:
    y = int(rng.integers(region.top, region.bottom - crop + 1))
    x = int(rng.integers(region.left, region.right - crop + 1))
    return CropSpec(y=y, x=x, transform=int(transforms[int(rng.integers(len(transforms)))]))


# ----------------------------------------------------------------------------- defect rendering


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


def _render(
    defect_type: str, clean: np.ndarray, rng: np.random.Generator, foreign: Sequence[np.ndarray]
) -> tuple[np.ndarray, np.ndarray, dict[str, Any]]:
    """One candidate defect: (target image as float, alpha, parameters). Sizes scale with the crop."""
    shape = clean.shape
    size = float(min(shape))
    base = clean.astype(np.float64)
    if defect_type == "scratch":
        width = rng.uniform(1.0, 3.0)
        length = rng.uniform(0.2, 0.6) * size
        sign = 1.0 if rng.random() < 0.5 else -1.0
        amplitude = rng.uniform(25.0, 60.0)
        alpha = _line_alpha(shape, _curve(shape, rng, length), width)
        target = base + sign * amplitude * alpha
        params = {"width": width, "length": length, "amplitude": sign * amplitude}
    elif defect_type == "stain":
        radius = rng.uniform(0.07, 0.18) * size
        softness = rng.uniform(0.15, 0.35) * radius
        alpha = ndimage.gaussian_filter(_blob(shape, rng, radius, 0.6), sigma=softness)
        sign = -1.0 if rng.random() < 0.8 else 1.0  # most stains darken (oil, water), some bleach
        depth = rng.uniform(0.06, 0.14)
        target = base * (1.0 + sign * depth * alpha)
        params = {"radius": radius, "softness": softness, "relative_change": sign * depth}
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
        patch = apply_transform(src[y : y + h, x : x + w], int(rng.integers(8))).astype(np.float64)
        gain = rng.uniform(0.85, 1.15)
        radius = rng.uniform(0.06, 0.14) * size
        alpha = _blob(shape, rng, radius, 0.9)
        target = base * (1.0 - alpha) + np.clip(patch * gain, 0, 255) * alpha
        params = {"radius": radius, "source_index": src_index, "gain": gain}
    else:
        raise ValueError(f"unknown defect type {defect_type!r}; known: {', '.join(DEFECT_TYPES)}")
    return target, alpha, params


def synthesize_defect(
    clean: np.ndarray, defect_type: str, rng: np.random.Generator,
    foreign: Sequence[np.ndarray] = (), min_pixels: int | None = None,
) -> tuple[np.ndarray, np.ndarray, dict[str, Any]]:  # fmt: skip
    """Add one defect to a clean 2-D uint8 crop: returns (defective uint8, mask bool, parameters).

    The mask is exact by construction: ``mask == (defective != clean)``. Where a
    candidate changes a pixel by less than :data:`MASK_TOLERANCE` (or its alpha
    is negligible) the clean value is kept. A candidate that changes fewer than
    ``min_pixels`` pixels (e.g. a dark hole drawn over a dark shadow) is redrawn.
    """
    if clean.ndim != 2 or clean.dtype != np.uint8:
        raise ValueError(f"clean crop must be 2-D uint8, got {clean.shape} {clean.dtype}")
    if min_pixels is None:
        min_pixels = max(8, clean.size // 4000)
    for _ in range(_MAX_TRIES):
        target, alpha, params = _render(defect_type, clean, rng, foreign)
        candidate = np.clip(np.rint(target), 0, 255).astype(np.uint8)
        changed = np.abs(candidate.astype(np.int16) - clean.astype(np.int16)) >= MASK_TOLERANCE
        mask = changed & (alpha > _ALPHA_EPS)
        if int(mask.sum()) >= min_pixels:
            defective = np.where(mask, candidate, clean)
            params = {k: (round(float(v), 4) if isinstance(v, float) else v) for k, v in params.items()}
            params["type"] = defect_type
            params["pixels"] = int(mask.sum())
            return defective, mask, params
    raise RuntimeError(f"could not place a visible {defect_type} defect in {_MAX_TRIES} tries")


def make_defect_example(
    photo: np.ndarray, spec: CropSpec, crop: int, defect_type: str,
    rng: np.random.Generator, foreign: Sequence[np.ndarray] = (),
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:  # fmt: skip
    """(clean, defective, mask) for one test image: the crop of ``spec`` with one defect added."""
    clean = extract_crop(photo, spec, crop)
    defective, mask, _ = synthesize_defect(clean, defect_type, rng, foreign)
    return clean, defective, mask


# ----------------------------------------------------------------------------- writing


def _image_rng(seed: int, category: str, role: int, index: int) -> np.random.Generator:
    """Independent stream per image; crc32 (not hash()) so it is stable across processes."""
    return np.random.default_rng(np.random.SeedSequence([seed, zlib.crc32(category.encode()), role, index]))


def _save_png(array: np.ndarray, path: Path) -> None:
    """A gray crop as RGB PNG (gray replicated), a bool mask as 0/255 L PNG. Output is byte-stable."""
    path.parent.mkdir(parents=True, exist_ok=True)
    if array.dtype == np.bool_:
        img = Image.fromarray(np.where(array, 255, 0).astype(np.uint8), mode="L")
    else:
        img = Image.fromarray(np.repeat(array[:, :, None], 3, axis=2), mode="RGB")
    img.save(path, format="PNG", compress_level=_PNG_LEVEL)


def _prepare_target(final: Path) -> Path:
    """A fresh staging folder next to ``final``; refuses to overwrite folders this module did not write."""
    if final.exists() and any(final.iterdir()):
        try:
            owned = json.loads((final / "dataset.json").read_text()).get("generator") == GENERATOR
        except (OSError, ValueError, AttributeError):
            owned = False
        if not owned:
            raise FileExistsError(f"{final} exists and was not written by {GENERATOR}; refusing to overwrite it")
    staging = final.parent / f".{final.name}.partial"
    if staging.exists():
        shutil.rmtree(staging)
    staging.mkdir(parents=True)
    return staging


def _build_category(  # noqa: PLR0913 - internal, mirrors build_demo_dataset's arguments
    out: Path, name: str, seed: int, counts: tuple[int, int, int], crop: int, gap: int,
    write: Callable[..., Future[None]],
) -> dict[str, Any]:  # fmt: skip
    """Write one category (staged, then renamed into place); ``write`` schedules a PNG save."""
    n_train, n_test_good, n_test_defect = counts
    photo = load_texture(name)
    foreign = [load_texture(t) for t in TEXTURES if t != name]
    train_region, test_region = plan_regions(photo.shape[0], photo.shape[1], crop, gap)
    transforms = allowed_transforms(name)
    final = out / name
    root = _prepare_target(final)
    width = max(3, len(str(max(n_train, n_test_good, n_test_defect) - 1)))
    records: list[dict[str, Any]] = []
    pending: list[Future[None]] = []

    for i in range(n_train):
        spec = _random_spec(_image_rng(seed, name, _ROLE_TRAIN, i), train_region, crop, transforms)
        rel = f"train/good/{i:0{width}d}.png"
        pending.append(write(_save_png, extract_crop(photo, spec, crop), root / rel))
        records.append({"file": rel, **asdict(spec)})
    for i in range(n_test_good):
        spec = _random_spec(_image_rng(seed, name, _ROLE_TEST_GOOD, i), test_region, crop, transforms)
        rel = f"test/good/{i:0{width}d}.png"
        pending.append(write(_save_png, extract_crop(photo, spec, crop), root / rel))
        records.append({"file": rel, **asdict(spec)})
    per_type = {t: 0 for t in DEFECT_TYPES}
    for i in range(n_test_defect):
        defect = DEFECT_TYPES[i % len(DEFECT_TYPES)]  # round robin: types evenly spread
        rng = _image_rng(seed, name, _ROLE_TEST_DEFECT, i)
        spec = _random_spec(rng, test_region, crop, transforms)
        defective, mask, params = synthesize_defect(extract_crop(photo, spec, crop), defect, rng, foreign)
        j = per_type[defect]
        per_type[defect] += 1
        rel, rel_mask = f"test/{defect}/{j:0{width}d}.png", f"ground_truth/{defect}/{j:0{width}d}_mask.png"
        pending.append(write(_save_png, defective, root / rel))
        pending.append(write(_save_png, mask, root / rel_mask))
        records.append({"file": rel, "mask": rel_mask, **asdict(spec), "defect": params})

    meta = {
        "generator": GENERATOR, "format_version": FORMAT_VERSION, "category": name,
        "source": f"skimage.data.{name}()", "photo_shape": list(photo.shape), "channels": "RGB, gray replicated",
        "seed": seed, "crop": crop, "gap": gap,
        "train_region": asdict(train_region), "test_region": asdict(test_region),
        "transforms": list(transforms),
        "transform_encoding": "t % 4 quarter turns (numpy.rot90), then a left-right flip if t >= 4",
        "foreign_sources": [t for t in TEXTURES if t != name], "mask_tolerance": MASK_TOLERANCE,
        "defect_types": list(DEFECT_TYPES),
        "counts": {"train": n_train, "test_good": n_test_good, "test_defect": per_type},
        "images": records,
    }  # fmt: skip
    for job in pending:
        job.result()  # re-raises the first write error before the category is published
    (root / "dataset.json").write_text(json.dumps(meta, indent=1, sort_keys=True) + "\n")
    if final.exists():
        shutil.rmtree(final)
    root.rename(final)
    return {"path": str(final), "train": n_train, "test_good": n_test_good, "test_defect": per_type}


def build_demo_dataset(
    out: Path | str,
    seed: int = 0,
    n_train: int = 200,
    n_test_good: int = 40,
    n_test_defect: int = 60,
    crop: int = DEFAULT_CROP,
    categories: Sequence[str] = TEXTURES,
    gap: int = DEFAULT_GAP,
) -> dict[str, Any]:
    """Write the demo data set (one MVTec-layout category per texture) under ``out``.

    Each category is staged in a hidden folder and renamed into place when
    complete, so an interrupted run never leaves a half-written category; a
    category folder this module wrote before is replaced, anything else is
    refused. Returns a summary: ``{"root", "seed", "crop", "categories": {name:
    {"path", "train", "test_good", "test_defect": {type: count}}}}``.
    """
    categories = (categories,) if isinstance(categories, str) else tuple(categories)
    unknown = [c for c in categories if c not in TEXTURES]
    if not categories or unknown or len(set(categories)) != len(categories):
        raise ValueError(f"categories must be distinct names from {TEXTURES}, got {categories}")
    if n_train < 1 or n_test_good < 0 or n_test_defect < 0:
        raise ValueError(f"need n_train >= 1 and test counts >= 0, got {n_train}, {n_test_good}, {n_test_defect}")
    plan_regions(512, 512, crop, gap)  # fail fast on a bad crop/gap (all bundled photographs are 512x512)
    root = Path(out)
    root.mkdir(parents=True, exist_ok=True)
    summary: dict[str, Any] = {"root": str(root), "seed": seed, "crop": crop, "categories": {}}
    with ThreadPoolExecutor(max_workers=_WRITERS, thread_name_prefix="demo-png") as pool:
        for name in categories:
            counts = (n_train, n_test_good, n_test_defect)
            summary["categories"][name] = _build_category(root, name, seed, counts, crop, gap, pool.submit)
    return summary
