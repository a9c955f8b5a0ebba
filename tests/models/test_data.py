"""Preprocessing (every Pillow mode to RGB, EXIF, errors) and the MVTec / folder data sets."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from models.data import (
    DataError,
    MVTecCategory,
    Sample,
    folder_of_good_images,
    list_categories,
    split_holdout,
)
from models.data_loading import load_images, load_masks
from models.preprocessing import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    ImageReadError,
    load_image,
    open_image,
    oriented_size,
    resize_for_model,
    resize_mask,
    to_rgb,
)

# ----------------------------------------------------------------------------- preprocessing


def _pixel(img: Image.Image, xy: tuple[int, int] = (0, 0)) -> tuple[int, ...]:
    out = to_rgb(img)
    assert out.mode == "RGB"
    return tuple(out.getpixel(xy))


def test_imagenet_constants() -> None:
    assert IMAGENET_MEAN == (0.485, 0.456, 0.406)
    assert IMAGENET_STD == (0.229, 0.224, 0.225)


@pytest.mark.parametrize("mode", ["I;16", "I;16B", "I;16L"])
def test_16_bit_scaled_by_range_not_clipped(mode: str) -> None:
    img = Image.new(mode, (3, 1))
    for x, v in enumerate((65535, 300, 32768)):
        img.putpixel((x, 0), v)
    # Pillow's own convert("L") would clip 300 to 255; the true 16-bit range maps it to 1.
    assert [_pixel(img, (x, 0)) for x in range(3)] == [(255,) * 3, (1,) * 3, (128,) * 3]


def test_16_bit_png_file_round_trip(tmp_path: Path) -> None:
    p = tmp_path / "deep.png"
    Image.fromarray(np.full((8, 8), 65535, dtype=np.uint16)).save(p)
    arr = load_image(p, 8)
    assert arr.dtype == np.uint8 and (arr == 255).all()


def test_mode_i_treated_as_16_bit_and_clipped() -> None:
    img = Image.new("I", (3, 1))
    for x, v in enumerate((65535, 70000, -5)):
        img.putpixel((x, 0), v)
    assert [_pixel(img, (x, 0))[0] for x in range(3)] == [255, 255, 0]


def test_float_mode_rounds_and_clips() -> None:
    img = Image.fromarray(np.array([[127.6, 300.0, -3.0]], dtype=np.float32), mode="F")
    assert [_pixel(img, (x, 0))[0] for x in range(3)] == [128, 255, 0]


def test_gray_bilevel_and_gray_alpha() -> None:
    assert _pixel(Image.new("L", (1, 1), 77)) == (77, 77, 77)
    assert _pixel(Image.new("1", (1, 1), 1)) == (255, 255, 255)
    # Alpha is dropped (not composited on black): a fully transparent pixel keeps its colour.
    assert _pixel(Image.new("LA", (1, 1), (100, 0))) == (100, 100, 100)
    assert _pixel(Image.new("RGBA", (1, 1), (10, 20, 30, 0))) == (10, 20, 30)


def test_palette_with_and_without_transparency() -> None:
    img = Image.new("P", (2, 1))
    img.putpalette([255, 0, 0, 0, 255, 0] + [0] * 762)
    img.putpixel((1, 0), 1)
    assert _pixel(img, (0, 0)) == (255, 0, 0) and _pixel(img, (1, 0)) == (0, 255, 0)
    img.info["transparency"] = 0  # index 0 transparent: alpha dropped, palette colour kept
    assert _pixel(img, (0, 0)) == (255, 0, 0)
    buf = io.BytesIO()
    img.save(buf, format="PNG")  # writes a tRNS chunk
    buf.seek(0)
    reread = Image.open(buf)
    assert reread.mode == "P" and "transparency" in reread.info
    assert _pixel(reread, (1, 0)) == (0, 255, 0)


def test_cmyk() -> None:
    assert _pixel(Image.new("CMYK", (1, 1), (0, 0, 0, 0))) == (255, 255, 255)
    assert _pixel(Image.new("CMYK", (1, 1), (255, 0, 0, 0))) == (0, 255, 255)


def _oriented_png(tmp_path: Path, orientation: int) -> Path:
    # 4 wide x 2 high: left half red, right half blue.
    arr = np.zeros((2, 4, 3), dtype=np.uint8)
    arr[:, :2] = (255, 0, 0)
    arr[:, 2:] = (0, 0, 255)
    img = Image.fromarray(arr)
    exif = img.getexif()
    exif[0x0112] = orientation
    p = tmp_path / f"o{orientation}.png"
    img.save(p, exif=exif.tobytes())
    return p


def test_exif_orientation_rotates(tmp_path: Path) -> None:
    p = _oriented_png(tmp_path, 6)  # 6: display rotated 90 degrees clockwise
    with Image.open(p) as raw:
        assert raw.size == (4, 2)
        assert oriented_size(raw) == (2, 4)
        out = to_rgb(raw)
    assert out.size == (2, 4)
    assert out.getpixel((0, 0)) == (255, 0, 0)  # the left (red) edge is now on top
    assert out.getpixel((0, 3)) == (0, 0, 255)
    opened = open_image(p)
    assert opened.size == (2, 4) and to_rgb(opened).size == (2, 4)  # applied once, not twice


def test_resize_for_model_is_lanczos_uint8_contiguous() -> None:
    rng = np.random.default_rng(0)
    img = Image.fromarray(rng.integers(0, 256, (40, 30, 3), dtype=np.uint8))
    arr = resize_for_model(img, 16)
    assert arr.shape == (16, 16, 3) and arr.dtype == np.uint8 and arr.flags.c_contiguous
    assert np.array_equal(arr, np.asarray(img.resize((16, 16), Image.Resampling.LANCZOS)))
    gray = resize_for_model(Image.new("L", (5, 5), 9), 4)
    assert gray.shape == (4, 4, 3) and (gray == 9).all()
    with pytest.raises(ValueError):
        resize_for_model(img, 0)


def test_truncated_file_raises_image_read_error(tmp_path: Path) -> None:
    rng = np.random.default_rng(1)
    good = tmp_path / "good.png"
    Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(good)
    bad = tmp_path / "truncated.png"
    bad.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    with pytest.raises(ImageReadError, match="truncated.png") as info:
        load_image(bad, 32)
    assert isinstance(info.value, ValueError)
    text = tmp_path / "notes.png"
    text.write_text("not an image")
    with pytest.raises(ImageReadError, match="notes.png"):
        load_image(text, 32)
    with pytest.raises(ImageReadError, match="missing.png"):
        load_image(tmp_path / "missing.png", 32)


def test_resize_mask_nearest_bool() -> None:
    m = np.zeros((4, 4), dtype=np.uint8)
    m[:2, :2] = 1  # 0/1 masks count too
    out = resize_mask(Image.fromarray(m), 8)
    assert out.dtype == np.bool_ and out.shape == (8, 8)
    assert out[:4, :4].all() and not out[4:, :].any() and not out[:, 4:].any()
    assert resize_mask(Image.new("1", (3, 3), 1), 2).all()


# ----------------------------------------------------------------------------- data sets


def _save(path: Path, value: int = 128, size: tuple[int, int] = (12, 10), mode: str = "RGB") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    color = (value, value, value) if mode == "RGB" else value
    Image.new(mode, size, color).save(path)
    return path


def _mask(path: Path, size: tuple[int, int] = (12, 10)) -> Path:
    m = np.zeros((size[1], size[0]), dtype=np.uint8)
    m[2:5, 3:7] = 255
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(m).save(path)
    return path


@pytest.fixture()
def mvtec(tmp_path: Path) -> Path:
    cat = tmp_path / "root" / "widget"
    _save(cat / "train/good/b.png", 10)
    _save(cat / "train/good/a.JPG", 20)
    _save(cat / "train/good/c.bmp", 30)
    _save(cat / "train/good/d.tiff", 40)
    (cat / "train/good/readme.txt").write_text("ignored")
    _save(cat / "train/good/._a.png", 50)  # macOS resource fork: hidden, ignored
    _save(cat / "test/good/000.png", 60)
    _save(cat / "test/crack/000.png", 70)
    _mask(cat / "ground_truth/crack/000_mask.png")
    return tmp_path / "root"


def test_mvtec_category_lists_sorted_samples(mvtec: Path) -> None:
    assert list_categories(mvtec) == ["widget"]
    cat = MVTecCategory(mvtec, "widget")
    train = cat.train_samples()
    assert [s.path.name for s in train] == ["a.JPG", "b.png", "c.bmp", "d.tiff"]
    assert all(s.label == 0 and s.defect_type == "good" and s.mask_path is None for s in train)
    assert cat.defect_types() == ["crack"]
    test = cat.test_samples()
    assert [(s.defect_type, s.label) for s in test] == [("good", 0), ("crack", 1)]
    assert test[1].mask_path == mvtec / "widget/ground_truth/crack/000_mask.png"


def test_load_images_keeps_order_and_uses_shared_preprocessing(mvtec: Path) -> None:
    train = MVTecCategory(mvtec, "widget").train_samples()
    imgs = load_images(train, 8, workers=3)
    assert imgs.shape == (4, 8, 8, 3) and imgs.dtype == np.uint8
    assert [int(np.median(im)) for im in imgs] == [20, 10, 30, 40]  # a.JPG, b, c, d
    for s, im in zip(train, imgs):  # trainer and server see the same array
        with Image.open(s.path) as raw:
            assert np.array_equal(im, resize_for_model(raw, 8))


def test_load_masks(mvtec: Path) -> None:
    test = MVTecCategory(mvtec, "widget").test_samples()
    masks = load_masks(test, 12)
    assert masks.shape == (2, 12, 12) and masks.dtype == np.bool_
    assert not masks[0].any() and masks[1].any()
    with Image.open(test[1].mask_path) as m:
        assert np.array_equal(masks[1], resize_mask(m, 12))


def test_missing_mask_names_the_image(mvtec: Path) -> None:
    (mvtec / "widget/ground_truth/crack/000_mask.png").unlink()
    with pytest.raises(DataError, match=r"crack[/\\]000\.png.*000_mask\.png"):
        MVTecCategory(mvtec, "widget").test_samples()


def test_mask_size_mismatch_names_the_mask(mvtec: Path) -> None:
    _mask(mvtec / "widget/ground_truth/crack/000_mask.png", size=(10, 12))
    test = MVTecCategory(mvtec, "widget").test_samples()
    with pytest.raises(DataError, match=r"000_mask\.png is 10x12 .* is 12x10"):
        load_masks(test, 8)


def test_defective_sample_without_mask_path() -> None:
    with pytest.raises(DataError, match="x.png"):
        load_masks([Sample(Path("x.png"), 1, "crack", None)], 8)


def test_empty_and_missing_folders(mvtec: Path, tmp_path: Path) -> None:
    with pytest.raises(DataError, match="data root not found"):
        MVTecCategory(tmp_path / "nope", "widget")
    with pytest.raises(DataError, match=r"category folder not found.*gadget.*widget"):
        MVTecCategory(mvtec, "gadget")
    (mvtec / "bare").mkdir()
    with pytest.raises(DataError, match=r"bare[/\\]train[/\\]good"):
        MVTecCategory(mvtec, "bare")
    (mvtec / "bare/train/good").mkdir(parents=True)
    with pytest.raises(DataError, match=r"no images .* in folder: .*bare[/\\]train[/\\]good"):
        MVTecCategory(mvtec, "bare").train_samples()
    (mvtec / "widget/test/dent").mkdir()
    with pytest.raises(DataError, match=r"test[/\\]dent"):
        MVTecCategory(mvtec, "widget").test_samples()
    with pytest.raises(DataError, match="test folder not found"):
        MVTecCategory(mvtec, "bare").test_samples()


def test_unreadable_image_names_the_file(mvtec: Path) -> None:
    broken = mvtec / "widget/train/good/e.png"
    broken.write_bytes(b"\x89PNG\r\n\x1a\n garbage")
    samples = MVTecCategory(mvtec, "widget").train_samples()
    with pytest.raises(DataError, match=r"e\.png"):
        load_images(samples, 8)


def test_folder_of_good_images(tmp_path: Path) -> None:
    _save(tmp_path / "imgs/2.png", 5)
    _save(tmp_path / "imgs/1.jpeg", 6)
    samples = folder_of_good_images(tmp_path / "imgs")
    assert [s.path.name for s in samples] == ["1.jpeg", "2.png"]
    assert all(s.label == 0 for s in samples)
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="empty"):
        folder_of_good_images(tmp_path / "empty")
    with pytest.raises(DataError, match="absent"):
        folder_of_good_images(tmp_path / "absent")


def test_split_holdout_deterministic_and_disjoint() -> None:
    samples = [Sample(Path(f"{i:02d}.png"), 0, "good") for i in range(20)]
    train, hold = split_holdout(samples, 0.25, seed=3)
    assert len(hold) == 5 and len(train) == 15
    assert sorted(train + hold, key=lambda s: s.path) == samples
    assert train == sorted(train, key=lambda s: s.path)  # input order kept
    assert split_holdout(samples, 0.25, seed=3) == (train, hold)
    assert split_holdout(samples, 0.25, seed=4)[1] != hold
    assert split_holdout(samples, 0.0, seed=3) == (samples, [])
    assert len(split_holdout(samples[:3], 0.01, seed=0)[1]) == 1
    with pytest.raises(ValueError):
        split_holdout(samples, 1.0, seed=0)
    with pytest.raises(ValueError, match="good samples only"):
        split_holdout([*samples, Sample(Path("bad.png"), 1, "crack", Path("m.png"))], 0.2, seed=0)
