"""A demo inspection data set in MVTec AD layout, built from real texture photographs.

Why: the product needs an end-to-end data set that ships with the code (no download), is
hard enough that accuracy numbers mean something, has exact pixel ground truth, and lets a
threshold be calibrated on normal images the model never saw. Each of scikit-image's real
512x512 grayscale photographs ``brick``, ``grass``, ``gravel`` becomes one category.

* **Three normal sets, disjoint in source pixels.** The photograph is cut into vertical
  strips: ``train/good`` from the left half, ``calibration/good`` from the next quarter,
  ``test/good`` and every defective test image from the right quarter (brick, whose
  perspective changes across the photograph: calibration and test share the right
  quarter, top and bottom half, and training takes the left three quarters). Vertical strips
  (not rows) because the brick photograph's perspective changes the brick size from top
  to bottom: every set sees every scale. Crops inside one set overlap (a 128-wide strip
  holds few disjoint crops); ``dataset.json`` records how much (``overlap``), and that
  sets share no pixel. No crop (position and transform) is drawn twice within a normal
  set: a copy would be the same image twice, counted as two samples by the threshold's
  FPR bound and the false-alarm rate (brick's 128x256 calibration region holds 516 distinct
  crops, and 60 independent draws from it repeat about three).
* **Crop 128 (default)**, so that three disjoint strips fit in 512 columns; the model
  input (256) upsamples it 2x.
* **Augmentation** by flips; 90-degree turns only for isotropic textures (bricks have a
  direction). **RGB PNG** (gray replicated), like the product's cameras.
* **Defects** (:mod:`models.defects`): scratch, stain, hole, foreign patch, each drawn with
  a ``subtle`` and a ``visible`` recipe; every record carries its measured visibility and
  tier. Masks are exact by construction.
* **Deterministic**: each image has its own RNG stream (seed, category, role, index): same
  seed, same bytes; changing one count reshuffles nothing else (an image that would repeat
  an earlier crop of its set draws again from its own stream, so it depends only on the
  images before it).

Layout written (MVTec AD plus ``calibration/good``)::

    <out>/<category>/train/good/*.png            training normals
    <out>/<category>/calibration/good/*.png      normals for the threshold (never trained on)
    <out>/<category>/test/{good,<defect>}/*.png
    <out>/<category>/ground_truth/<defect>/*_mask.png
    <out>/<category>/dataset.json                provenance: crops, defects, visibility, overlap
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

from models.defects import DEFECT_TYPES, MASK_TOLERANCE, RECIPES, VISIBLE_CUTOFF, synthesize_defect

TEXTURES: tuple[str, ...] = ("brick", "grass", "gravel")
ANISOTROPIC_TEXTURES: frozenset[str] = frozenset({"brick"})
ROLES: tuple[str, ...] = ("train", "calibration", "test")
DEFAULT_CROP = 128
GENERATOR = "models.demo_data"
FORMAT_VERSION = 2

_PNG_LEVEL = 1  # 3x faster than Pillow's default 6 and no larger on these noisy textures
_WRITERS = 4  # zlib releases the GIL: PNG encoding, the slowest step, runs in parallel
_ROLE_TRAIN, _ROLE_TEST_GOOD, _ROLE_TEST_DEFECT, _ROLE_CALIBRATION = 0, 1, 2, 3
_STRIPS = {"train": (0.0, 0.5), "calibration": (0.5, 0.75), "test": (0.75, 1.0)}  # column fractions
# Brick's perspective is mirror-symmetric about the centre (bricks lean left on the left,
# right on the right) and brick size grows from top to bottom. A calibration strip beside
# the test strip still sees another lean (measured: 57 of 60 good test crops flagged), so
# for brick calibration and test share the right edge, split by rows, and training takes
# the rest (its flips include the right-edge lean). Fractions: (top, bottom, left, right).
_BRICK_REGIONS = {"train": (0.0, 1.0, 0.0, 0.75), "calibration": (0.0, 0.5, 0.75, 1.0),
                  "test": (0.5, 1.0, 0.75, 1.0)}


def _layout(texture: str) -> dict[str, tuple[float, float, float, float]]:
    if texture in ANISOTROPIC_TEXTURES:
        return _BRICK_REGIONS
    return {role: (0.0, 1.0, a, b) for role, (a, b) in _STRIPS.items()}


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


def plan_regions(height: int, width: int, crop: int, texture: str = "grass") -> dict[str, Region]:
    """Disjoint full-height strips per role (see module doc). Raises ValueError when a crop does not fit."""
    regions = {role: Region(int(round(t * height)), int(round(b * height)), int(round(l * width)),
                            int(round(r * width))) for role, (t, b, l, r) in _layout(texture).items()}
    narrowest = min(min(r.right - r.left, r.bottom - r.top) for r in regions.values())
    if not 8 <= crop <= narrowest:
        raise ValueError(f"crop {crop} does not fit a {height}x{width} photograph: each set's region is "
                         f"{narrowest} pixels across; use a crop between 8 and {narrowest}")
    return regions


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


def _distinct_spec(rng: np.random.Generator, region: Region, crop: int, transforms: Sequence[int],
                   taken: set[CropSpec]) -> CropSpec:
    """A crop of ``region`` not in ``taken`` (drawing again from the same stream until one is new)."""
    spec = _random_spec(rng, region, crop, transforms)
    while spec in taken:
        spec = _random_spec(rng, region, crop, transforms)
    taken.add(spec)
    return spec


def distinct_crops(region: Region, crop: int, transforms: Sequence[int]) -> int:
    """How many different crops (position and transform) ``region`` holds."""
    return (region.bottom - region.top - crop + 1) * (region.right - region.left - crop + 1) * len(transforms)


def make_defect_example(
    photo: np.ndarray, spec: CropSpec, crop: int, defect_type: str,
    rng: np.random.Generator, foreign: Sequence[np.ndarray] = (), recipe: str = "subtle",
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:  # fmt: skip
    """(clean, defective, mask) for one test image: the crop of ``spec`` with one defect added."""
    clean = extract_crop(photo, spec, crop)
    defective, mask, _ = synthesize_defect(clean, defect_type, rng, foreign, recipe=recipe)
    return clean, defective, mask


def measure_overlap(specs_by_role: dict[str, list[CropSpec]], regions: dict[str, Region], shape: tuple[int, int],
                    crop: int) -> dict[str, Any]:
    """How much the crops share source pixels: between sets (must be 0) and within each set.

    ``within[role]``: the share of its pixels that a crop has in common with another crop of
    the same set, averaged over all pairs, and ``coverage``: distinct source pixels used /
    pixels of the set's strip.
    """
    counts = {role: np.zeros(shape, dtype=np.int32) for role in specs_by_role}
    for role, specs in specs_by_role.items():
        for sp in specs:
            counts[role][sp.y : sp.y + crop, sp.x : sp.x + crop] += 1
    roles = list(specs_by_role)
    between = {f"{a}/{b}": int(((counts[a] > 0) & (counts[b] > 0)).sum())
               for i, a in enumerate(roles) for b in roles[i + 1 :]}  # fmt: skip
    within = {}
    for role, specs in specs_by_role.items():
        ys = np.array([sp.y for sp in specs], dtype=np.int64)
        xs = np.array([sp.x for sp in specs], dtype=np.int64)
        # Shared area of every pair of crops (same-sized squares), as a fraction of a crop.
        dy = np.clip(crop - np.abs(ys[:, None] - ys[None, :]), 0, None)
        dx = np.clip(crop - np.abs(xs[:, None] - xs[None, :]), 0, None)
        pair = (dy * dx) / float(crop * crop)
        n = len(specs)
        mean_pair = float((pair.sum() - n) / (n * (n - 1))) if n > 1 else 0.0
        r = regions[role]
        strip_pixels = (r.bottom - r.top) * (r.right - r.left)
        within[role] = {"crops": n, "mean_pairwise_shared_fraction": round(mean_pair, 4),
                        "coverage": round(float((counts[role] > 0).sum()) / strip_pixels, 4)}
    return {"between_sets_shared_pixels": between, "within": within}


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


@dataclass(frozen=True)
class Counts:
    """Images per set; defective ones are spread round-robin over types x recipes."""

    train: int
    calibration: int
    test_good: int
    test_defect: int


def _build_category(out: Path, name: str, seed: int, counts: Counts, crop: int,
                    write: Callable[..., Future[None]]) -> dict[str, Any]:
    """Write one category (staged, then renamed into place); ``write`` schedules a PNG save."""
    photo = load_texture(name)
    foreign = [load_texture(t) for t in TEXTURES if t != name]
    regions = plan_regions(photo.shape[0], photo.shape[1], crop, name)
    transforms = allowed_transforms(name)
    final = out / name
    root = _prepare_target(final)
    width = max(3, len(str(max(counts.train, counts.calibration, counts.test_good, counts.test_defect) - 1)))
    records: list[dict[str, Any]] = []
    pending: list[Future[None]] = []
    specs: dict[str, list[CropSpec]] = {role: [] for role in ROLES}

    def normals(n: int, role_id: int, region: str, folder: str) -> None:
        taken: set[CropSpec] = set()
        for i in range(n):
            spec = _distinct_spec(_image_rng(seed, name, role_id, i), regions[region], crop, transforms, taken)
            specs[region].append(spec)
            rel = f"{folder}/{i:0{width}d}.png"
            pending.append(write(_save_png, extract_crop(photo, spec, crop), root / rel))
            records.append({"file": rel, "set": region, **asdict(spec)})

    normals(counts.train, _ROLE_TRAIN, "train", "train/good")
    normals(counts.calibration, _ROLE_CALIBRATION, "calibration", "calibration/good")
    normals(counts.test_good, _ROLE_TEST_GOOD, "test", "test/good")
    per_type = {t: 0 for t in DEFECT_TYPES}
    per_tier: dict[str, dict[str, int]] = {t: {"visible": 0, "subtle": 0} for t in DEFECT_TYPES}
    for i in range(counts.test_defect):
        defect = DEFECT_TYPES[i % len(DEFECT_TYPES)]  # round robin: types and recipes evenly spread
        recipe = RECIPES[(i // len(DEFECT_TYPES)) % len(RECIPES)]
        rng = _image_rng(seed, name, _ROLE_TEST_DEFECT, i)
        spec = _random_spec(rng, regions["test"], crop, transforms)
        specs["test"].append(spec)
        defective, mask, params = synthesize_defect(extract_crop(photo, spec, crop), defect, rng, foreign,
                                                    recipe=recipe)
        j = per_type[defect]
        per_type[defect] += 1
        per_tier[defect][params["tier"]] += 1
        rel, rel_mask = f"test/{defect}/{j:0{width}d}.png", f"ground_truth/{defect}/{j:0{width}d}_mask.png"
        pending.append(write(_save_png, defective, root / rel))
        pending.append(write(_save_png, mask, root / rel_mask))
        records.append({"file": rel, "mask": rel_mask, "set": "test", **asdict(spec), "defect": params})

    meta = {
        "generator": GENERATOR, "format_version": FORMAT_VERSION, "category": name,
        "source": f"skimage.data.{name}()", "photo_shape": list(photo.shape), "channels": "RGB, gray replicated",
        "seed": seed, "crop": crop, "regions": {role: asdict(r) for role, r in regions.items()},
        "transforms": list(transforms),
        "transform_encoding": "t % 4 quarter turns (numpy.rot90), then a left-right flip if t >= 4",
        "foreign_sources": [t for t in TEXTURES if t != name], "mask_tolerance": MASK_TOLERANCE,
        "defect_types": list(DEFECT_TYPES), "recipes": list(RECIPES),
        "visibility": {"definition": "mean |defective - clean| inside the mask / std of the clean crop over the "
                                     "mask dilated by crop/16 px", "visible_cutoff": dict(VISIBLE_CUTOFF)},
        "counts": {"train": counts.train, "calibration": counts.calibration, "test_good": counts.test_good,
                   "test_defect": per_type, "test_defect_by_tier": per_tier},
        "overlap": measure_overlap(specs, regions, photo.shape, crop),
        "images": records,
    }  # fmt: skip
    for job in pending:
        job.result()  # re-raises the first write error before the category is published
    (root / "dataset.json").write_text(json.dumps(meta, indent=1, sort_keys=True) + "\n")
    if final.exists():
        shutil.rmtree(final)
    root.rename(final)
    return {"path": str(final), "train": counts.train, "calibration": counts.calibration,
            "test_good": counts.test_good, "test_defect": per_type, "test_defect_by_tier": per_tier}


def build_demo_dataset(
    out: Path | str,
    seed: int = 0,
    n_train: int = 200,
    n_calibration: int = 60,
    n_test_good: int = 60,
    n_test_defect: int = 120,
    crop: int = DEFAULT_CROP,
    categories: Sequence[str] = TEXTURES,
) -> dict[str, Any]:
    """Write the demo data set (one MVTec-layout category per texture) under ``out``.

    Each category is staged in a hidden folder and renamed into place when
    complete, so an interrupted run never leaves a half-written category; a
    category folder this module wrote before is replaced, anything else is
    refused. Returns a summary: ``{"root", "seed", "crop", "categories": {name: {...counts}}}``.
    """
    categories = (categories,) if isinstance(categories, str) else tuple(categories)
    unknown = [c for c in categories if c not in TEXTURES]
    if not categories or unknown or len(set(categories)) != len(categories):
        raise ValueError(f"categories must be distinct names from {TEXTURES}, got {categories}")
    if n_train < 1 or min(n_calibration, n_test_good, n_test_defect) < 0:
        raise ValueError(f"need n_train >= 1 and other counts >= 0, got {n_train}, {n_calibration}, "
                         f"{n_test_good}, {n_test_defect}")
    plan_regions(512, 512, crop)  # fail fast on a bad crop (all bundled photographs are 512x512)
    for name in categories:
        regions = plan_regions(512, 512, crop, name)
        for role, n in (("train", n_train), ("calibration", n_calibration), ("test", n_test_good)):
            room = distinct_crops(regions[role], crop, allowed_transforms(name))
            if n > room:
                raise ValueError(f"{name}: {n} {role} normals of {crop} px need as many different crops; its "
                                 f"region holds {room}")
    root = Path(out)
    root.mkdir(parents=True, exist_ok=True)
    counts = Counts(n_train, n_calibration, n_test_good, n_test_defect)
    summary: dict[str, Any] = {"root": str(root), "seed": seed, "crop": crop, "categories": {}}
    with ThreadPoolExecutor(max_workers=_WRITERS, thread_name_prefix="demo-png") as pool:
        for name in categories:
            summary["categories"][name] = _build_category(root, name, seed, counts, crop, pool.submit)
    return summary
