"""What users' own MVTec-layout folders hold besides clean 0/255 PNGs, read through the trainer's
data layer: each oddity is either read correctly or refused with a DataError naming the file.
Never skipped in silence, never a mask that quietly reads as something else."""

from __future__ import annotations

import unicodedata
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageFilter

from models.data import DataError, MVTecCategory, folder_of_good_images, split_holdout
from models.data_loading import load_images, load_masks


def _image(path: Path, size: tuple[int, int] = (40, 40), seed: int = 0, **save: object) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)).save(path, **save)
    return path


def _square_mask(size: tuple[int, int] = (40, 40), value: int = 255) -> np.ndarray:
    m = np.zeros((size[1], size[0]), dtype=np.uint8)
    m[8:20, 10:26] = value
    return m


def _save_mask(path: Path, mask: np.ndarray | Image.Image, **save: object) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    (mask if isinstance(mask, Image.Image) else Image.fromarray(mask)).save(path, **save)
    return path


@pytest.fixture()
def root(tmp_path: Path) -> Path:
    """One category, two training images, one good and one defective (with mask) test image."""
    cat = tmp_path / "root" / "part"
    _image(cat / "train/good/000.png", seed=1)
    _image(cat / "train/good/001.png", seed=2)
    _image(cat / "test/good/000.png", seed=3)
    _image(cat / "test/crack/000.png", seed=4)
    _save_mask(cat / "ground_truth/crack/000_mask.png", _square_mask())
    return tmp_path / "root"


def _defect_mask(root: Path, size: int = 40) -> np.ndarray:
    test = MVTecCategory(root, "part").test_samples()
    return load_masks(test, size)[-1]


# ----------------------------------------------------------------------------- image folders


def test_webp_images_are_trained_on_as_the_server_reads_them(root: Path) -> None:
    """The server accepts WEBP uploads; the trainer skipped *.webp in silence (2 of 3 images trained)."""
    webp = _image(root / "part/train/good/002.webp", seed=5, lossless=True)
    samples = MVTecCategory(root, "part").train_samples()
    assert webp in [s.path for s in samples]
    with Image.open(webp) as im:
        assert np.array_equal(load_images([s for s in samples if s.path == webp], 8)[0],
                              np.asarray(im.convert("RGB").resize((8, 8), Image.Resampling.LANCZOS)))


def test_a_broken_link_in_an_image_folder_is_named_not_skipped(root: Path) -> None:
    (root / "part/train/good/003.png").symlink_to(root / "elsewhere/missing.png")
    with pytest.raises(DataError, match=r"003\.png.*(link|missing)"):
        MVTecCategory(root, "part").train_samples()


def test_a_linked_image_is_read(root: Path, tmp_path: Path) -> None:
    target = _image(tmp_path / "shared/part.png", seed=9)
    (root / "part/train/good/004.png").symlink_to(target)
    assert len(MVTecCategory(root, "part").train_samples()) == 3


@pytest.mark.parametrize("name", ["002.gif", "002.heic", "002.jfif.gif"])
def test_an_image_format_the_trainer_cannot_read_is_refused_not_skipped(root: Path, name: str) -> None:
    (root / "part/train/good" / name).write_bytes(b"GIF89a")
    with pytest.raises(DataError, match=rf"{name.replace('.', '[.]')}.*415 unsupported_media_type.*PNG"):
        MVTecCategory(root, "part").train_samples()


def test_images_in_a_subfolder_are_refused_not_skipped(root: Path) -> None:
    """train/good/line2/*.png were never read: the model trained on a fraction of the set."""
    _image(root / "part/train/good/line2/000.png", seed=6)
    with pytest.raises(DataError, match=r"line2.*not read"):
        MVTecCategory(root, "part").train_samples()


def test_images_two_folders_down_are_refused_not_skipped(root: Path) -> None:
    """train/good/batch2/day1/*.png were skipped in silence (only one level down was looked at):
    23 images in the set, 18 trained on."""
    _image(root / "part/train/good/batch2/day1/000.png", seed=8)
    (root / "part/train/good/batch2/.cache").mkdir()
    with pytest.raises(DataError, match=r"batch2.*not read"):
        MVTecCategory(root, "part").train_samples()


def test_junk_files_and_empty_or_hidden_subfolders_are_ignored(root: Path) -> None:
    good = root / "part/train/good"
    (good / ".DS_Store").write_bytes(b"\0\0\0\1Bud1")
    (good / "Thumbs.db").write_bytes(b"\xd0\xcf\x11\xe0")
    (good / "._000.png").write_bytes(b"\0\5\26\7")
    (good / "notes.txt").write_text("shift B")
    (good / "empty").mkdir()
    _image(good / ".thumbnails/000.png", seed=7)
    assert [s.path.name for s in MVTecCategory(root, "part").train_samples()] == ["000.png", "001.png"]


@pytest.mark.parametrize(("name", "save", "fmt"), [("part_001", {"format": "PNG"}, "PNG"),
                                                   ("002.jpg.part", {"format": "JPEG"}, "JPEG"),
                                                   ("003.tmp", {"format": "TIFF"}, "TIFF")])
def test_an_image_whose_name_does_not_say_so_is_refused_not_skipped(root: Path, name: str, save: dict[str, str],
                                                                     fmt: str) -> None:
    """A camera's extensionless file, a copy cut short: skipped in silence, the set trained without it."""
    _image(root / "part/train/good" / name, seed=8, **save)
    with pytest.raises(DataError, match=rf"{name.replace('.', '[.]')} is an image \({fmt}\).*not be read.*rename"):
        MVTecCategory(root, "part").train_samples()


def test_too_few_images_to_hold_out_says_what_to_do(tmp_path: Path) -> None:
    samples = folder_of_good_images(_image(tmp_path / "one/000.png").parent)
    with pytest.raises(DataError, match="--holdout-fraction 0"):
        split_holdout(samples, 0.1, seed=0)


# ----------------------------------------------------------------------------- masks: finding them


def test_a_mask_is_found_whatever_the_case_of_its_extension(root: Path) -> None:
    (root / "part/ground_truth/crack/000_mask.png").rename(root / "part/ground_truth/crack/000_mask.Png")
    assert _defect_mask(root).sum() == 12 * 16


def test_a_mask_is_found_whatever_the_unicode_form_of_its_name(root: Path) -> None:
    """macOS writes names decomposed (NFD); a mask named in NFC was 'missing', with the very name
    that looks the same in the message."""
    crack = root / "part/test/crack"
    (crack / "000.png").rename(crack / unicodedata.normalize("NFD", "Naht_é.png"))
    gt = root / "part/ground_truth/crack"
    (gt / "000_mask.png").rename(gt / unicodedata.normalize("NFC", "Naht_é_mask.png"))
    assert _defect_mask(root).sum() == 12 * 16


def test_a_mask_without_its_image_is_named(root: Path) -> None:
    """A mask whose image was renamed or deleted was ignored: the defect left the test set unseen."""
    _save_mask(root / "part/ground_truth/crack/001_mask.png", _square_mask())
    with pytest.raises(DataError, match=r"001_mask\.png.*test[/\\]crack[/\\]001"):
        MVTecCategory(root, "part").test_samples()


def test_a_ground_truth_folder_without_its_test_folder_is_named(root: Path) -> None:
    _save_mask(root / "part/ground_truth/dent/000_mask.png", _square_mask())
    with pytest.raises(DataError, match=r"ground_truth[/\\]dent.*test[/\\]dent"):
        MVTecCategory(root, "part").test_samples()


def test_a_defect_folder_named_like_good_says_where_normals_go(root: Path) -> None:
    (root / "part/test/good").rename(root / "part/test/Good")
    with pytest.raises(DataError, match=r"Good.*test[/\\]good"):
        MVTecCategory(root, "part").test_samples()


# ----------------------------------------------------------------------------- masks: reading them


def test_zero_one_masks_read_as_zero_255_masks(root: Path) -> None:
    _save_mask(root / "part/ground_truth/crack/000_mask.png", _square_mask(value=1))
    assert _defect_mask(root).sum() == 12 * 16


def test_label_map_masks_count_every_label(root: Path) -> None:
    m = _square_mask(value=3)
    m[0:4, 0:4] = 1  # a second defect, another class id
    _save_mask(root / "part/ground_truth/crack/000_mask.png", m)
    assert _defect_mask(root).sum() == 12 * 16 + 16


def test_anti_aliased_mask_is_cut_at_half_its_range(root: Path) -> None:
    """Blurred edges (anti-aliasing, a bilinear resize) counted every faint pixel as defect:
    a 12 x 16 box read as 24 x 28 (+250%), inflating pixel AUROC's and AUPRO's positives."""
    soft = Image.fromarray(_square_mask()).filter(ImageFilter.GaussianBlur(2))
    _save_mask(root / "part/ground_truth/crack/000_mask.png", soft)
    got = _defect_mask(root)
    assert abs(int(got.sum()) - 12 * 16) <= 12 + 16  # the 50% contour: the box, give or take its rim


def test_jpeg_mask_noise_is_not_a_defect(root: Path) -> None:
    gt = root / "part/ground_truth/crack"
    (gt / "000_mask.png").unlink()
    _save_mask(gt / "000_mask.jpg", _square_mask(), quality=60)
    with Image.open(gt / "000_mask.jpg") as im:
        assert (np.asarray(im) > 0).sum() > 12 * 16 + 20  # what '> 0' made of it
    assert _defect_mask(root).sum() == 12 * 16


def test_mask_drawn_on_a_transparent_layer(root: Path) -> None:
    """A defect painted on a transparent layer read by its colours alone: white on a transparent
    background stored white was 'all defect' (1600 of 1600 pixels), black on transparent 'no defect'."""
    box = _square_mask() > 0
    for paint, background in (((255, 255, 255), (255, 255, 255)), ((0, 0, 0), (0, 0, 0)),
                              ((255, 0, 0), (0, 0, 0)), ((255, 255, 255), (0, 0, 0))):
        rgba = np.zeros((40, 40, 4), dtype=np.uint8)
        rgba[..., :3] = background
        rgba[box, :3] = paint
        rgba[..., 3] = np.where(box, 255, 0)
        _save_mask(root / "part/ground_truth/crack/000_mask.png", Image.fromarray(rgba, "RGBA"))
        assert _defect_mask(root).sum() == 12 * 16, (paint, background)
    opaque = np.zeros((40, 40, 4), dtype=np.uint8)
    opaque[..., 3] = 255
    opaque[box, :3] = 255  # an opaque mask is read by its colours
    _save_mask(root / "part/ground_truth/crack/000_mask.png", Image.fromarray(opaque, "RGBA"))
    assert _defect_mask(root).sum() == 12 * 16


def test_an_all_black_mask_of_a_defective_image_is_refused(root: Path) -> None:
    """It read as a defect with no defective pixel: its whole image counted as normal pixels."""
    _save_mask(root / "part/ground_truth/crack/000_mask.png", np.zeros((40, 40), dtype=np.uint8))
    with pytest.raises(DataError, match=r"000_mask\.png marks no defect.*test[/\\]good"):
        _defect_mask(root)


def test_a_mask_without_a_black_background_is_refused(root: Path) -> None:
    """A defect drawn in blue on a white canvas (or a mask saved inverted with a grey defect)
    read as 'every pixel is defect': 1600 of 1600 pixels, the part's whole surface counted as
    the defect in pixel AUROC and AUPRO, without a word. One value all over (a part defective
    all over) is still read as such."""
    box = _square_mask() > 0
    drawn = np.full((40, 40, 3), 255, dtype=np.uint8)
    drawn[box] = (0, 0, 255)
    _save_mask(root / "part/ground_truth/crack/000_mask.png", drawn)
    with pytest.raises(DataError, match=r"000_mask\.png has no black pixel.*every pixel.*black"):
        _defect_mask(root)
    _save_mask(root / "part/ground_truth/crack/000_mask.png", np.full((40, 40), 255, dtype=np.uint8))
    assert _defect_mask(root).all()


def test_sixteen_bit_mask(root: Path) -> None:
    _save_mask(root / "part/ground_truth/crack/000_mask.png", _square_mask().astype(np.uint16) * 257)
    assert _defect_mask(root).sum() == 12 * 16


def test_a_mask_drawn_on_the_sideways_pixels_of_a_rotated_image_says_so(root: Path) -> None:
    """A phone's portrait photo is stored landscape with an EXIF orientation; a labelling tool that
    ignores the tag draws the mask on the stored pixels. The refusal only said the sizes differ."""
    img = Image.fromarray(np.random.default_rng(4).integers(0, 256, (40, 60, 3), dtype=np.uint8))
    exif = img.getexif()
    exif[0x0112] = 6  # stored 60x40, upright 40x60
    img.save(root / "part/test/crack/000.png", exif=exif.tobytes())
    _save_mask(root / "part/ground_truth/crack/000_mask.png", np.full((40, 60), 255, dtype=np.uint8))
    with pytest.raises(DataError, match=r"is 60x40 but its image .* is 40x60 .*stored 60x40 and its EXIF orientation "
                                        r"turns it upright.*draw the mask on the upright image"):
        _defect_mask(root)


# ----------------------------------------------------------------------------- the commands on such a set


def test_eval_of_a_test_set_without_good_images_prints_na(root: Path, tmp_path: Path,
                                                          capsys: pytest.CaptureFixture[str]) -> None:
    """No test/good: `msflow eval` wrote report.json, then died in a TypeError traceback printing
    the false-alarm rate it had no good part to measure (None formatted as a percentage)."""
    import shutil

    from models.msflow import MSFlowConfig
    from models.train import TrainConfig, train
    from msflow.cli import main

    shutil.rmtree(root / "part/test/good")
    run = train(TrainConfig(data=root, category="part", out=tmp_path / "run", model=MSFlowConfig(input_size=64),
                            meta_epochs=1, sub_epochs=1, warmup_meta_epochs=0, decay_milestones=(),
                            holdout_fraction=0.0, device="cpu"), progress=False)
    assert main(["eval", "--run", str(run), "--threshold", "0"]) == 0
    out = capsys.readouterr().out
    assert "false alarms 0/0 good parts (FPR n/a, 95% bound n/a)" in out and "missed" in out


# ----------------------------------------------------------------------------- layouts


def test_an_mvtec_root_without_category_says_to_give_one(root: Path, tmp_path: Path) -> None:
    """Was "no images (...) in folder: ROOT", as if the folder were empty."""
    from models.train import TrainConfig, training_samples

    with pytest.raises(DataError, match=r"MVTec-layout data set \(categories: part\).*--category part"):
        training_samples(TrainConfig(data=root, out=tmp_path / "run"))


def test_a_category_folder_given_as_data_says_to_give_its_root(root: Path, tmp_path: Path) -> None:
    from models.train import TrainConfig, training_samples

    with pytest.raises(DataError, match=rf"--data {root} --category part"):
        training_samples(TrainConfig(data=root / "part", out=tmp_path / "run"))
