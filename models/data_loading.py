"""A data set's samples read into arrays: model inputs and ground-truth masks, in sample order.

Separate from :mod:`models.data`, which decides which files form the set (its layout, and
what is refused by name before anything is read): this is reading their content, a few
files at a time in threads, and what only the pixels can show (an unreadable or truncated
file, a mask whose size is not its image's, a mask that marks nothing). Every problem is a
:class:`~models.data.DataError` naming the file. The pixels go through
:mod:`models.preprocessing`, the same path the server uses.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TypeVar

import numpy as np
from PIL import Image

from models.data import GOOD, DataError, Sample
from models.ground_truth import defect_pixels, lacks_background
from models.image_acceptance import too_many_pixels, trainer_limit
from models.preprocessing import ImageReadError, load_image, oriented_size, resize_mask

__all__ = ["load_images", "load_masks"]

_MAX_WORKERS = 4

_T = TypeVar("_T")


def _check_size(size: int) -> None:
    if not isinstance(size, (int, np.integer)) or isinstance(size, bool) or size <= 0:
        raise ValueError(f"size must be a positive integer, got {size!r}")


def _workers(n_items: int, workers: int | None) -> int:
    if workers is None:
        workers = min(_MAX_WORKERS, os.cpu_count() or 1)
    return max(1, min(int(workers), n_items))


def _map_ordered(fn: Callable[[int], _T], n: int, workers: int | None) -> list[_T]:
    """Run ``fn(i)`` for ``i in range(n)``, results in index order.

    Decoding and Lanczos resampling release the GIL, so a few threads speed up
    loading; results keep input order whatever finishes first, and the first
    error (in input order) is raised.
    """
    w = _workers(n, workers)
    if w == 1 or n <= 1:
        return [fn(i) for i in range(n)]
    with ThreadPoolExecutor(max_workers=w, thread_name_prefix="msflow-load") as pool:
        return list(pool.map(fn, range(n)))


def load_images(samples: Sequence[Sample], size: int, workers: int | None = None) -> np.ndarray:
    """Model inputs of ``samples`` as uint8 [N, size, size, 3], in sample order.

    Unreadable or truncated files raise :class:`DataError` naming the file.
    """
    _check_size(size)
    out = np.empty((len(samples), size, size, 3), dtype=np.uint8)

    def one(i: int) -> None:
        try:
            out[i] = load_image(samples[i].path, size)
        except ImageReadError as exc:
            raise DataError(str(exc)) from exc

    _map_ordered(one, len(samples), workers)
    return out


def _read_header_size(path: Path, what: str, max_pixels: int) -> tuple[int, int]:
    """Upright (width, height) of an image file from its header only."""
    try:
        with Image.open(path) as im:
            return oriented_size(im)
    except FileNotFoundError as exc:
        raise DataError(f"{what} not found: {path}") from exc
    except Image.DecompressionBombError as exc:  # over twice the limit: Pillow refuses it at the header
        raise DataError(too_many_pixels(path, max_pixels, f"over {2 * max_pixels:,} pixels")) from exc
    except (OSError, SyntaxError, ValueError) as exc:
        raise DataError(f"cannot read {what} {path}: {exc}") from exc


def _sideways_hint(image: Path, upright: tuple[int, int], mask_size: tuple[int, int]) -> str:
    """Where the mask has the image's stored size and the image's EXIF orientation turns it
    upright, say so: a labelling tool that ignores the tag draws on the sideways pixels."""
    try:
        with Image.open(image) as im:
            stored = im.size
    except (OSError, SyntaxError, ValueError):
        return ""
    if stored == upright or mask_size != stored:
        return ""
    return (f": the image is stored {stored[0]}x{stored[1]} and its EXIF orientation turns it upright, as the "
            "trainer and the server read it; draw the mask on the upright image (a tool that ignores the "
            "orientation draws on the sideways pixels)")


def _load_mask(sample: Sample, size: int) -> np.ndarray:
    if sample.mask_path is None:
        raise DataError(f"defective sample {sample.path} ({sample.defect_type}) has no mask_path")
    limit = trainer_limit()
    image_size = _read_header_size(sample.path, "image", limit)
    if image_size[0] * image_size[1] > limit:  # refused before its mask (the same size) is decoded
        width, height = image_size
        raise DataError(too_many_pixels(sample.path, limit, f"{width}x{height} = {width * height:,} pixels"))
    mask_size = _read_header_size(sample.mask_path, "mask", limit)
    if mask_size != image_size:
        raise DataError(
            f"mask {sample.mask_path} is {mask_size[0]}x{mask_size[1]} but its image {sample.path} "
            f"is {image_size[0]}x{image_size[1]} (width x height){_sideways_hint(sample.path, image_size, mask_size)}"
        )
    try:
        with Image.open(sample.mask_path) as im:
            im.load()
            defect = defect_pixels(im)
            no_background = lacks_background(im, defect)
    except (OSError, SyntaxError, ValueError) as exc:
        raise DataError(f"cannot read mask {sample.mask_path}: {exc}") from exc
    if not defect.any():
        raise DataError(f"mask {sample.mask_path} marks no defect pixel (all black, or all transparent), yet its "
                        f"image {sample.path} is under test/{sample.defect_type}: mark the defect in white, or, if "
                        f"the part shows none, move the image to test/{GOOD} and remove the mask")
    if no_background:
        raise DataError(f"mask {sample.mask_path} has no black pixel, so every pixel of {sample.path} would be "
                        "defect, yet the mask holds more than one value (drawn in colour on a white canvas, or "
                        "saved inverted?): draw the defect in white or any colour on black")
    return resize_mask(Image.fromarray(defect), size)


def load_masks(samples: Sequence[Sample], size: int, workers: int | None = None) -> np.ndarray:
    """Ground-truth masks as bool [N, size, size], in sample order; good samples are all False.

    Before resizing, each mask's size is compared with its image's original
    size (both EXIF-upright): a mismatch means the mask belongs to another
    image or was resized, and resizing both to ``size`` would hide it.
    """
    _check_size(size)
    out = np.zeros((len(samples), size, size), dtype=bool)

    def one(i: int) -> None:
        s = samples[i]
        if s.is_defective:
            out[i] = _load_mask(s, size)

    _map_ordered(one, len(samples), workers)
    return out
