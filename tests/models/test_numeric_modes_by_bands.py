"""16-bit, 32-bit integer and float images are mapped to 8 bits a band of rows at a time
(models.preprocessing.to_rgb; whole, a float TIFF peaked at 27 bytes a pixel): the result is
bit for bit what the whole-image expressions the trainer used before gave, across bands,
for every value those expressions treat apart (NaN, infinities, halves, out of range)."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from models import preprocessing
from models.preprocessing import to_rgb

WIDTH, HEIGHT = 701, 1003  # three bands (a quarter megapixel each), the last one short


def whole_image_gray8(img: Image.Image) -> np.ndarray:
    """The conversions as they were, on the whole image at once (the reference)."""
    if img.mode.startswith("I;16"):
        arr = np.asarray(img).astype(np.uint16, copy=False)
        return (arr >> 8).astype(np.uint8)
    if img.mode == "I":
        return (np.clip(np.asarray(img, dtype=np.int64), 0, 65535) >> 8).astype(np.uint8)
    arr = np.nan_to_num(np.asarray(img, dtype=np.float64), nan=0.0, posinf=255.0, neginf=0.0)
    return np.clip(np.rint(arr), 0, 255).astype(np.uint8)


def values(dtype: type, specials: list[float]) -> np.ndarray:
    rng = np.random.default_rng(7)
    if dtype is np.float32:
        arr = rng.uniform(-400, 700, (HEIGHT, WIDTH)).astype(np.float32)
        arr[::7] = np.round(arr[::7]) + 0.5  # ties: rint rounds half to even
    else:
        info = np.iinfo(dtype)
        arr = rng.integers(info.min, info.max, (HEIGHT, WIDTH), dtype=np.int64, endpoint=True).astype(dtype)
    flat = arr.reshape(-1)
    flat[:: max(1, flat.size // 5000)][: len(specials) * 50] = np.resize(np.array(specials, dtype=dtype),
                                                                          len(specials) * 50)
    return arr


def images() -> dict[str, Image.Image]:
    u16 = values(np.uint16, [0, 255, 256, 65535])
    return {
        "I;16": Image.fromarray(u16),
        "I;16B": Image.frombytes("I;16B", (WIDTH, HEIGHT), u16.astype(">u2").tobytes()),
        "I;16L": Image.frombytes("I;16L", (WIDTH, HEIGHT), u16.astype("<u2").tobytes()),
        "I": Image.fromarray(values(np.int32, [-1, 0, 65535, 65536, 2**31 - 1, -(2**31)])),
        "F": Image.fromarray(values(np.float32, [np.nan, np.inf, -np.inf, -0.0, 0.5, 1.5, 254.5, 255.5, 1e30])),
    }


@pytest.mark.parametrize("mode", list(images()))
def test_banded_conversion_is_the_whole_image_conversion(mode: str) -> None:
    img = images()[mode]
    assert img.mode == mode and WIDTH * HEIGHT > 2 * preprocessing._BAND_PIXELS
    expected = whole_image_gray8(img)
    out = np.asarray(to_rgb(img))
    assert out.shape == (HEIGHT, WIDTH, 3)
    for channel in range(3):
        np.testing.assert_array_equal(out[..., channel], expected)
