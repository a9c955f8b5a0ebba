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
:func:`decode_image` blocks (decode and Lanczos release the GIL): the app calls it in its
thread pool, never on the event loop.
"""

from __future__ import annotations

import io
import struct
import time
import warnings
from collections.abc import AsyncIterator
from dataclasses import dataclass

import numpy as np
from PIL import Image
from starlette.datastructures import UploadFile as StarletteUploadFile
from starlette.formparsers import MultiPartException, MultiPartParser
from starlette.requests import Request

from models.preprocessing import resize_rgb, to_rgb

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


@dataclass(frozen=True)
class DecodedImage:
    """One upload, decoded. ``rgb`` is upright at its original size (heatmap_size=original and
    overlays need it); ``tensor`` is the model input, uint8 ``[S, S, 3]``."""

    rgb: Image.Image
    tensor: np.ndarray
    format: str
    decode_ms: float

    @property
    def size(self) -> tuple[int, int]:
        """(width, height) after EXIF orientation."""
        return self.rgb.size


@dataclass(frozen=True)
class Upload:
    """One image part of a request, as received."""

    filename: str | None
    data: bytes


FILE_FIELDS = ("file", "files")  # "files" too: a common client habit for several parts


async def read_uploads(request: Request, max_files: int, max_upload_bytes: int,
                       max_request_bytes: int) -> list[Upload]:
    """The images of a request: multipart ``file`` parts in order, or a raw ``image/*`` body.

    Limits are enforced while streaming (Content-Length can be absent or lie), so an
    oversized upload is cut off at the limit instead of being buffered first.
    """
    content_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
    declared = request.headers.get("content-length")
    if declared and declared.isdigit() and int(declared) > max_request_bytes:
        raise RequestTooLarge(f"request body of {declared} bytes exceeds the limit of {max_request_bytes}")
    if content_type == "multipart/form-data":
        return await _read_multipart(request, max_files, max_upload_bytes, max_request_bytes)
    if content_type.startswith("image/") or content_type == "application/octet-stream":
        limit = min(max_upload_bytes, max_request_bytes)
        if declared and declared.isdigit() and int(declared) > limit:
            raise ImageTooLarge(f"image of {declared} bytes exceeds the limit of {limit}")
        data = b"".join([chunk async for chunk in _limited(request, limit, "image")])
        name = request.headers.get("x-filename")
        return [Upload(filename=name[:255] if name else None, data=data)]
    raise UnsupportedImageType(
        f"send multipart/form-data with 'file' parts or a raw image body (Content-Type image/*), "
        f"not {content_type or 'no Content-Type'}")


async def _limited(request: Request, limit: int, what: str) -> AsyncIterator[bytes]:
    total = 0
    async for chunk in request.stream():
        total += len(chunk)
        if total > limit:
            cls = ImageTooLarge if what == "image" else RequestTooLarge
            raise cls(f"{what} exceeds the limit of {limit} bytes")
        yield chunk


async def _read_multipart(request: Request, max_files: int, max_upload_bytes: int,
                          max_request_bytes: int) -> list[Upload]:
    # Starlette's parser spools parts over 1 MB to disk; the stream limit bounds the total.
    # max_files + 1 lets "one too many" be reported as 413 too_many_files, not a parse error.
    parser = MultiPartParser(request.headers, _limited(request, max_request_bytes, "request body"),
                             max_files=max_files + 1, max_fields=64)
    try:
        form = await parser.parse()
    except MultiPartException as exc:
        if "too many files" in str(exc).lower():
            raise TooManyFiles(f"more than {max_files} files in one request") from exc
        raise BadUpload(f"malformed multipart body: {exc}") from exc
    try:
        parts = [(key, value) for key, value in form.multi_items()
                 if isinstance(value, StarletteUploadFile) and key in FILE_FIELDS]
        if not parts:
            raise BadUpload("no image in the request: send one or more multipart parts named 'file'")
        if len(parts) > max_files:
            raise TooManyFiles(f"{len(parts)} files in one request; the limit is {max_files}")
        uploads = []
        for index, (_, part) in enumerate(parts):
            if part.size is not None and part.size > max_upload_bytes:
                raise ImageTooLarge(f"{part.filename!r} has {part.size} bytes; the limit is {max_upload_bytes}",
                                    details={"index": index, "filename": part.filename})
            uploads.append(Upload(filename=part.filename, data=await part.read()))
        return uploads
    finally:
        await form.close()


def configure_pillow(max_pixels: int) -> None:
    """Make Pillow's own bomb guard agree with the service limit.

    Pillow raises ``DecompressionBombError`` above twice ``MAX_IMAGE_PIXELS`` and warns above
    it; the service refuses everything above ``max_pixels`` itself, so the warning in between
    would only be noise (and a ``warnings`` filter per call is not thread-safe).
    """
    Image.MAX_IMAGE_PIXELS = int(max_pixels)
    warnings.filterwarnings("ignore", category=Image.DecompressionBombWarning)


def decode_image(data: bytes, size: int, limits: ImageLimits, name: str | None = None) -> DecodedImage:
    """Decode ``data`` and return the upright RGB image plus the ``size x size`` model input.

    Raises :class:`ImageTooLarge` (413), :class:`UnsupportedImageType` (415) or
    :class:`UndecodableImage` (422); the message names the upload.
    """
    started = time.perf_counter()
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
    tensor = resize_rgb(rgb, size)
    return DecodedImage(rgb=rgb, tensor=tensor, format=fmt, decode_ms=(time.perf_counter() - started) * 1e3)


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


__all__ = [
    "ACCEPTED_FORMATS", "BadUpload", "RequestTooLarge", "TooManyFiles", "Upload", "read_uploads", "DecodedImage", "ImageLimits", "ImageRejected", "ImageTooLarge", "UndecodableImage",
    "UnsupportedImageType", "configure_pillow", "decode_image", "model_input", "probe_image",
]
