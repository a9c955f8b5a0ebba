"""Upload bytes -> the model input, with the limits a public endpoint needs.

Order matters, cheapest and safest check first:

1. byte limit (413) before Pillow sees anything;
2. ``Image.open`` reads only the header: format (415 unless PNG/JPEG/BMP/TIFF/WEBP) and
   size, so a decompression bomb (a tiny PNG claiming 100000 x 100000) is refused (413)
   before a single pixel buffer is allocated;
3. full decode (422 if truncated or corrupt);
4. EXIF orientation and mode conversion through :mod:`models.preprocessing`, the very
   functions the trainer uses, so the served pixels are exactly the trained ones.

:func:`read_uploads` takes the image parts off the HTTP request under the byte limits.
:func:`decode_into` fills the decode fields of an image's record
(:class:`~service.pipeline.item.InspectedImage`); it blocks (decode and Lanczos release the
GIL): the runtime calls it in its thread pool, never on the event loop.
"""

from __future__ import annotations

import io
import struct
import time
import warnings
from dataclasses import dataclass

import numpy as np
from PIL import Image

from models.preprocessing import resize_rgb, to_rgb
from service.pipeline.item import InspectedImage

# Pillow's names; "MPO" is the multi-picture JPEG many cameras write.
ACCEPTED_FORMATS: frozenset[str] = frozenset({"PNG", "JPEG", "MPO", "BMP", "TIFF", "WEBP"})


class ImageRejected(ValueError):
    """An upload the service refuses; carries the HTTP status and a stable error code."""

    status_code = 400
    code = "bad_image"

    def __init__(self, message: str, details: dict[str, object] | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.details = details


class ImageTooLarge(ImageRejected):
    status_code = 413
    code = "image_too_large"


class UnsupportedImageType(ImageRejected):
    status_code = 415
    code = "unsupported_media_type"


class UndecodableImage(ImageRejected):
    status_code = 422
    code = "undecodable_image"


class RequestTooLarge(ImageRejected):
    status_code = 413
    code = "request_too_large"


class TooManyFiles(ImageRejected):
    status_code = 413
    code = "too_many_files"


class BadUpload(ImageRejected):
    status_code = 400
    code = "bad_upload"


@dataclass(frozen=True)
class ImageLimits:
    max_bytes: int
    max_pixels: int


def configure_pillow(max_pixels: int) -> None:
    """Make Pillow's own bomb guard agree with the service limit.

    Pillow raises ``DecompressionBombError`` above twice ``MAX_IMAGE_PIXELS`` and warns above
    it; the service refuses everything above ``max_pixels`` itself, so the warning in between
    would only be noise (and a ``warnings`` filter per call is not thread-safe).
    """
    Image.MAX_IMAGE_PIXELS = int(max_pixels)
    warnings.filterwarnings("ignore", category=Image.DecompressionBombWarning)


def decode_image(data: bytes, size: int, limits: ImageLimits, name: str | None = None) -> InspectedImage:
    """A new record for ``data``, decoded (:func:`decode_into`)."""
    item = InspectedImage(index=0, filename=name, data=data)
    decode_into(item, size, limits)
    return item


def decode_into(item: InspectedImage, size: int, limits: ImageLimits) -> None:
    """Decode ``item.data``: fill the upright RGB image (``rgb``, original size: heatmap_size=
    original and overlays need it), the ``size x size`` model input (``tensor``), ``format``
    and ``decode_ms``.

    Raises :class:`ImageTooLarge` (413), :class:`UnsupportedImageType` (415) or
    :class:`UndecodableImage` (422); the message names the upload.
    """
    started = time.perf_counter()
    data, name = item.data, item.filename
    label = f"{name!r}" if name else "the image"
    if len(data) > limits.max_bytes:
        raise ImageTooLarge(f"{label} has {len(data)} bytes; the limit is {limits.max_bytes}")
    if not data:
        raise UndecodableImage(f"{label} is empty")
    try:
        img = Image.open(io.BytesIO(data))  # header only: no pixel buffer yet
    except Image.DecompressionBombError as exc:
        raise ImageTooLarge(f"{label} has too many pixels (limit {limits.max_pixels}): {exc}") from exc
    except Image.UnidentifiedImageError as exc:
        raise UnsupportedImageType(f"{label} is not an image in a supported format "
                                   f"({', '.join(sorted(ACCEPTED_FORMATS - {'MPO'}))})") from exc
    except (OSError, SyntaxError, ValueError, EOFError) as exc:
        raise UndecodableImage(f"cannot read {label}: {exc}") from exc
    with img:
        fmt = img.format or "?"
        if fmt not in ACCEPTED_FORMATS:
            raise UnsupportedImageType(f"{label} is {fmt}; accepted: {', '.join(sorted(ACCEPTED_FORMATS - {'MPO'}))}")
        width, height = img.size
        if width * height > limits.max_pixels:
            raise ImageTooLarge(f"{label} is {width}x{height} = {width * height} pixels; "
                                f"the limit is {limits.max_pixels}")
        if width <= 0 or height <= 0:
            raise UndecodableImage(f"{label} has an empty size {width}x{height}")
        try:
            img.load()
            # to_rgb applies EXIF orientation and converts any mode exactly as the trainer does.
            rgb = to_rgb(img)
            rgb.load()
        except Image.DecompressionBombError as exc:
            raise ImageTooLarge(f"{label} has too many pixels: {exc}") from exc
        except (OSError, SyntaxError, ValueError, EOFError, struct.error) as exc:
            # struct.error: some Pillow plugins surface corrupt headers that way.
            raise UndecodableImage(f"cannot decode {label} (truncated or corrupt?): {exc}") from exc
    item.rgb, item.tensor, item.format = rgb, resize_rgb(rgb, size), fmt
    item.decode_ms = (time.perf_counter() - started) * 1e3


def probe_image(data: bytes, limits: ImageLimits, name: str | None = None) -> tuple[str, tuple[int, int]]:
    """The cheap half of :func:`decode_image`: byte limit, format and pixel count from the
    header alone (no pixel buffer). Used where an upload is accepted now and decoded later
    (async jobs); a corrupt body past the header is only found by the full decode."""
    label = f"{name!r}" if name else "the image"
    if len(data) > limits.max_bytes:
        raise ImageTooLarge(f"{label} has {len(data)} bytes; the limit is {limits.max_bytes}")
    if not data:
        raise UndecodableImage(f"{label} is empty")
    try:
        with Image.open(io.BytesIO(data)) as img:
            fmt, (width, height) = img.format or "?", img.size
    except Image.DecompressionBombError as exc:
        raise ImageTooLarge(f"{label} has too many pixels (limit {limits.max_pixels}): {exc}") from exc
    except Image.UnidentifiedImageError as exc:
        raise UnsupportedImageType(f"{label} is not an image in a supported format "
                                   f"({', '.join(sorted(ACCEPTED_FORMATS - {'MPO'}))})") from exc
    except (OSError, SyntaxError, ValueError, EOFError, struct.error) as exc:
        raise UndecodableImage(f"cannot read {label}: {exc}") from exc
    if fmt not in ACCEPTED_FORMATS:
        raise UnsupportedImageType(f"{label} is {fmt}; accepted: {', '.join(sorted(ACCEPTED_FORMATS - {'MPO'}))}")
    if width * height > limits.max_pixels:
        raise ImageTooLarge(f"{label} is {width}x{height} = {width * height} pixels; the limit is {limits.max_pixels}")
    if width <= 0 or height <= 0:
        raise UndecodableImage(f"{label} has an empty size {width}x{height}")
    return fmt, (width, height)


def model_input(img: Image.Image, size: int) -> np.ndarray:
    """The model input for an already decoded upright RGB image (used when a reload changes
    the input size while a request waits)."""
    return resize_rgb(img, size)
