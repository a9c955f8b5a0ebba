"""Data sets for training and evaluating MSFlow: MVTec AD layout and plain folders.

Why this module is strict: an anomaly detector trained on a folder that silently
contains a corrupt file, or evaluated against a mask that belongs to a
differently sized image, produces numbers that look plausible and are wrong.
Every problem is a :class:`DataError` that names the offending path, raised
before any training time is spent.

Layout (MVTec AD)::

    <root>/<category>/train/good/*.png
    <root>/<category>/calibration/good/*.png        optional: normals for the threshold, never
                                                    trained on (``msflow export`` uses them)
    <root>/<category>/test/good/*.png               normal test images
    <root>/<category>/test/<defect>/*.png           defective test images
    <root>/<category>/ground_truth/<defect>/<name>_mask.png
    <root>/<category>/dataset.json                  optional (demo data): per-defect visibility tier

Reading the files' pixels into arrays (:func:`~models.data_loading.load_images`,
:func:`~models.data_loading.load_masks`) is :mod:`models.data_loading`.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from models.ground_truth import MASK_SUFFIX, MaskFolder
from models.image_acceptance import ACCEPTED_FORMATS, UNSUPPORTED_MEDIA_TYPE

__all__ = [
    "IMAGE_EXTENSIONS",
    "GOOD",
    "DataError",
    "Sample",
    "MVTecCategory",
    "list_images",
    "list_categories",
    "folder_of_good_images",
    "CALIBRATION",
    "split_holdout",
]

# The names of the formats the server accepts (models.image_acceptance: PNG, JPEG, BMP, TIFF,
# WEBP): a part photographed for training must be readable by the model serving it, and the
# other way round. The name only picks the files; each is then read by its content, under the
# server's rules (models.preprocessing.open_image).
IMAGE_EXTENSIONS: frozenset[str] = frozenset({".png", ".jpg", ".jpeg", ".jpe", ".jfif", ".bmp", ".tif", ".tiff",
                                              ".webp"})
# Image files the trainer cannot read (nor the server accept): refused by name rather than left
# out in silence, which would train on a part of the set the user never chose.
_UNREADABLE_IMAGE_EXTENSIONS: frozenset[str] = frozenset({
    ".gif", ".heic", ".heif", ".avif", ".jp2", ".j2k", ".jxl", ".pbm", ".pgm", ".ppm",
    ".pnm", ".tga", ".ico", ".exr", ".hdr", ".dng", ".raw", ".cr2", ".nef", ".arw", ".svg", ".psd",
})
_EXTENSION_OF = {"JPEG": "jpg", "MPO": "jpg", "TIFF": "tif"}  # the usual name where it is not the format's
GOOD = "good"
CALIBRATION = "calibration"
DATASET_INFO = "dataset.json"

class DataError(ValueError):
    """The data set on disk is unusable; the message names the path to fix."""


@dataclass(frozen=True)
class Sample:
    """One image of a data set.

    ``label`` is 0 for a good (normal) part and 1 for a defective one;
    ``defect_type`` is ``"good"`` for normal images and the defect folder name
    otherwise; ``mask_path`` is the pixel ground truth of a defective image
    (None for good images, whose mask is all False by definition).
    """

    path: Path
    label: int
    defect_type: str
    mask_path: Path | None = None
    tier: str | None = None  # "visible" / "subtle" where the data set records it (demo data)
    visibility: float | None = None

    def __post_init__(self) -> None:
        if self.label not in (0, 1):
            raise ValueError(f"label must be 0 (good) or 1 (defective), got {self.label!r} for {self.path}")

    @property
    def is_defective(self) -> bool:
        """True for a defective sample (label 1)."""
        return self.label == 1


def _is_hidden(path: Path) -> bool:
    # ".DS_Store", macOS "._x.png" resource forks, ".thumbnails/": never images of the set.
    return path.name.startswith(".")


def _is_image_file(path: Path) -> bool:
    return path.is_file() and not _is_hidden(path) and path.suffix.lower() in IMAGE_EXTENSIONS


def _refuse_what_would_be_skipped(folder: Path, entries: list[Path]) -> None:
    """Raise :class:`DataError` for anything in an image folder that looks like part of the set
    but would not be read: a broken link, an image in a format the trainer cannot read, images
    in a subfolder (only the folder's own files are read), an image whose name does not say so.
    Other files (notes, Thumbs.db) and hidden ones are left alone."""
    for p in entries:
        if _is_hidden(p):
            continue
        suffix = p.suffix.lower()
        if p.is_symlink() and not p.exists():
            raise DataError(f"broken link in {folder}: {p} points to {os.readlink(p)}, which is missing "
                            "(fix or remove the link)")
        if suffix in _UNREADABLE_IMAGE_EXTENSIONS and p.is_file():
            raise DataError(f"{p} is an image format the trainer cannot read (the server refuses it: "
                            f"{UNSUPPORTED_MEDIA_TYPE}); convert it to PNG (lossless), or JPEG, BMP, TIFF, WEBP, "
                            f"or move it out of {folder}")
        if p.is_dir() and _holds_images(p):
            raise DataError(f"{p} is a subfolder holding images, which are not read (only the files directly "
                            f"in {folder} are): move them up into {folder}, or the folder out of it")
        if suffix not in IMAGE_EXTENSIONS and p.is_file() and (fmt := _image_format_of(p)) is not None:
            raise DataError(f"{p} is an image ({fmt}) whose name does not end in an image extension "
                            f"({', '.join(sorted(IMAGE_EXTENSIONS))}), so it would not be read: rename it "
                            f"(e.g. {p.name}.{_EXTENSION_OF.get(fmt, fmt.lower())}), or move it out of {folder}")


def _holds_images(folder: Path) -> bool:
    """An image file anywhere below ``folder``, hidden folders left out (links to folders are
    not followed). Every level: train/good/batch2/day1/*.png were skipped in silence when
    only the subfolder's own files were looked at."""
    for here, folders, files in os.walk(folder):
        folders[:] = [f for f in folders if not f.startswith(".")]
        if any(_is_image_file(Path(here, name)) for name in files):
            return True
    return False


def _image_format_of(path: Path) -> str | None:
    """The format of an image the server would accept, read off the file's first bytes (a
    camera's ``part_001``, a copy cut short as ``x.jpg.part``); None for anything else (notes,
    Thumbs.db). Pillow reads the header only, and only for files not named as images."""
    try:
        with Image.open(path) as img:
            fmt = img.format
    except (OSError, ValueError, Image.DecompressionBombError):
        return None
    return fmt if fmt in ACCEPTED_FORMATS else None


def list_images(folder: str | Path) -> list[Path]:
    """Image files directly inside ``folder`` (not recursive), sorted by file name.

    Sorting by name makes sample order, and so every split and report,
    reproducible across file systems. Raises :class:`DataError` if the folder
    is missing or holds no image, and for what would otherwise be skipped in
    silence (:func:`_refuse_what_would_be_skipped`).
    """
    d = Path(folder)
    if not d.is_dir():
        raise DataError(f"folder not found: {d}")
    entries = list(d.iterdir())
    _refuse_what_would_be_skipped(d, entries)
    images = sorted((p for p in entries if _is_image_file(p)), key=lambda p: p.name)
    if not images:
        exts = ", ".join(sorted(IMAGE_EXTENSIONS))
        raise DataError(f"no images ({exts}) in folder: {d}")
    return images


def list_categories(root: str | Path) -> list[str]:
    """Names of the categories under an MVTec-layout ``root`` (folders with ``train/good``), sorted."""
    r = Path(root)
    if not r.is_dir():
        raise DataError(f"data root not found: {r}")
    return sorted(p.name for p in r.iterdir() if p.is_dir() and (p / "train" / GOOD).is_dir())


def folder_of_good_images(folder: str | Path) -> list[Sample]:
    """Samples for a plain folder of defect-free images (training on custom data)."""
    return [Sample(path=p, label=0, defect_type=GOOD) for p in list_images(folder)]


def refuse_mvtec_layout_as_plain_folder(folder: str | Path) -> None:
    """Raise :class:`DataError` saying which ``--data``/``--category`` to give when ``folder``,
    given as a plain folder of good images, is an MVTec-layout root or one of its categories:
    its images lie in subfolders, so it read as "no images in folder", as if it were empty."""
    d = Path(folder)
    if (d / "train" / GOOD).is_dir():
        raise DataError(f"{d} is one category of an MVTec-layout data set (it holds train/{GOOD}): train on it "
                        f"with --data {d.parent} --category {d.name}")
    if d.is_dir() and (categories := list_categories(d)):
        raise DataError(f"{d} is an MVTec-layout data set (categories: {', '.join(categories)}), not a folder of "
                        f"images: name the one to train on, e.g. --category {categories[0]}")


class MVTecCategory:
    """One product category of an MVTec AD-style data set.

    The constructor checks that the category and its ``train/good`` folder
    exist, so a typo fails immediately with the list of categories that do.
    Test data is optional (a production line may start with good images only);
    :meth:`test_samples` checks it when asked for.
    """

    def __init__(self, root: str | Path, category: str) -> None:
        self.root = Path(root)
        self.category = category
        if not self.root.is_dir():
            raise DataError(f"data root not found: {self.root}")
        self.path = self.root / category
        if not self.path.is_dir():
            known = ", ".join(list_categories(self.root)) or "none"
            raise DataError(f"category folder not found: {self.path} (categories under {self.root}: {known})")
        self.train_dir = self.path / "train" / GOOD
        if not self.train_dir.is_dir():
            raise DataError(f"training folder not found: {self.train_dir} (expected <root>/<category>/train/good)")
        self.calibration_dir = self.path / CALIBRATION / GOOD
        self.test_dir = self.path / "test"
        self.ground_truth_dir = self.path / "ground_truth"
        self._mask_folders: dict[str, MaskFolder] = {}

    def __repr__(self) -> str:
        return f"MVTecCategory(root={str(self.root)!r}, category={self.category!r})"

    @property
    def has_test(self) -> bool:
        """Whether a ``test`` folder exists."""
        return self.test_dir.is_dir()

    def train_samples(self) -> list[Sample]:
        """All images of ``train/good`` (label 0), sorted by name."""
        return [Sample(path=p, label=0, defect_type=GOOD) for p in list_images(self.train_dir)]

    @property
    def has_calibration(self) -> bool:
        """Whether a ``calibration/good`` folder of held-out normals exists."""
        return self.calibration_dir.is_dir()

    def calibration_samples(self) -> list[Sample]:
        """All images of ``calibration/good`` (label 0): normals for the threshold, never trained on."""
        return [Sample(path=p, label=0, defect_type=GOOD) for p in list_images(self.calibration_dir)]

    def defect_annotations(self) -> dict[str, dict[str, float | str]]:
        """``{relative path: {"tier", "visibility"}}`` from ``dataset.json``; empty when there is none."""
        info = self.path / DATASET_INFO
        if not info.is_file():
            return {}
        try:
            records = json.loads(info.read_text()).get("images", [])
        except (OSError, ValueError, AttributeError) as e:
            raise DataError(f"{info} is not a readable data set description: {e}") from e
        return {r["file"]: {"tier": r["defect"]["tier"], "visibility": r["defect"]["visibility"]}
                for r in records if isinstance(r, dict) and "tier" in r.get("defect", {})}

    def defect_types(self) -> list[str]:
        """Sorted names of the defect folders under ``test`` (everything but ``good``)."""
        if not self.has_test:
            raise DataError(f"test folder not found: {self.test_dir}")
        names = (p.name for p in self.test_dir.iterdir() if p.is_dir() and not p.name.startswith("."))
        return sorted(n for n in names if n != GOOD)

    def _mask_folder(self, defect_type: str) -> MaskFolder:
        if defect_type not in self._mask_folders:
            self._mask_folders[defect_type] = MaskFolder(self.ground_truth_dir / defect_type, IMAGE_EXTENSIONS)
        return self._mask_folders[defect_type]

    def mask_path_for(self, image: Path, defect_type: str) -> Path:
        """The ground-truth mask of a defective test image; :class:`DataError` if absent.

        MVTec names masks ``<name>_mask.png``; other image extensions are
        accepted too, PNG first, in any case, and the name in either Unicode
        form (:mod:`models.ground_truth`).
        """
        found = self._mask_folder(defect_type).find(image, (".png", *sorted(IMAGE_EXTENSIONS - {".png"})))
        if found is None:
            expected = self.ground_truth_dir / defect_type / (image.stem + MASK_SUFFIX + ".png")
            raise DataError(f"defective test image {image} has no mask: expected {expected} (every image under "
                            f"{self.test_dir / defect_type} is defective; normal ones belong in {self.test_dir / GOOD})")
        return found

    def _check_every_mask_has_its_image(self, samples: list[Sample]) -> None:
        """A mask no image uses means an image renamed, moved or deleted: a defect the test set
        lost, in silence. Refused, naming the mask; ``ground_truth/good`` (some sets keep empty
        masks of normal images there) is not checked."""
        if not self.ground_truth_dir.is_dir():
            return
        used = {s.mask_path for s in samples}
        for folder in sorted(self.ground_truth_dir.iterdir(), key=lambda p: p.name):
            if not folder.is_dir() or folder.name.startswith(".") or folder.name == GOOD:
                continue
            masks = self._mask_folder(folder.name).files()
            if masks and not (self.test_dir / folder.name).is_dir():
                raise DataError(f"{folder} holds {len(masks)} mask(s) but {self.test_dir / folder.name}, the folder "
                                "of their images, does not exist: restore it, or remove the masks")
            for mask in masks:
                if mask not in used:
                    stem = mask.stem[: -len(MASK_SUFFIX)] if mask.stem.endswith(MASK_SUFFIX) else None
                    wanted = (f"{self.test_dir / folder.name / stem}.<ext>" if stem
                              else f"an image of {self.test_dir / folder.name} (masks are named <image>{MASK_SUFFIX}.png)")
                    raise DataError(f"mask {mask} belongs to no test image: expected {wanted}; "
                                    "restore the image, or remove the mask")

    def test_samples(self) -> list[Sample]:
        """Test images: ``test/good`` first (label 0), then each defect type (label 1) with its mask.

        Every defect folder must be non-empty, every defective image must
        have its mask and every mask its image; a missing mask would otherwise
        count the defect as "all normal pixels" and quietly corrupt pixel-level metrics.
        """
        if not self.has_test:
            raise DataError(f"test folder not found: {self.test_dir}")
        samples: list[Sample] = []
        good_dir = self.test_dir / GOOD
        if good_dir.is_dir():
            samples.extend(Sample(path=p, label=0, defect_type=GOOD) for p in list_images(good_dir))
        notes = self.defect_annotations()
        for defect in self.defect_types():
            if defect.casefold() == GOOD:
                raise DataError(f"{self.test_dir / defect} would be read as a defect type: normal test images "
                                f"belong in {self.test_dir / GOOD} (lower case); rename the folder")
            for p in list_images(self.test_dir / defect):
                note = notes.get(p.relative_to(self.path).as_posix(), {})
                samples.append(Sample(path=p, label=1, defect_type=defect, mask_path=self.mask_path_for(p, defect),
                                      tier=note.get("tier"), visibility=note.get("visibility")))
        self._check_every_mask_has_its_image(samples)
        if not samples:
            raise DataError(f"no test images in {self.test_dir} (expected test/good and test/<defect> folders)")
        return samples


def split_holdout(samples: Sequence[Sample], fraction: float, seed: int) -> tuple[list[Sample], list[Sample]]:
    """Split good training samples into (train, holdout), deterministically for a given seed.

    The holdout is a set of normal images the flows never see: it calibrates
    the score threshold and drives early stopping without touching the test
    set. ``round(fraction * N)`` samples are held out (at least one when
    ``fraction > 0``, and never all of them); both parts keep the input order,
    so the split does not depend on anything but the sample list and the seed.
    """
    if not 0.0 <= fraction < 1.0:
        raise ValueError(f"holdout fraction must be in [0, 1), got {fraction}")
    bad = [s.path for s in samples if s.label != 0]
    if bad:
        raise ValueError(f"split_holdout takes good samples only; defective: {bad[0]} (and {len(bad) - 1} more)")
    n = len(samples)
    n_hold = int(round(fraction * n))
    if fraction > 0.0:
        n_hold = max(n_hold, 1)
    if n_hold >= n and n_hold > 0:
        raise DataError(f"cannot hold out {n_hold} of {n} training images and still train on some: add normal "
                        "images, or train on all of them with --holdout-fraction 0 (the training loss then selects "
                        "the checkpoint, and the threshold needs a calibration/good folder)")
    order = np.random.default_rng(seed).permutation(n)
    held = set(order[:n_hold].tolist())
    train = [s for i, s in enumerate(samples) if i not in held]
    holdout = [s for i, s in enumerate(samples) if i in held]
    return train, holdout
