"""Shared parts of the upload-decoding tests (``test_decode_trainer_parity``,
``test_decode_limits``, ``test_decode_scale``, ``test_decode_libspng_route``): the model size
and limits they decode under, :func:`pillow_limit` (autouse in every module importing it: the
decoder's limits set, Pillow's globals restored afterwards), and the images they encode. Test
modules import this, never each other.
"""

from __future__ import annotations

import io
from collections.abc import Iterator

import numpy as np
import pytest
from PIL import Image, PngImagePlugin

from models.image_acceptance import max_image_pixels
from service.pipeline.decode import ImageLimits, configure_pillow

SIZE = 32
LIMITS = ImageLimits(max_bytes=5_000_000, max_pixels=4_000_000)


@pytest.fixture(autouse=True)
def pillow_limit() -> Iterator[None]:
    """configure_pillow changes Pillow globals and the process's pixel limit (the trainer's
    too: models.image_acceptance); restore them for the rest of the suite."""
    before = Image.MAX_IMAGE_PIXELS, PngImagePlugin.MAX_TEXT_MEMORY, max_image_pixels()
    configure_pillow(LIMITS.max_pixels)
    yield
    configure_pillow(before[2])
    Image.MAX_IMAGE_PIXELS, PngImagePlugin.MAX_TEXT_MEMORY = before[:2]


def encode(img: Image.Image, fmt: str = "PNG", **kw: object) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt, **kw)
    return buf.getvalue()


def gradient(w: int = 40, h: int = 30) -> np.ndarray:
    y, x = np.mgrid[0:h, 0:w]
    return np.stack([x * 6 % 256, y * 8 % 256, (x + y) * 3 % 256], axis=-1).astype(np.uint8)
