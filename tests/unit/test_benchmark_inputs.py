"""The front-end benchmark's distinct uploads (loadtests/frontend_inputs.py): other bytes, the same
pixels, and the server's own decode paths still take them."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from loadtests.frontend_inputs import distinct, encoded, texture
from service.pipeline.plain_png import decode_plain_png


@pytest.mark.parametrize("fmt", ["JPEG", "PNG"])
def test_distinct_bytes_same_pixels(fmt: str) -> None:
    data = encoded(texture(64), fmt)
    first, second = distinct(data, 1), distinct(data, 2)
    assert len({data, first, second}) == 3
    with Image.open(io.BytesIO(data)) as img:
        pixels = np.asarray(img.convert("RGB"))
    for body in (first, second):
        with Image.open(io.BytesIO(body)) as img:
            img.load()  # Pillow checks the PNG chunks' CRCs as it reads them
            assert np.array_equal(np.asarray(img.convert("RGB")), pixels)
            if fmt == "PNG":  # the server's fast path (libspng, CRCs checked) still takes it
                fast = decode_plain_png(img, body)
                assert fast is not None and np.array_equal(fast, pixels)


def test_distinct_refuses_other_formats() -> None:
    with pytest.raises(ValueError):
        distinct(b"GIF89a...", 1)
