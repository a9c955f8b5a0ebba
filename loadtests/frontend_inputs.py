"""What the front-end benchmark posts (:mod:`loadtests.frontend`, :mod:`loadtests.instructions`):
the input kinds (an image's side, format and heatmap request), each image made from
scikit-image's brick photograph or a given file and encoded, and the same bytes made distinct
per request (other bytes, the same pixels) so that a result cache keyed by the bytes misses.
"""

from __future__ import annotations

import io
import zlib
from dataclasses import dataclass

import numpy as np
from PIL import Image


def texture(size: int) -> Image.Image:
    from skimage import data as skdata

    img = Image.fromarray(np.asarray(skdata.brick())).convert("RGB")  # 512 x 512 real photograph
    return img.resize((size, size), Image.Resampling.LANCZOS)


def source(image: str | None, size: int) -> Image.Image:
    """What the clients post, at ``size``: ``image`` (a file) resized, or the brick texture."""
    if image is None:
        return texture(size)
    with Image.open(image) as img:
        return img.convert("RGB").resize((size, size), Image.Resampling.LANCZOS)


def encoded(img: Image.Image, fmt: str) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt, **({"quality": 90} if fmt == "JPEG" else {}))
    return buf.getvalue()


@dataclass(frozen=True)
class Kind:
    """What the clients post: an image of ``side`` pixels in ``format`` (Pillow's name), and
    how it asks for its heatmap."""

    side: int
    format: str
    heatmap: str  # the API's heatmap=
    overlay: bool = False

    @property
    def query(self) -> dict[str, str]:
        return {"heatmap": self.heatmap, **({"overlay": "true"} if self.overlay else {})}

    @property
    def content_type(self) -> str:
        return "image/jpeg" if self.format == "JPEG" else "image/png"


KINDS: dict[str, Kind] = {
    "jpeg256-none": Kind(256, "JPEG", "none"),
    "png256-inline": Kind(256, "PNG", "inline"),
    "jpeg2048-none": Kind(2048, "JPEG", "none"),
    "png256-overlay": Kind(256, "PNG", "inline", overlay=True),
}
TARGET_KINDS = ["jpeg256-none", "png256-inline", "jpeg2048-none"]  # the targets: the default


def distinct(data: bytes, n: int) -> bytes:
    """``data`` (a JPEG or a PNG) with a comment naming ``n``: other bytes, the same pixels, as
    every photograph of a line differs (the result cache, keyed by the bytes, misses). A
    JPEG's COM segment right after SOI; a PNG's ``tEXt`` chunk ("Comment") right after IHDR."""
    note = b"msflow benchmark %d" % n
    if data[:2] == b"\xff\xd8":
        return data[:2] + b"\xff\xfe" + (len(note) + 2).to_bytes(2, "big") + note + data[2:]
    if data[:8] == b"\x89PNG\r\n\x1a\n":
        body = b"tEXt" + b"Comment\0" + note
        chunk = (len(body) - 4).to_bytes(4, "big") + body + zlib.crc32(body).to_bytes(4, "big")
        return data[:33] + chunk + data[33:]  # signature (8) + IHDR (4 + 4 + 13 + 4)
    raise ValueError("distinct bytes for JPEG and PNG only")
