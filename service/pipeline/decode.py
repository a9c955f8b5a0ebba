"""Upload bytes -> the model input, with the limits a public endpoint needs.

Order matters, cheapest and safest check first:

1. byte limit (413) before Pillow sees anything, and the framing: a PNG or JPEG made of more
   chunks or segments than its size justifies is refused (422) before Pillow walks them, as is
   a run-length BMP past what Pillow's Python decoder may take (:mod:`models.image_framing`);
2. :func:`probe_into`: ``Image.open`` reads only the header: format (415 unless
   PNG/JPEG/BMP/TIFF/WEBP) and size, so a decompression bomb (a tiny PNG claiming
   100000 x 100000) is refused (413) before a single pixel buffer is allocated; and the
   image is priced in the pixels it will hold (:mod:`service.pipeline.admission`), so the
   runtime admits or refuses the whole request before anything is decoded;
3. :func:`decode_into`: the decode, at reduced scale where the format allows (JPEG DCT
   scaling, :func:`models.preprocessing.reduce_while_decoding`), 422 if truncated or corrupt;
   a plain 8-bit RGB PNG is decoded by libspng, its pixel stream inflated by ISA-L
   (:mod:`service.pipeline.plain_png`), the same lossless pixels in a third of Pillow's time;
4. EXIF orientation and mode conversion through :mod:`models.preprocessing`, the very
   functions the trainer uses, so the served pixels are exactly the trained ones. Only the
   model input (and, for original-size overlays, a display copy at most
   ``max_heatmap_pixels``) outlives the decode.

Both block (decode and Lanczos release the GIL): the runtime calls them in its thread pool,
or on the event loop for a small request, where a thread hand-off costs more than the work
(:mod:`service.pipeline.placement`). The HTTP layer reads the bytes (``service.api.uploads``).
"""

from __future__ import annotations

import contextlib
import io
import math
import re
import struct
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Literal

from PIL import Image

from models.image_acceptance import ACCEPTED_FORMAT_NAMES, ACCEPTED_FORMATS, IMAGE_TOO_LARGE
from models.image_acceptance import MAX_PNG_TEXT_BYTES as MAX_PNG_TEXT_BYTES  # re-exported: placement, tests
from models.image_acceptance import UNDECODABLE_IMAGE, UNSUPPORTED_MEDIA_TYPE
from models.image_acceptance import configure_pillow as configure_pillow  # re-exported: the runtime calls it
from models.image_framing import jpeg_multi_scan, over_budget
from models.preprocessing import draft_size, header_oriented_size, reduce_while_decoding, resize_rgb, to_rgb
from service.pipeline.admission import image_cost
from service.pipeline.decode_memory import PRICED_PIXEL_BYTES, decode_weight, jpeg_coefficient_bytes
from service.pipeline.item import InspectedImage
from service.pipeline.plain_png import decode_plain_png

# The accepted formats, the PNG text budget and Pillow's guards are the trainer's too: they
# live in models.image_acceptance, which the trainer reads its images through.
_FORMAT_LIST = ACCEPTED_FORMAT_NAMES


class ImageRejected(ValueError):
    """An upload the service refuses; carries the HTTP status and a stable error code."""

    status_code = 400
    code = "bad_image"

    def __init__(self, message: str, details: dict[str, object] | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.details = details


class ImageTooLarge(ImageRejected):
    status_code = IMAGE_TOO_LARGE.status
    code = IMAGE_TOO_LARGE.code


class UnsupportedImageType(ImageRejected):
    status_code = UNSUPPORTED_MEDIA_TYPE.status
    code = UNSUPPORTED_MEDIA_TYPE.code


class UndecodableImage(ImageRejected):
    status_code = UNDECODABLE_IMAGE.status
    code = UNDECODABLE_IMAGE.code


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
    max_heatmap_pixels: int = 4 * 1024 * 1024  # original-size heatmaps above this are rendered at it


@dataclass(frozen=True)
class Rendering:
    """What a request will render per image, so that the probe can price it: the heatmap
    (``None``: none), at the model's size or the upload's (capped), over the image or not."""

    heatmap: Literal["model", "original"] | None = None
    overlay: bool = False


def fit_within(size: tuple[int, int], max_pixels: int) -> tuple[int, int]:
    """``size`` scaled down (aspect kept) to at most ``max_pixels``; unchanged when it fits."""
    width, height = size
    if width * height <= max_pixels:
        return width, height
    scale = math.sqrt(max_pixels / (width * height))
    return max(1, int(width * scale)), max(1, int(height * scale))


def _label(name: str | None) -> str:
    return f"{name!r}" if name else "the image"


def _too_many_pixels(label: str, max_pixels: int, size: tuple[int, int] | None,
                     bomb: Image.DecompressionBombError | None = None) -> ImageTooLarge:
    """The 413 in the service's words and limit only: Pillow's own text names its guard's
    limit (twice ours, :func:`configure_pillow`), which no client can act on."""
    if size is not None:
        what = f"is {size[0]}x{size[1]} = {size[0] * size[1]:,} pixels"
    elif bomb is not None and (found := re.search(r"\((\d+) pixels\)", str(bomb))):
        what = f"has {int(found.group(1)):,} pixels"
    else:
        what = "has too many pixels"
    return ImageTooLarge(f"{label} {what}; at most {max_pixels:,} per image (MSFLOW_MAX_IMAGE_PIXELS)")


def _claimed_size(data: bytes) -> tuple[int, int] | None:
    """The size the header claims, read by the accepted formats' own Pillow plugins without
    the bomb check that made ``Image.open`` refuse it (for the message only; None if none can)."""
    prefix = data[:16]
    for fmt in ("PNG", "JPEG", "BMP", "TIFF", "WEBP"):
        factory, accept = Image.OPEN.get(fmt, (None, None))
        if factory is None or (accept is not None and not accept(prefix)):
            continue
        try:
            with factory(io.BytesIO(data), "") as img:  # header only, as Image.open reads it
                return img.size
        except Exception:  # noqa: BLE001 - the next plugin, or no size in the message
            continue
    return None


@contextlib.contextmanager
def _opened(data: bytes, limits: ImageLimits, name: str | None) -> Iterator[Image.Image]:
    """The upload opened from its header (no pixel buffer yet), after every check the header
    allows: bytes, format, pixel count."""
    label = _label(name)
    if len(data) > limits.max_bytes:
        raise ImageTooLarge(f"{label} has {len(data)} bytes; the limit is {limits.max_bytes}")
    if not data:
        raise UndecodableImage(f"{label} is empty")
    try:
        img = Image.open(io.BytesIO(data))  # header only: no pixel buffer yet
    except Image.DecompressionBombError as exc:  # over twice the limit: Pillow refuses it at the header
        raise _too_many_pixels(label, limits.max_pixels, _claimed_size(data), exc) from exc
    except Image.UnidentifiedImageError as exc:
        raise UnsupportedImageType(f"{label} is not an image in a supported format ({_FORMAT_LIST})") from exc
    except (OSError, SyntaxError, ValueError, EOFError, struct.error) as exc:
        raise UndecodableImage(f"cannot read {label}: {exc}") from exc
    with img:
        fmt = img.format or "?"
        if fmt not in ACCEPTED_FORMATS:
            raise UnsupportedImageType(f"{label} is {fmt}; accepted: {_FORMAT_LIST}")
        width, height = img.size
        if width * height > limits.max_pixels:
            raise _too_many_pixels(label, limits.max_pixels, (width, height))
        if width <= 0 or height <= 0:
            raise UndecodableImage(f"{label} has an empty size {width}x{height}")
        yield img


def probe_into(item: InspectedImage, size: int, limits: ImageLimits, rendering: Rendering = Rendering()) -> None:
    """The header half of decoding: check the upload (bytes, format, pixels) and fill
    ``format``, the upright ``width``/``height``, the heatmap size to render, and ``cost``
    (the pixels the pipeline will hold for it: :func:`~service.pipeline.admission.image_cost`,
    the decode's weighted by what its format and mode hold: :mod:`service.pipeline.decode_memory`),
    without allocating a pixel buffer. Cheap: admission runs it for every image first.
    The framing is counted before Pillow opens the file (:mod:`models.image_framing`:
    422 past its budget), here only: a record is decoded only once probed."""
    if len(item.data) <= limits.max_bytes and (why := over_budget(item.data)) is not None:
        raise UndecodableImage(f"{_label(item.filename)} {why}")
    with _opened(item.data, limits, item.filename) as img:
        item.format = img.format or "?"
        # JPEG: its scans, not its pixels, bound the decode; and libjpeg gathers such a file
        # whole, as coefficients at its stored size, whatever the DCT scaling
        item.progressive = bool(img.info.get("progressive")) or jpeg_multi_scan(item.data)
        held = math.ceil(jpeg_coefficient_bytes(img) / PRICED_PIXEL_BYTES) if item.progressive else 0
        weight = decode_weight(item.format, img.mode)  # what its mode holds beside the RGB decode
        item.width, item.height = header_oriented_size(img)
        stored = img.size
        decoded = reduce_while_decoding(img, size)  # the size the model decode will produce
    rendered: tuple[int, int] | None = None
    display: tuple[int, int] | None = None
    redecode: tuple[int, int] | None = None
    if rendering.heatmap == "model":
        rendered = (size, size)
    elif rendering.heatmap == "original":
        rendered = fit_within((item.width, item.height), limits.max_heatmap_pixels)
        if rendering.overlay:
            display = rendered
            # A JPEG decoded small for the model would make a blurred background: decode it a
            # second time, scaled only as far as the rendered overlay allows.
            if decoded != stored and min(decoded) < max(rendered):
                redecode = draft_size(item.format, stored, max(rendered))
    item.render_size, item.display_size, item.redecode_size = rendered, display, redecode
    item.cost = image_cost(decoded, display, size, rendered, redecode, weight=weight, held=held).total


def decode_image(data: bytes, size: int, limits: ImageLimits, name: str | None = None,
                 rendering: Rendering = Rendering()) -> InspectedImage:
    """A new record for ``data``, probed and decoded (:func:`decode_into`)."""
    item = InspectedImage(index=0, filename=name, data=data)
    probe_into(item, size, limits, rendering)
    decode_into(item, size, limits)
    return item


def decode_into(item: InspectedImage, size: int, limits: ImageLimits) -> None:
    """Decode a probed record (:func:`probe_into`): fill the ``size x size`` model input
    (``tensor``), the display copy an original-size overlay needs (``display``) and
    ``decode_ms``. The full-size decode is dropped before returning: only what later
    stages read stays in memory.

    Raises :class:`ImageTooLarge` (413), :class:`UnsupportedImageType` (415) or
    :class:`UndecodableImage` (422); the message names the upload.
    """
    started = time.perf_counter()
    with _opened(item.data, limits, item.filename) as img:
        reduce_while_decoding(img, size)  # the same call as the trainer's (models.preprocessing)
        plain = decode_plain_png(img, item.data)
        if plain is not None and plain.shape == (size, size, 3) and item.display_size is None:
            item.tensor = plain  # upright RGB at the model's size already: nothing to convert, resize or copy
        else:
            # libspng's pixels are upright RGB already (decode_plain_png); Pillow's go through to_rgb
            rgb = Image.fromarray(plain) if plain is not None else _load_rgb(img, item.filename, limits.max_pixels)
            del plain
            if rgb.size == (item.height, item.width) != (item.width, item.height):
                _rotated_by_late_exif(item)
            item.tensor = resize_rgb(rgb, size)
            if item.display_size is not None and item.redecode_size is None:
                item.display = rgb.resize(item.display_size, Image.Resampling.BILINEAR, reducing_gap=2.0)
            del rgb
    if item.display_size is not None and item.redecode_size is not None:
        with _opened(item.data, limits, item.filename) as img:
            reduce_while_decoding(img, max(item.display_size))
            rgb = _load_rgb(img, item.filename, limits.max_pixels)
            item.display = rgb.resize(item.display_size, Image.Resampling.BILINEAR, reducing_gap=2.0)
            del rgb
    item.decode_ms = (time.perf_counter() - started) * 1e3


def _rotated_by_late_exif(item: InspectedImage) -> None:
    """The decode found an EXIF rotation the header did not show (a PNG's eXIf chunk after
    its pixels): the upright size and the sizes derived from it swap (same pixel count, so
    the admitted price holds)."""
    def swap(size: tuple[int, int] | None) -> tuple[int, int] | None:
        return None if size is None else (size[1], size[0])
    item.width, item.height = item.height, item.width
    item.render_size, item.display_size = swap(item.render_size), swap(item.display_size)


def _load_rgb(img: Image.Image, name: str | None, max_pixels: int) -> Image.Image:
    """Decode the pixels, upright 8-bit RGB as the trainer converts them (:func:`to_rgb`).
    The result may be ``img`` itself: use it before the file closes."""
    try:
        img.load()
        rgb = to_rgb(img, copy=False)  # no full-size copy: resized before the file closes
        rgb.load()
        return rgb
    except Image.DecompressionBombError as exc:  # a frame larger than the header said
        raise _too_many_pixels(_label(name), max_pixels, None, exc) from exc
    except (OSError, SyntaxError, ValueError, EOFError, struct.error) as exc:
        # struct.error: some Pillow plugins surface corrupt headers that way.
        raise UndecodableImage(f"cannot decode {_label(name)} (truncated or corrupt?): {exc}") from exc


def probe_image(data: bytes, limits: ImageLimits, name: str | None = None) -> tuple[str, tuple[int, int]]:
    """Format and stored (width, height) after every header check (bytes, format, pixels), no
    pixel buffer. Used where an upload is accepted now and decoded later (async jobs); a
    corrupt body past the header is only found by the full decode."""
    with _opened(data, limits, name) as img:
        return img.format or "?", img.size
