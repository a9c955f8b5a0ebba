"""Which image files msflow accepts: the server's rules, shared with the trainer.

Why here, in ``models``: a model trained or calibrated on images the server refuses is a
silent mismatch (its threshold set on normals the line can never send, learnt only in
production), so the trainer reads exactly what the server accepts. The server
(``service.pipeline.decode``) imports these rules from here, as it imports
:mod:`models.preprocessing`; ``models`` never imports ``service`` (docs/DESIGN.md, "Import
contracts"). The server applies them to an upload's header in its own probe (its per-image
path is benchmarked); the trainer through :func:`header_refusal` and :func:`decode_refusal`,
whose messages name the file and the answer the server would give.

The rules, cheapest first, all from the header but the last:

* the format, by content, not by name: PNG, JPEG (and MPO, the multi-picture JPEG cameras
  write), BMP, TIFF, WEBP; else 415 ``unsupported_media_type`` (a GIF renamed ``.png`` too);
* at most ``max_pixels`` (width x height, the stored size) per image, the server's
  ``MSFLOW_MAX_IMAGE_PIXELS`` (:data:`DEFAULT_MAX_IMAGE_PIXELS` unless configured), checked
  before a pixel buffer exists; else 413 ``image_too_large``;
* an empty file, or a PNG, JPEG or TIFF framed in more chunks, segments, scans, tags or
  strips than its size justifies, or a run-length compressed BMP larger than Pillow's Python
  decoder may take (:mod:`models.image_framing`, counted before any decoder walks them), is
  422 ``undecodable_image``, as is a decode that fails (truncated, corrupt, more than
  :data:`MAX_PNG_TEXT_BYTES` of PNG text).

Pillow's own guards are process-wide; :func:`configure_pillow` sets them to agree with these
rules, once per process (the server at start, ``msflow train`` with its
``--max-image-pixels``), and the trainer re-applies them if something else changed them.
"""

from __future__ import annotations

import threading
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from PIL import Image

# Pillow is imported where it is used, not here: the command line reads the default limit
# below for `msflow --help`, which must not pay 50 ms for Pillow's plugins.

__all__ = [
    "ACCEPTED_FORMATS",
    "ACCEPTED_FORMAT_NAMES",
    "DEFAULT_MAX_IMAGE_BYTES",
    "DEFAULT_MAX_IMAGE_PIXELS",
    "MAX_PNG_TEXT_BYTES",
    "ServerAnswer",
    "UNSUPPORTED_MEDIA_TYPE",
    "IMAGE_TOO_LARGE",
    "UNDECODABLE_IMAGE",
    "configure_pillow",
    "max_image_bytes",
    "max_image_pixels",
    "set_max_image_bytes",
    "trainer_limit",
    "header_refusal",
    "too_many_bytes",
    "too_many_pixels",
    "unidentified",
    "decode_refusal",
    "empty_file",
    "badly_framed",
]

# Pillow's names; "MPO" is the multi-picture JPEG many cameras write.
ACCEPTED_FORMATS: frozenset[str] = frozenset({"PNG", "JPEG", "MPO", "BMP", "TIFF", "WEBP"})
ACCEPTED_FORMAT_NAMES = ", ".join(sorted(ACCEPTED_FORMATS - {"MPO"}))
# The server's default MSFLOW_MAX_IMAGE_PIXELS (service.config reads it from here).
DEFAULT_MAX_IMAGE_PIXELS = 40_000_000
# The server's default MSFLOW_MAX_UPLOAD_BYTES, one image's file (service.config reads it from
# here): an uncompressed camera TIFF past it trained and was then refused by the line's server.
DEFAULT_MAX_IMAGE_BYTES = 20 * 1024 * 1024
# PNG text (tEXt, zTXt, iTXt) Pillow may hold for one image, decompressed: Pillow's default
# (64 MiB) let a 1.5 MB upload of small zTXt chunks cost 64 MiB and a third of a second
# before any pixel (docs/performance-log.md); cameras write kilobytes (EXIF, XMP).
MAX_PNG_TEXT_BYTES = 1 << 20


@dataclass(frozen=True)
class ServerAnswer:
    """An HTTP answer the server gives an image it refuses (its error classes carry these)."""

    status: int
    code: str

    def __str__(self) -> str:
        return f"{self.status} {self.code}"


UNSUPPORTED_MEDIA_TYPE = ServerAnswer(415, "unsupported_media_type")
IMAGE_TOO_LARGE = ServerAnswer(413, "image_too_large")
UNDECODABLE_IMAGE = ServerAnswer(422, "undecodable_image")

_lock = threading.Lock()
_max_pixels = DEFAULT_MAX_IMAGE_PIXELS  # this process's limit: configure_pillow sets it
_max_bytes = DEFAULT_MAX_IMAGE_BYTES  # this process's limit on an image file: set_max_image_bytes sets it


def configure_pillow(max_pixels: int) -> None:
    """Make Pillow's process-wide guards agree with these rules, and ``max_pixels`` this
    process's per-image limit (:func:`max_image_pixels`).

    Pillow raises ``DecompressionBombError`` above twice ``MAX_IMAGE_PIXELS`` and warns above
    it; msflow refuses everything above ``max_pixels`` itself, so the warning in between
    would only be noise (and a ``warnings`` filter per call is not thread-safe).
    """
    from PIL import Image, PngImagePlugin

    global _max_pixels
    with _lock:
        _max_pixels = int(max_pixels)
        Image.MAX_IMAGE_PIXELS = int(max_pixels)
        PngImagePlugin.MAX_TEXT_MEMORY = MAX_PNG_TEXT_BYTES  # more text: 422, before it is all inflated
        warnings.filterwarnings("ignore", category=Image.DecompressionBombWarning)


def max_image_pixels() -> int:
    """This process's per-image pixel limit (:data:`DEFAULT_MAX_IMAGE_PIXELS` unless configured)."""
    return _max_pixels


def set_max_image_bytes(max_bytes: int) -> None:
    """This process's limit on one image file's bytes (the server's MSFLOW_MAX_UPLOAD_BYTES)."""
    global _max_bytes
    _max_bytes = int(max_bytes)


def max_image_bytes() -> int:
    """This process's limit on one image file (:data:`DEFAULT_MAX_IMAGE_BYTES` unless set)."""
    return _max_bytes


def too_many_bytes(path: Path, size: int, max_bytes: int) -> str:
    return (f"{path}: {size:,} bytes; the server refuses it ({IMAGE_TOO_LARGE}): at most {max_bytes:,} bytes per "
            "image (MSFLOW_MAX_UPLOAD_BYTES): save it compressed (PNG is lossless), or raise the server's limit "
            "and this one (--max-image-bytes)")


def trainer_limit() -> int:
    """:func:`max_image_pixels`, with Pillow's guards set to agree with it first (the trainer's
    side: once per process, again only if something else changed them)."""
    from PIL import Image, PngImagePlugin

    limit = _max_pixels
    if Image.MAX_IMAGE_PIXELS != limit or PngImagePlugin.MAX_TEXT_MEMORY != MAX_PNG_TEXT_BYTES:
        configure_pillow(limit)
    return limit


def _a(word: str) -> str:
    return f"an {word}" if word[:1] in "AEIOU" else f"a {word}"


def header_refusal(img: "Image.Image", path: Path, max_pixels: int) -> str | None:
    """Why the server refuses the image opened from ``path`` (header only), in a message
    naming the file and the answer; None where its header passes."""
    fmt = img.format or "?"
    if fmt not in ACCEPTED_FORMATS:
        return (f"{path}: {_a(fmt)} named {path.suffix or 'without an extension'}; the server refuses it "
                f"({UNSUPPORTED_MEDIA_TYPE}): convert it to PNG (lossless), or JPEG, BMP, TIFF, WEBP")
    width, height = img.size
    if width * height > max_pixels:
        return too_many_pixels(path, max_pixels, f"{width}x{height} = {width * height:,} pixels")
    return None


def too_many_pixels(path: Path, max_pixels: int, what: str) -> str:
    return (f"{path}: {what}; the server refuses it ({IMAGE_TOO_LARGE}): at most {max_pixels:,} per image "
            "(MSFLOW_MAX_IMAGE_PIXELS): downscale it, or raise the limit on both sides (msflow train "
            "--max-image-pixels, the server's MSFLOW_MAX_IMAGE_PIXELS)")


def unidentified(path: Path) -> str:
    return (f"{path}: not an image in a format the server reads ({ACCEPTED_FORMAT_NAMES}); the server refuses "
            f"it ({UNSUPPORTED_MEDIA_TYPE}): replace it, or move it out of {path.parent}")


def decode_refusal(path: Path, error: Exception) -> str:
    """The message for a file Pillow could not decode (the server's 422)."""
    if "text chunks" in str(error) or "MAX_TEXT_MEMORY" in str(error):
        why = (f"holds more than {MAX_PNG_TEXT_BYTES:,} bytes of PNG text; the server refuses it "
               f"({UNDECODABLE_IMAGE}): save it again without its text metadata")
    else:
        why = f"cannot be decoded ({error}); the server refuses it ({UNDECODABLE_IMAGE}): replace it"
    return f"{path}: {why}"


def empty_file(path: Path) -> str:
    """The message for a file of no bytes (the server's 422, not the 415 of a file it cannot identify)."""
    return (f"{path}: an empty file (0 bytes: a copy or a camera's write cut short?); the server refuses it "
            f"({UNDECODABLE_IMAGE}): replace it, or move it out of {path.parent}")


def badly_framed(path: Path, why: str) -> str:
    """The message for a file over the framing budget (:func:`models.image_framing.over_budget`'s ``why``,
    which may say what to send instead: then that is the advice)."""
    advice = "" if why.endswith(" instead") else ": save it again with an ordinary encoder (they write far fewer)"
    return f"{path}: {why}; the server refuses it ({UNDECODABLE_IMAGE}) before decoding{advice}"
