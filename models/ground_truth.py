"""Ground-truth masks as users' annotation tools write them: which file is an image's mask, and
which of its pixels mark the defect.

Why this is more than ``Image.open(mask) > 0``: MVTec's own masks are two-valued 0/255 PNGs,
where every reading agrees; users' masks are not. Each case below read as a plausible but wrong
mask before, and a wrong mask moves pixel AUROC and AUPRO without any error:

* 0/1 masks and label maps (0, 1, 2, ... one value per defect class): every non-zero pixel is
  defect, as in the official evaluation;
* anti-aliased edges, a bilinear resize, JPEG compression: dozens of grey levels, the faint ones
  at the rim or in the compression noise. Counting every non-zero pixel made a 12 x 16 box
  blurred by 2 px read as 544 defect pixels instead of 192, and a quality-60 JPEG of it as 288.
  Such soft masks are cut at half their brightest value, the 50% contour the edge was drawn at;
* a defect drawn on a transparent layer (white, black or red on transparent, as editors
  export layers): the colour channels alone read as "all defect" or "no defect". Where the
  alpha channel varies, it is the mask; an opaque mask is read by its colours.
* a defect drawn in colour on a white canvas, or a mask saved inverted: no pixel is zero, so
  every pixel read as defect (the whole part in pixel AUROC and AUPRO). A mask of more than one
  value without a black pixel is refused (:func:`lacks_background`).

Finding a mask: ``<image stem>_mask.<ext>`` in ``ground_truth/<defect>``, the extension in any
case (``.PNG``, ``.Png``) and the name in either Unicode form: macOS writes names decomposed
(NFD), most other tools composed (NFC), and the two look the same in any error message.
"""

from __future__ import annotations

import struct
import unicodedata
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps

__all__ = ["MASK_SUFFIX", "MaskFolder", "defect_pixels", "lacks_background", "name_key"]

MASK_SUFFIX = "_mask"
# More distinct non-zero grey levels than this: a soft mask (anti-aliasing, resampling, lossy
# compression make dozens). Up to this many: a label map (one value per defect class) or a
# binary mask, where every non-zero pixel is defect.
LABEL_LEVELS = 16
_ALPHA_MODES = frozenset({"RGBA", "LA", "PA", "RGBa", "La"})
_WIDE_MODES = frozenset({"I", "I;16", "I;16L", "I;16B", "I;16N", "F"})


def name_key(stem: str) -> str:
    """A file stem as compared across Unicode forms (NFC)."""
    return unicodedata.normalize("NFC", stem)


class MaskFolder:
    """The mask files of one ``ground_truth/<defect>`` folder, by (stem in NFC, lower-case extension).

    Listed once, so a test set of thousands of images costs one directory read per defect type.
    """

    def __init__(self, folder: Path, extensions: frozenset[str]) -> None:
        self.folder = folder
        self.by_key: dict[tuple[str, str], Path] = {}
        if folder.is_dir():
            for p in sorted(folder.iterdir(), key=lambda p: p.name):
                if p.is_file() and not p.name.startswith(".") and p.suffix.lower() in extensions:
                    self.by_key.setdefault((name_key(p.stem), p.suffix.lower()), p)

    def find(self, image: Path, preference: tuple[str, ...]) -> Path | None:
        """The mask of ``image`` (extensions tried in ``preference`` order), None if there is none."""
        stem = name_key(image.stem + MASK_SUFFIX)
        for ext in preference:
            if (found := self.by_key.get((stem, ext))) is not None:
                return found
        return None

    def files(self) -> list[Path]:
        return sorted(self.by_key.values(), key=lambda p: p.name)


def _upright(mask: Image.Image) -> Image.Image:
    # As models.preprocessing does for images: malformed EXIF leaves the mask as stored (the
    # size check against its image compares the same way, models.preprocessing.oriented_size).
    try:
        return ImageOps.exif_transpose(mask) or mask
    except (ValueError, SyntaxError, struct.error, KeyError, TypeError, OSError):
        return mask


def _grey_levels(mask: Image.Image) -> np.ndarray:
    """8-bit grey values of a mask: its alpha channel where that varies (the defect drawn on a
    transparent layer, in whatever colour), else its colours as grey."""
    has_alpha = mask.mode in _ALPHA_MODES or (mask.mode == "P" and "transparency" in mask.info)
    if has_alpha:
        alpha = np.asarray(mask.convert("RGBA").getchannel("A"))
        if alpha.size and alpha.min() != alpha.max():
            return alpha
    return np.asarray(mask.convert("L"))


def defect_pixels(mask: Image.Image) -> np.ndarray:
    """Bool array (height, width) of the defect pixels of a decoded mask, upright (EXIF applied).

    Every non-zero pixel of a binary mask or a label map; where the mask is soft (more than
    :data:`LABEL_LEVELS` grey levels), the pixels at least half as bright as its brightest one.
    16-bit and float masks: every pixel above zero.
    """
    m = _upright(mask)
    if m.mode in _WIDE_MODES:
        return np.asarray(m).astype(np.float64) > 0
    grey = _grey_levels(m)
    levels = np.unique(grey)
    if np.count_nonzero(levels) > LABEL_LEVELS:
        return grey.astype(np.uint16) * 2 >= int(levels[-1])
    return grey > 0


def lacks_background(mask: Image.Image, defect: np.ndarray) -> bool:
    """Whether ``defect`` (:func:`defect_pixels` of ``mask``) marks every pixel although the mask
    holds more than one value: its background is not black (a defect drawn in colour on a white
    canvas, or a mask saved inverted), so "every pixel is defect" is a misreading. One value all
    over (a part defective all over) is not refused."""
    if not defect.all():
        return False
    m = _upright(mask)
    values = np.asarray(m) if m.mode in _WIDE_MODES else _grey_levels(m)
    return np.unique(values).size > 1
