"""The demo data set: exact masks, disjoint regions, determinism, defect realism, MVTec loading."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image
from scipy import ndimage

from models.data import MVTecCategory
from models.data_loading import load_images, load_masks
from models.defects import RECIPES, VISIBLE_CUTOFF, visibility
from models.demo_data import (
    DEFECT_TYPES,
    MASK_TOLERANCE,
    ROLES,
    TEXTURES,
    CropSpec,
    allowed_transforms,
    apply_transform,
    build_demo_dataset,
    extract_crop,
    load_texture,
    make_defect_example,
    plan_regions,
    synthesize_defect,
)

SMALL: dict[str, Any] = {"n_train": 6, "n_calibration": 4, "n_test_good": 3, "n_test_defect": 16, "crop": 64}


@pytest.fixture(scope="module")
def demo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("demo")
    build_demo_dataset(out, seed=0, **SMALL)
    return out


def _files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def _meta(demo: Path, category: str) -> dict[str, Any]:
    return json.loads((demo / category / "dataset.json").read_text())


def test_layout_and_all_defect_types(demo: Path) -> None:
    for name in TEXTURES:
        cat = MVTecCategory(demo, name)
        assert cat.defect_types() == sorted(DEFECT_TYPES)
        assert len(cat.train_samples()) == 6
        assert cat.has_calibration and len(cat.calibration_samples()) == 4
        test = cat.test_samples()
        counts = {t: sum(s.defect_type == t for s in test) for t in ("good", *DEFECT_TYPES)}
        assert counts == {"good": 3, "scratch": 4, "stain": 4, "hole": 4, "foreign": 4}
        assert all(s.tier in ("visible", "subtle") and s.visibility > 0 for s in test if s.is_defective)
        imgs = load_images(test, 64)
        masks = load_masks(test, 64)
        assert imgs.shape == (len(test), 64, 64, 3)
        assert [bool(m.any()) for m in masks] == [s.is_defective for s in test]


def test_images_are_rgb_gray_and_masks_binary(demo: Path) -> None:
    img = Image.open(demo / "brick/test/hole/000.png")
    assert img.mode == "RGB" and img.size == (64, 64)
    arr = np.asarray(img)
    assert (arr[..., 0] == arr[..., 1]).all() and (arr[..., 0] == arr[..., 2]).all()
    mask = Image.open(demo / "brick/ground_truth/hole/000_mask.png")
    assert mask.mode == "L" and set(np.unique(np.asarray(mask)).tolist()) <= {0, 255}


@pytest.mark.parametrize("category", TEXTURES)
def test_every_image_is_its_recorded_crop_and_masks_are_exact(demo: Path, category: str) -> None:
    meta = _meta(demo, category)
    photo = load_texture(category)
    assert len(meta["images"]) == 6 + 4 + 3 + 16
    for rec in meta["images"]:
        clean = extract_crop(photo, CropSpec(rec["y"], rec["x"], rec["transform"]), meta["crop"])
        img = np.asarray(Image.open(demo / category / rec["file"]))[..., 0]
        if "mask" not in rec:
            assert np.array_equal(img, clean), rec["file"]
            continue
        mask = np.asarray(Image.open(demo / category / rec["mask"])) > 0
        diff = np.abs(img.astype(int) - clean.astype(int))
        assert mask.any(), rec["file"]
        assert np.array_equal(mask, diff > 0), rec["file"]  # mask == changed pixels, exactly
        assert diff[mask].min() >= MASK_TOLERANCE


@pytest.mark.parametrize("category", TEXTURES)
def test_train_calibration_and_test_share_no_source_pixel(demo: Path, category: str) -> None:
    meta = _meta(demo, category)
    crop, regions = meta["crop"], meta["regions"]
    covered = {role: np.zeros(meta["photo_shape"], dtype=bool) for role in ROLES}
    for rec in meta["images"]:
        role = rec["set"]
        assert rec["file"].startswith({"train": "train/", "calibration": "calibration/", "test": "test/"}[role])
        region = regions[role]
        assert region["top"] <= rec["y"] and rec["y"] + crop <= region["bottom"], rec
        assert region["left"] <= rec["x"] and rec["x"] + crop <= region["right"], rec
        covered[role][rec["y"] : rec["y"] + crop, rec["x"] : rec["x"] + crop] = True
        assert rec["transform"] in allowed_transforms(category)
    for i, a in enumerate(ROLES):
        assert covered[a].any()
        for b in ROLES[i + 1 :]:
            assert not (covered[a] & covered[b]).any(), (a, b)  # from the recorded coordinates alone
    overlap = meta["overlap"]
    assert set(overlap["between_sets_shared_pixels"].values()) == {0}
    assert 0.0 < overlap["within"]["train"]["mean_pairwise_shared_fraction"] <= 1.0


@pytest.mark.parametrize("category", TEXTURES)
def test_every_defect_records_its_measured_visibility_and_tier(demo: Path, category: str) -> None:
    meta = _meta(demo, category)
    photo = load_texture(category)
    assert meta["visibility"]["visible_cutoff"] == VISIBLE_CUTOFF
    seen = set()
    for rec in (r for r in meta["images"] if "defect" in r):
        d = rec["defect"]
        clean = extract_crop(photo, CropSpec(rec["y"], rec["x"], rec["transform"]), meta["crop"])
        img = np.asarray(Image.open(demo / category / rec["file"]))[..., 0]
        mask = np.asarray(Image.open(demo / category / rec["mask"])) > 0
        assert d["visibility"] == pytest.approx(visibility(clean, img, mask), abs=1e-4)  # recomputable from files
        assert d["tier"] == ("visible" if d["visibility"] >= VISIBLE_CUTOFF[d["type"]] else "subtle")
        if d["recipe"] == "visible":
            assert d["tier"] == "visible"  # the visible recipe is redrawn until it measures visible
        seen.add((d["type"], d["recipe"]))
    assert seen == {(t, r) for t in DEFECT_TYPES for r in RECIPES}  # every type in both recipes
    by_tier = meta["counts"]["test_defect_by_tier"]
    assert sum(v["visible"] + v["subtle"] for v in by_tier.values()) == 16


def test_the_full_demo_has_both_tiers_of_every_type() -> None:
    # Tiers are measured, not assigned: check on real draws that each type really has both.
    photo = load_texture("grass")
    foreign = [load_texture(t) for t in TEXTURES if t != "grass"]
    for defect in DEFECT_TYPES:
        tiers = {synthesize_defect(extract_crop(photo, CropSpec(0, 384, 0), 128), defect,
                                   np.random.default_rng(seed), foreign, recipe=recipe)[2]["tier"]
                 for seed in range(4) for recipe in RECIPES}  # fmt: skip
        assert tiers == {"visible", "subtle"}, defect


def test_brick_is_never_turned_by_90_degrees() -> None:
    assert set(allowed_transforms("brick")) == {0, 2, 4, 6}
    assert set(allowed_transforms("grass")) == set(range(8))
    a = np.arange(6).reshape(2, 3)
    for t in allowed_transforms("brick"):
        assert apply_transform(a, t).shape == (2, 3)  # rows stay rows
    assert apply_transform(a, 1).shape == (3, 2)


def test_default_crop_fits_three_strips_and_larger_does_not() -> None:
    regions = plan_regions(512, 512, 128)
    assert [regions[r].right - regions[r].left for r in ROLES] == [256, 128, 128]
    assert regions["train"].right <= regions["calibration"].left and regions["calibration"].right <= regions["test"].left
    with pytest.raises(ValueError, match="does not fit"):
        plan_regions(512, 512, 160)


def test_same_seed_same_bytes_different_seed_different(demo: Path, tmp_path: Path) -> None:
    again = tmp_path / "again"
    build_demo_dataset(again, seed=0, **SMALL)
    assert _files(again) == _files(demo)
    other = tmp_path / "other"
    build_demo_dataset(other, seed=1, categories=("gravel",), **SMALL)
    a, b = _files(demo / "gravel"), _files(other / "gravel")
    assert a.keys() == b.keys()
    assert sum(a[k] != b[k] for k in a if k.endswith(".png")) >= len(a) - 2


def test_rebuild_replaces_own_output_and_refuses_foreign_folders(tmp_path: Path) -> None:
    out = tmp_path / "d"
    build_demo_dataset(out, categories=("grass",), **SMALL)
    build_demo_dataset(out, categories=("grass",), **{**SMALL, "n_train": 2, "n_test_defect": 8})
    assert len(list((out / "grass/train/good").iterdir())) == 2  # no stale files left behind
    assert not list(out.glob(".*"))  # staging folder renamed away
    (tmp_path / "mine/brick").mkdir(parents=True)
    (tmp_path / "mine/brick/precious.txt").write_text("keep")
    with pytest.raises(FileExistsError, match="brick"):
        build_demo_dataset(tmp_path / "mine", categories=("brick",), **SMALL)
    assert (tmp_path / "mine/brick/precious.txt").read_text() == "keep"


def test_invalid_arguments() -> None:
    with pytest.raises(ValueError, match="categories"):
        build_demo_dataset("unused", categories=("marble",))
    with pytest.raises(ValueError, match="n_train"):
        build_demo_dataset("unused", n_train=0)


# ----------------------------------------------------------------------------- the defects themselves


def _example(defect: str, seed: int, category: str = "gravel",
             recipe: str = "subtle") -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    photo = load_texture(category)
    foreign = [load_texture(t) for t in TEXTURES if t != category]
    rng = np.random.default_rng(seed)
    return make_defect_example(photo, CropSpec(288, 100, 0), 128, defect, rng, foreign, recipe=recipe)


@pytest.mark.parametrize("defect", DEFECT_TYPES)
def test_synthesized_mask_is_exactly_the_changed_pixels(defect: str) -> None:
    for seed in range(3):
        clean, defective, mask = _example(defect, seed)
        assert defective.dtype == np.uint8 and mask.dtype == np.bool_
        assert np.array_equal(mask, defective != clean)
        assert 8 <= mask.sum() < 0.25 * mask.size


def test_scratches_are_thin() -> None:
    for seed in range(4):
        _, _, mask = _example("scratch", seed)
        # Distance from the inside of the mask to its edge: a 1-3 px line never exceeds 2.
        assert ndimage.distance_transform_edt(mask).max() <= 2.5
        assert mask.sum() > 20  # but it is a line, not a dot


def test_stains_are_subtle_and_soft() -> None:
    for seed in range(4):
        clean, defective, mask = _example("stain", seed)
        diff = np.abs(defective.astype(int) - clean.astype(int))[mask]
        assert np.median(diff) <= 15  # low contrast
        assert diff.min() < diff.max() / 2  # soft edge: changes fade out towards the border


def test_holes_are_dark_and_foreign_patches_are_foreign() -> None:
    clean, defective, mask = _example("hole", 0, recipe="visible")
    assert defective[mask].mean() < 60 and defective[mask].mean() < clean[mask].mean() - 30
    clean, defective, mask = _example("foreign", 0)
    assert np.abs(defective[mask].astype(int) - clean[mask].astype(int)).mean() > 10


def test_synthesis_is_deterministic_per_rng() -> None:
    clean = extract_crop(load_texture("grass"), CropSpec(300, 0, 5), 64)
    a = synthesize_defect(clean, "stain", np.random.default_rng(7))
    b = synthesize_defect(clean, "stain", np.random.default_rng(7))
    assert np.array_equal(a[0], b[0]) and np.array_equal(a[1], b[1]) and a[2] == b[2]
    with pytest.raises(ValueError, match="unknown defect"):
        synthesize_defect(clean, "dent", np.random.default_rng(0))


def test_no_normal_crop_is_drawn_twice_within_a_set(tmp_path: Path) -> None:
    # Brick's calibration and test regions hold 516 distinct 128 px crops each: 60 independent
    # draws repeated four and three of them, byte-identical images counted twice as evidence.
    build_demo_dataset(tmp_path, categories=("brick",), n_train=1, n_calibration=60, n_test_good=60,
                       n_test_defect=0, crop=128)
    meta = _meta(tmp_path, "brick")
    for folder in ("calibration/good", "test/good"):
        records = [r for r in meta["images"] if r["file"].startswith(folder + "/")]
        assert len(records) == 60
        assert len({(r["y"], r["x"], r["transform"]) for r in records}) == 60, folder
        assert len({(tmp_path / "brick" / r["file"]).read_bytes() for r in records}) == 60, folder


def test_more_normals_than_distinct_crops_are_refused(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="brick: 517 calibration normals of 128 px .* holds 516"):
        build_demo_dataset(tmp_path, categories=("brick",), n_train=1, n_calibration=517, crop=128)
    assert not list(tmp_path.iterdir())
