"""At what size an upload is decoded, and what admission is charged for it: a large JPEG at
a reduced (draft) scale, exactly as the trainer decodes it and never below the model's size;
an original-size heatmap's display copy capped, and sharp enough for its overlay."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from decode_fixtures import LIMITS, SIZE, encode
from decode_fixtures import pillow_limit  # noqa: F401  (an autouse fixture)
from models.preprocessing import draft_size, load_image
from service.pipeline.decode import ImageLimits, Rendering, decode_image, fit_within


def photo(width: int, height: int, seed: int = 0) -> np.ndarray:
    """A smooth camera-like RGB image (JPEG compresses it as it would a photograph)."""
    y, x = np.mgrid[0:height, 0:width].astype(np.float32)
    noise = np.random.default_rng(seed).normal(0, 6, (height, width, 1))
    base = np.stack([128 + 80 * np.sin(x / 37), 128 + 80 * np.cos(y / 53), 128 + 60 * np.sin((x + y) / 71)], -1)
    return np.clip(base + noise, 0, 255).astype(np.uint8)


@pytest.mark.parametrize("orientation", [1, 6])
def test_large_jpeg_decodes_at_reduced_scale_like_the_trainer(orientation: int, tmp_path: Path) -> None:
    """A 2048 x 1536 camera JPEG for a 128 px model is decoded at 1/8 scale (256 x 192) on
    both sides: the served tensor is the trainer's, bit for bit, and the price admission
    sees is the reduced decode, not the full one."""
    img = Image.fromarray(photo(2048, 1536))
    exif = img.getexif()
    exif[0x0112] = orientation
    data = encode(img, "JPEG", quality=92, exif=exif.tobytes())
    path = tmp_path / "camera.jpg"
    path.write_bytes(data)
    size = 128
    assert draft_size("JPEG", (2048, 1536), size) == (256, 192)
    with Image.open(io.BytesIO(data)) as probe:  # Pillow's own choice agrees with the header-only rule
        probe.draft(None, (size, size))
        assert probe.size == (256, 192)
    decoded = decode_image(data, size, LIMITS)
    np.testing.assert_array_equal(decoded.tensor, load_image(path, size))
    assert decoded.size == ((2048, 1536) if orientation == 1 else (1536, 2048))
    assert decoded.cost == 256 * 192 + 2 * size * size  # decode + model input and map; no heatmap asked for
    full = np.asarray(Image.open(path).convert("RGB").resize((size, size), Image.Resampling.LANCZOS))
    if orientation == 1:  # DCT scaling is a proper low-pass: close to the full decode's Lanczos
        assert np.abs(decoded.tensor.astype(int) - full.astype(int)).mean() < 3.0


def test_draft_size_never_goes_below_the_model_size() -> None:
    assert draft_size("JPEG", (300, 300), 256) == (300, 300)  # 1/2 would be 150 < 256
    assert draft_size("JPEG", (1024, 600), 256) == (512, 300)  # 1/4 would be 150 on the short side
    assert draft_size("PNG", (4096, 4096), 256) == (4096, 4096)  # only JPEG scales while decoding


def test_original_size_heatmap_is_capped_and_priced() -> None:
    """An original-size overlay of a 3000 x 1000 image under a 1 MP cap is rendered at
    1732 x 577 (aspect kept); the display copy kept for it is that size, not the upload's."""
    limits = ImageLimits(max_bytes=LIMITS.max_bytes, max_pixels=LIMITS.max_pixels, max_heatmap_pixels=1_000_000)
    data = encode(Image.fromarray(photo(3000, 1000)), "PNG", compress_level=1)
    decoded = decode_image(data, SIZE, limits, rendering=Rendering(heatmap="original", overlay=True))
    assert decoded.render_size == fit_within((3000, 1000), 1_000_000) == (1732, 577)
    assert decoded.display is not None and decoded.display.size == (1732, 577)
    assert decoded.cost == 3000 * 1000 + 2 * 1732 * 577 + 2 * SIZE * SIZE
    model_only = decode_image(data, SIZE, limits, rendering=Rendering(heatmap="model", overlay=True))
    assert model_only.display is None and model_only.render_size == (SIZE, SIZE)


def test_original_overlay_of_a_large_jpeg_decodes_a_sharp_background(tmp_path: Path) -> None:
    """The model decode of a 2000 px JPEG is 1/8 scale (250 px); an original-size overlay
    capped at 0.25 MP needs a 500 px background, so a second decode at 1/4 scale provides it."""
    data = encode(Image.fromarray(photo(2000, 2000)), "JPEG", quality=90)
    limits = ImageLimits(max_bytes=LIMITS.max_bytes, max_pixels=LIMITS.max_pixels, max_heatmap_pixels=250_000)
    decoded = decode_image(data, 128, limits, rendering=Rendering(heatmap="original", overlay=True))
    assert decoded.redecode_size == (500, 500) and decoded.display.size == (500, 500)
    assert decoded.cost == 250 * 250 + 500 * 500 + 500 * 500 + 500 * 500 + 2 * 128 * 128
