"""The one image preprocessing path shared by the trainer and the server.

Why one module: a model is only as good as the agreement between the pixels it
was trained on and the pixels it is served. Any drift (a different resampling
filter, a different 16-bit scaling, EXIF orientation applied on one side only)
silently shifts the feature distribution the flows learned and turns normal
parts into false alarms. The trainer (:func:`load_image`, read by
``models.data_loading``) and the service (``service.pipeline.decode``: the same
decode at reduced scale, :func:`to_rgb` and :func:`resize_rgb`, which is
:func:`resize_for_model` split where the server keeps the upright RGB image for
overlays) therefore go through this module and nothing else, and a test proves
they produce the same array.

What this module does *not* do: normalisation with the ImageNet statistics. That
happens inside the model graph (so the exported engine takes plain uint8 NHWC
input); the constants live here so there is exactly one copy of them.

Pipeline (matches the official MSFlow preprocessing, see MSFLOW_SPEC.md §1):
EXIF orientation -> 8-bit RGB -> PIL Lanczos resize to ``size x size``.

One addition, on both sides alike: a JPEG is decoded at reduced scale where the format
allows it (:func:`reduce_while_decoding`: libjpeg's DCT scaling by 1/2, 1/4 or 1/8, never
below the model's input size), then Lanczos-resized as before. A 2048 x 2048 photo for a
256 x 256 model is decoded as 256 x 256 directly: an eighth of the pixels in each direction,
a fraction of the memory and most of the CPU saved. Because the trainer reads its images
through the same function, train/serve parity holds exactly (a test compares the arrays).
"""

from __future__ import annotations

import io
import struct
from collections.abc import Callable
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps

from models.image_acceptance import (badly_framed, decode_refusal, empty_file, header_refusal, max_image_bytes,
                                     too_many_bytes, too_many_pixels, trainer_limit, unidentified)
from models.image_framing import over_budget

__all__ = [
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "ImageReadError",
    "to_rgb",
    "resize_for_model",
    "reduce_while_decoding",
    "draft_size",
    "open_image",
    "load_image",
    "resize_mask",
    "oriented_size",
    "header_oriented_size",
]

IMAGENET_MEAN: tuple[float, float, float] = (0.485, 0.456, 0.406)
IMAGENET_STD: tuple[float, float, float] = (0.229, 0.224, 0.225)

# Modes whose samples are unsigned 16-bit integers. Their true range is
# 0..65535, so they map to 8 bit by dropping the low byte (>> 8). Pillow's own
# convert("L") would *clip* at 255 instead, turning almost every real 16-bit
# camera frame into a white image.
_UINT16_MODES = frozenset({"I;16", "I;16L", "I;16B", "I;16N"})

# EXIF orientations that swap width and height (transpose, rotate 90/270, transverse).
_SWAPPING_ORIENTATIONS = frozenset({5, 6, 7, 8})
_EXIF_ORIENTATION_TAG = 0x0112


class ImageReadError(ValueError):
    """An image file could not be opened or decoded (missing, truncated, not an image).

    A ValueError so that callers validating user input can catch bad data with
    one clause; the message always names the file.
    """


# Formats whose decoder can scale while decoding (libjpeg DCT scaling); "MPO" is the
# multi-picture JPEG many cameras write.
_DRAFT_FORMATS = frozenset({"JPEG", "MPO"})


def _upright(img: Image.Image, copy: bool = True) -> Image.Image:
    """Apply EXIF orientation; a malformed EXIF block leaves the image as stored.

    Malformed metadata says nothing reliable about orientation, and a camera
    that writes broken EXIF must not take the inspection line down.
    ``copy=False``: an image needing no rotation is returned as is (the server's decode,
    which resizes before the file closes, saves a full-size copy that way).
    """
    if not copy and _orientation(img) in (None, 1):
        return img
    try:
        out = ImageOps.exif_transpose(img)
    except (ValueError, SyntaxError, struct.error, KeyError, TypeError, OSError):
        return img.copy() if copy else img
    if out is None:
        return img.copy() if copy else img
    return out


def _orientation(img: Image.Image) -> int | None:
    try:
        return int(img.getexif().get(_EXIF_ORIENTATION_TAG, 1))
    except Exception:  # malformed EXIF: exif_transpose decides (and falls back to as stored)
        return None


def reduce_while_decoding(img: Image.Image, size: int) -> tuple[int, int]:
    """Before ``img.load()``: let the decoder scale down by 1/2, 1/4 or 1/8 where the format
    can (JPEG), to the smallest size still at least ``size`` on both sides. Returns the
    stored (width, height) the decode will produce; other formats decode at full size.

    Both sides (trainer and server) call this before loading, so both feed the same pixels to
    the same Lanczos resize. The request is square, so EXIF rotation applied afterwards
    changes nothing about the choice.
    """
    if draft_size(img.format, img.size, size) != img.size:
        img.draft(None, (int(size), int(size)))  # mode None: keep the stored mode (no YCbCr/L games)
    return img.size


def draft_size(fmt: str | None, stored: tuple[int, int], size: int) -> tuple[int, int]:
    """The (width, height) :func:`reduce_while_decoding` decodes a ``stored``-size image of
    format ``fmt`` to, from the header alone (libjpeg's rule, as Pillow applies it: the
    largest of 1/8, 1/4, 1/2 that keeps both sides at least ``size``)."""
    if fmt not in _DRAFT_FORMATS or size <= 0:
        return stored
    width, height = stored
    fit = min(width // size, height // size)
    scale = next(s for s in (8, 4, 2, 1) if fit >= s or s == 1)
    return (width + scale - 1) // scale, (height + scale - 1) // scale


def _gray_to_rgb(gray: np.ndarray) -> Image.Image:
    """Replicate an 8-bit HxW array to three channels (official MSFlow does the same)."""
    return Image.fromarray(np.ascontiguousarray(gray, dtype=np.uint8), mode="L").convert("RGB")


# The numeric modes (16-bit, 32-bit integer, float) are mapped to 8 bits a band of rows at a
# time: on the whole image, np.asarray copied it through tobytes() (twice its size at the join)
# and the int64/float64 steps made three more copies of 8 bytes a pixel, so a 39-megapixel
# float TIFF peaked at 27 bytes a pixel (1 GB) for an 8-bit result. Each band goes through the
# very same expressions, element by element, so the result is the same bits.
_BAND_PIXELS = 1 << 18


def _gray8_by_bands(img: Image.Image, to_gray8: Callable[[np.ndarray], np.ndarray]) -> np.ndarray:
    width, height = img.size
    out = np.empty((height, width), dtype=np.uint8)
    rows = max(1, _BAND_PIXELS // max(1, width))
    for top in range(0, height, rows):
        bottom = min(height, top + rows)
        out[top:bottom] = to_gray8(np.asarray(img.crop((0, top, width, bottom))))
    return out


def _uint16_to_gray8(arr: np.ndarray) -> np.ndarray:
    return (arr.astype(np.uint16, copy=False) >> 8).astype(np.uint8)


def _int32_to_gray8(arr: np.ndarray) -> np.ndarray:
    return (np.clip(arr.astype(np.int64), 0, 65535) >> 8).astype(np.uint8)


def _float_to_gray8(arr: np.ndarray) -> np.ndarray:
    arr = np.nan_to_num(arr.astype(np.float64), nan=0.0, posinf=255.0, neginf=0.0)
    return np.clip(np.rint(arr), 0, 255).astype(np.uint8)


def to_rgb(img: Image.Image, *, copy: bool = True) -> Image.Image:
    """Apply EXIF orientation and convert any Pillow mode to 8-bit RGB.

    Why each rule:

    * EXIF orientation is applied first because cameras and phones store the
      sensor buffer plus a rotation tag; the part is only upright after applying it.
    * Alpha (``RGBA``, ``LA``, ``PA``, ``P`` with transparency) is **dropped**, not
      composited: the colour channels are what the camera measured, and dropping
      is what ``Image.convert("RGB")`` in the official MSFlow loader does, so
      checkpoints trained with it see the same pixels.
    * 16-bit unsigned modes (``I;16``, ``I;16B``, ...) are scaled by their true
      range (value >> 8, so 65535 -> 255) instead of clipped.
    * Mode ``I`` (32-bit signed) is the container Pillow uses for 16-bit PNG and
      TIFF data, so it is treated as unsigned 16-bit: clipped to 0..65535, then
      >> 8. A fixed mapping (never per-image min/max stretching) keeps the same
      physical brightness at the same value across images, which anomaly
      detection depends on.
    * Mode ``F`` (32-bit float) has no intrinsic range; it follows Pillow's
      convention of the 0..255 scale: rounded and clipped to 0..255.
    * ``1`` (bilevel) maps to 0/255; ``CMYK``, ``YCbCr`` and other colour modes use
      Pillow's converters.

    Returns a new image; the input is never modified. ``copy=False`` may return ``img``
    itself when it already is upright RGB (the caller must not close it while using the result).
    """
    img = _upright(img, copy=copy)
    mode = img.mode
    if mode == "RGB":
        return img
    if mode in _UINT16_MODES:
        return _gray_to_rgb(_gray8_by_bands(img, _uint16_to_gray8))
    if mode in ("I", "I;32", "I;32L", "I;32B"):
        return _gray_to_rgb(_gray8_by_bands(img, _int32_to_gray8))
    if mode == "F":
        return _gray_to_rgb(_gray8_by_bands(img, _float_to_gray8))
    if mode in ("P", "PA"):
        # Through RGBA so palette transparency (given as bytes or an index) is
        # parsed by Pillow without warnings, then dropped like any other alpha.
        return img.convert("RGBA").convert("RGB")
    if mode == "RGBa":  # premultiplied alpha: un-premultiply first, then drop
        return img.convert("RGBA").convert("RGB")
    if mode in ("L", "LA", "La", "1", "RGBA", "RGBX", "CMYK", "YCbCr", "HSV"):
        return img.convert("RGB")
    try:
        return img.convert("RGB")
    except (ValueError, OSError) as exc:
        raise ValueError(f"unsupported image mode {mode!r}") from exc


def resize_for_model(img: Image.Image, size: int) -> np.ndarray:
    """Return the model input for ``img``: uint8 array of shape (size, size, 3), C-contiguous.

    RGB conversion (:func:`to_rgb`), then a PIL Lanczos resize to a square, which
    is the official MSFlow preprocessing. Aspect ratio is not preserved, again as
    in the paper's pipeline; inspection cameras are set up to frame the part.
    Normalisation is left to the model graph so that the same uint8 array can be
    fed to every engine.
    """
    return resize_rgb(to_rgb(img), size)


def resize_rgb(rgb: Image.Image, size: int) -> np.ndarray:
    """:func:`resize_for_model` for an image that :func:`to_rgb` already made upright RGB
    (the server keeps that image for overlays, so it converts once, not twice)."""
    if not isinstance(size, (int, np.integer)) or isinstance(size, bool) or size <= 0:
        raise ValueError(f"size must be a positive integer, got {size!r}")
    if rgb.mode != "RGB":
        raise ValueError(f"resize_rgb takes an RGB image (see to_rgb), got mode {rgb.mode!r}")
    if rgb.size != (size, size):
        rgb = rgb.resize((int(size), int(size)), Image.Resampling.LANCZOS)
    return np.ascontiguousarray(np.asarray(rgb, dtype=np.uint8))


def open_image(path: str | Path, size: int | None = None) -> Image.Image:
    """Open and fully decode an image file, upright (EXIF applied); :class:`ImageReadError` on failure.
    ``size``: the model input size it is read for; a JPEG is then decoded at reduced scale
    (:func:`reduce_while_decoding`), exactly as the server decodes it.

    Only what the server accepts is read (:mod:`models.image_acceptance`: the format by
    content, this process's pixel limit from the header before any pixel buffer, at most
    1 MiB of PNG text, the framing budget of :mod:`models.image_framing`, no empty file);
    anything else is refused in a message naming the file and the server's answer to it.

    Pillow opens lazily, so a truncated file only fails at ``load()``; decoding
    here means the error surfaces with the file name at read time instead of
    deep inside a resize. Pillow's ``LOAD_TRUNCATED_IMAGES`` is deliberately not
    enabled: a half-grey truncated photo must not become a "normal" training image.
    """
    p = Path(path)
    max_pixels = trainer_limit()
    try:
        if (file_bytes := p.stat().st_size) > max_image_bytes():  # before a byte is read, as the server's upload
            raise ImageReadError(too_many_bytes(p, file_bytes, max_image_bytes()))
        data = p.read_bytes()  # the server's framing checks read the whole upload; at most max_image_bytes
        if not data:
            raise ImageReadError(empty_file(p))
        if (why := over_budget(data)) is not None:
            raise ImageReadError(badly_framed(p, why))
        with Image.open(io.BytesIO(data)) as im:
            if (refused := header_refusal(im, p, max_pixels)) is not None:
                raise ImageReadError(refused)
            if size is not None:
                reduce_while_decoding(im, size)
            im.load()
            # exif_transpose returns a new image detached from the file handle,
            # upright and with the orientation tag removed (so to_rgb's own
            # transpose is a no-op and orientation is never applied twice).
            upright = _upright(im)
            upright.load()
            return upright
    except ImageReadError:
        raise
    except FileNotFoundError as exc:
        raise ImageReadError(f"image file not found: {p}") from exc
    except IsADirectoryError as exc:
        raise ImageReadError(f"not an image file (a directory): {p}") from exc
    except Image.DecompressionBombError as exc:  # over twice the limit: Pillow refuses it at the header
        raise ImageReadError(too_many_pixels(p, max_pixels, f"over {2 * max_pixels:,} pixels")) from exc
    except Image.UnidentifiedImageError as exc:
        raise ImageReadError(unidentified(p)) from exc
    except (OSError, SyntaxError, ValueError, EOFError, struct.error) as exc:
        raise ImageReadError(decode_refusal(p, exc)) from exc


def load_image(path: str | Path, size: int) -> np.ndarray:
    """Read an image file and return the model input (see :func:`resize_for_model`)."""
    img = open_image(path, size)
    try:
        return resize_for_model(img, size)
    except ValueError as exc:
        if isinstance(exc, ImageReadError):
            raise
        raise ImageReadError(decode_refusal(Path(path), exc)) from exc


def resize_mask(mask: Image.Image, size: int) -> np.ndarray:
    """Return a boolean (size, size) ground-truth mask: nearest-neighbour resize, then ``> 0``.

    Nearest neighbour (as in the official code) keeps the mask binary; any
    non-zero grey level counts as defective, so 0/1 and 0/255 masks both work.
    EXIF orientation is applied for symmetry with :func:`to_rgb`.
    """
    if not isinstance(size, (int, np.integer)) or isinstance(size, bool) or size <= 0:
        raise ValueError(f"size must be a positive integer, got {size!r}")
    m = _upright(mask)
    if m.mode in _UINT16_MODES or m.mode.startswith("I") or m.mode == "F":
        # Pillow clips these when converting to L, but "> 0" is all we need, so
        # threshold in full precision to not lose e.g. negative floats.
        binary = np.asarray(m).astype(np.float64) > 0
        m = Image.fromarray((binary * 255).astype(np.uint8), mode="L")
    elif m.mode != "L":
        m = m.convert("L")
    if m.size != (size, size):
        m = m.resize((int(size), int(size)), Image.Resampling.NEAREST)
    return np.ascontiguousarray(np.asarray(m) > 0)


def header_oriented_size(img: Image.Image) -> tuple[int, int]:
    """:func:`oriented_size` from what the header holds, never decoding: a PNG's ``getexif()``
    decodes the whole image to look for an eXIf chunk after the pixel data, which a server
    pricing a 40-megapixel upload before admitting it cannot afford. Such a late chunk (rare)
    shows only after the decode, which then corrects the size."""
    if img.format == "PNG" and "exif" not in img.info:
        return img.size
    return oriented_size(img)


def oriented_size(img: Image.Image) -> tuple[int, int]:
    """(width, height) of ``img`` after EXIF orientation, without decoding pixels.

    Used to compare an image with its mask before resizing: both are compared
    in the orientation the pixels are used in.
    """
    w, h = img.size
    try:
        orientation = img.getexif().get(_EXIF_ORIENTATION_TAG, 1)
    except Exception:  # malformed EXIF: treated as upright, exactly like _upright()
        orientation = 1
    if orientation in _SWAPPING_ORIENTATIONS:
        return h, w
    return w, h
