"""Upload decoding against the trainer's preprocessing: every image mode, 16 bits, EXIF
orientation, the demo files and a rotated JPEG decode to exactly the trainer's uint8 tensor."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from decode_fixtures import LIMITS, SIZE, encode, gradient
from decode_fixtures import pillow_limit  # noqa: F401  (an autouse fixture)
from models.data import MVTecCategory, Sample
from models.data_loading import load_images
from models.preprocessing import load_image
from service.pipeline.decode import decode_image


def sample_images() -> dict[str, tuple[bytes, str]]:
    rgb = Image.fromarray(gradient())
    gray = rgb.convert("L")
    cases: dict[str, tuple[Image.Image, str]] = {
        "1": (gray.convert("1"), "PNG"),
        "L": (gray, "PNG"),
        "LA": (rgb.convert("LA"), "PNG"),
        "P": (rgb.convert("P"), "PNG"),
        "P-transparent": (rgb.convert("P"), "PNG"),
        "RGB": (rgb, "PNG"),
        "RGBA": (rgb.convert("RGBA"), "PNG"),
        "I;16": (Image.fromarray((np.asarray(gray, dtype=np.uint16) * 257)), "PNG"),
        "I": (Image.fromarray(np.asarray(gray, dtype=np.int32) * 200), "TIFF"),
        "F": (Image.fromarray(np.asarray(gray, dtype=np.float32) * 0.9), "TIFF"),
        "CMYK": (rgb.convert("CMYK"), "JPEG"),
        "JPEG-L": (gray, "JPEG"),
        "BMP": (rgb, "BMP"),
        "WEBP": (rgb, "WEBP"),
    }
    out = {}
    for name, (img, fmt) in cases.items():
        kw = {"transparency": 0} if name == "P-transparent" else {}
        out[name] = (encode(img, fmt, **kw), fmt)
    return out


@pytest.mark.parametrize("case", list(sample_images()))
def test_every_mode_converts_like_the_trainer(case: str, tmp_path: Path) -> None:
    data, fmt = sample_images()[case]
    decoded = decode_image(data, SIZE, LIMITS, name=case)
    assert decoded.size == (40, 30) and decoded.display is None  # no full-size copy outlives the decode
    assert decoded.tensor.dtype == np.uint8 and decoded.tensor.shape == (SIZE, SIZE, 3)
    assert decoded.tensor.flags["C_CONTIGUOUS"]
    path = tmp_path / f"x.{fmt.lower()}"
    path.write_bytes(data)
    np.testing.assert_array_equal(decoded.tensor, load_image(path, SIZE))


def test_16_bit_is_scaled_not_clipped() -> None:
    data = encode(Image.fromarray(np.full((8, 8), 40000, dtype=np.uint16)))
    decoded = decode_image(data, 8, LIMITS)
    assert int(decoded.tensor[0, 0, 0]) == 40000 >> 8


def test_exif_orientation_applied(tmp_path: Path) -> None:
    img = Image.fromarray(gradient(40, 20))
    exif = img.getexif()
    exif[0x0112] = 6  # stored sideways: rotate 90 degrees clockwise to view
    data = encode(img, "JPEG", exif=exif.tobytes(), quality=95)
    decoded = decode_image(data, SIZE, LIMITS)
    assert decoded.size == (20, 40)  # upright: width and height swapped
    path = tmp_path / "exif.jpg"
    path.write_bytes(data)
    np.testing.assert_array_equal(decoded.tensor, load_image(path, SIZE))


def test_server_decode_matches_trainer_on_demo_files(demo_root: Path) -> None:
    """The service's decode + resize gives exactly the trainer's uint8 tensor."""
    samples = MVTecCategory(demo_root, "brick").test_samples()
    picked = [s for s in samples if s.defect_type == "good"][:2] + [s for s in samples if s.label == 1][:2]
    size = 128
    trainer = load_images(picked, size)
    for i, s in enumerate(picked):
        server = decode_image(s.path.read_bytes(), size, LIMITS, name=s.path.name)
        assert server.size == Image.open(s.path).size
        np.testing.assert_array_equal(server.tensor, trainer[i])


def test_server_decode_matches_trainer_on_rotated_jpeg(tmp_path: Path) -> None:
    path = tmp_path / "rot.jpg"
    img = Image.fromarray(gradient(64, 48))
    exif = img.getexif()
    exif[0x0112] = 8
    path.write_bytes(encode(img, "JPEG", exif=exif.tobytes()))
    trainer = load_images([Sample(path=path, label=0, defect_type="good")], 64)
    np.testing.assert_array_equal(decode_image(path.read_bytes(), 64, LIMITS).tensor, trainer[0])
