"""Admission's price of an image against what its decode really holds: for each costly kind
(modes that convert through a second buffer, 16-bit and float, palettes, WEBP's canvases, a
progressive JPEG's coefficients), the peak resident memory of probe + decode + resize, measured
in a process of its own, is at most the price times the bytes a priced pixel stands for.
Priced as plain pixels, a float TIFF held 27 bytes for every 4 the budget believed."""

from __future__ import annotations

import io
import json
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from decode_fixtures import LIMITS, encode
from decode_fixtures import pillow_limit  # noqa: F401  (an autouse fixture)
from models.image_framing import jpeg_multi_scan
from service.pipeline.decode import Rendering, probe_into
from service.pipeline.decode_memory import PRICED_PIXEL_BYTES
from service.pipeline.item import InspectedImage

REPO = Path(__file__).resolve().parents[2]
WIDTH, HEIGHT = 2000, 1500  # 3 MP: the per-pixel part dwarfs a process's noise, decoded in ~0.1 s
MODEL = 256

# One process per image: probe, warm up on a small image of the same kind (one-time costs
# such as lazy imports are not the image's), then the peak resident memory of the decode.
CHILD = """
import json, sys
from pathlib import Path
from service.pipeline.decode import ImageLimits, configure_pillow, decode_image, probe_into
from service.pipeline.item import InspectedImage

def status(field: str) -> int:  # VmRSS now, VmHWM its peak: this process's own (ru_maxrss keeps the parent's)
    line = next(l for l in Path("/proc/self/status").read_text().splitlines() if l.startswith(field + ":"))
    return int(line.split()[1]) * 1024

configure_pillow(100_000_000)
limits = ImageLimits(max_bytes=1 << 30, max_pixels=100_000_000)
size = int(sys.argv[3])
decode_image(Path(sys.argv[2]).read_bytes(), size, limits)
data = Path(sys.argv[1]).read_bytes()
item = InspectedImage(index=0, filename=None, data=data)
probe_into(item, size, limits)
before = max(status("VmRSS"), status("VmHWM"))
decode_image(data, size, limits)
peak = status("VmHWM") - before
print(json.dumps({"cost": item.cost, "peak": peak}))
"""


def picture(width: int, height: int) -> Image.Image:
    y, x = np.mgrid[0:height, 0:width]
    g = ((x + y) % 256).astype(np.uint8)
    return Image.fromarray(np.stack([g, (x % 256).astype(np.uint8), (y % 256).astype(np.uint8)], -1))


def gray16(img: Image.Image) -> Image.Image:
    return Image.fromarray(np.asarray(img.convert("L"), dtype=np.uint16) * 257)


def alpha(img: Image.Image) -> Image.Image:
    out = img.convert("RGBA")
    out.putalpha(img.convert("L"))
    return out


KINDS: dict[str, Callable[[Image.Image], bytes]] = {
    "PNG L": lambda img: encode(img.convert("L"), "PNG"),
    "PNG RGBA": lambda img: encode(alpha(img), "PNG"),
    "PNG P": lambda img: encode(img.convert("P"), "PNG"),
    "PNG I;16": lambda img: encode(gray16(img), "PNG"),
    "BMP P": lambda img: encode(img.convert("P"), "BMP"),
    "TIFF F": lambda img: encode(Image.fromarray(np.asarray(img.convert("L"), dtype=np.float32) * 1.01),
                                 "TIFF", compression="tiff_deflate"),
    "TIFF I": lambda img: encode(Image.fromarray(np.asarray(gray16(img), dtype=np.int32) * 3),
                                 "TIFF", compression="tiff_deflate"),
    "TIFF CMYK": lambda img: encode(img.convert("CMYK"), "TIFF", compression="tiff_deflate"),
    "WEBP": lambda img: encode(img, "WEBP", quality=80),
    "WEBP RGBA": lambda img: encode(alpha(img), "WEBP", quality=80),
    "WEBP animated": lambda img: encode(img, "WEBP", save_all=True, append_images=[img.convert("L").convert("RGB")]),
    "JPEG progressive": lambda img: encode(img, "JPEG", quality=90, progressive=True),
    "JPEG progressive 4:4:4": lambda img: encode(img, "JPEG", quality=90, progressive=True, subsampling=0),
    "JPEG progressive CMYK": lambda img: encode(img.convert("CMYK"), "JPEG", quality=90, progressive=True),
}


@pytest.fixture(scope="module")
def big() -> Image.Image:
    return picture(WIDTH, HEIGHT)


@pytest.mark.parametrize("kind", list(KINDS))
def test_an_image_is_priced_at_least_what_its_decode_holds(kind: str, big: Image.Image, tmp_path: Path) -> None:
    image, warm = tmp_path / "image", tmp_path / "warm"
    image.write_bytes(KINDS[kind](big))
    warm.write_bytes(KINDS[kind](picture(96, 64)))
    done = subprocess.run([sys.executable, "-c", CHILD, str(image), str(warm), str(MODEL)], cwd=REPO,
                          capture_output=True, text=True, timeout=120, check=True)
    measured = json.loads(done.stdout)
    priced = measured["cost"] * PRICED_PIXEL_BYTES
    assert measured["peak"] > 1_000_000  # the measurement sees the decode at all
    assert measured["peak"] <= priced, (
        f"{kind}: the decode held {measured['peak'] / 1e6:.1f} MB, priced {priced / 1e6:.1f} MB")
    # and the price is measured, not a guess far above it (that would refuse what fits)
    assert priced <= 1.5 * measured["peak"] + 2_000_000, f"{kind}: priced {priced / 1e6:.1f} MB"


def jpeg_header(components: int, in_first_scan: int, width: int = 2000, height: int = 1500) -> bytes:
    """A baseline JPEG's header up to its first scan, whose scan codes ``in_first_scan`` of its
    ``components`` (non-interleaved when fewer): libjpeg must then gather the whole image."""
    def segment(marker: int, body: bytes) -> bytes:
        return bytes([0xFF, marker]) + (len(body) + 2).to_bytes(2, "big") + body
    quant = segment(0xDB, b"\x00" + bytes(range(1, 65)))
    frame = segment(0xC0, b"\x08" + height.to_bytes(2, "big") + width.to_bytes(2, "big") + bytes([components])
                    + b"".join(bytes([i + 1, 0x11, 0]) for i in range(components)))
    huffman = segment(0xC4, b"\x00" + bytes([0, 1] + [0] * 14) + b"\x00")
    huffman += segment(0xC4, b"\x10" + bytes([0, 1] + [0] * 14) + b"\x00")
    scan = segment(0xDA, bytes([in_first_scan]) + b"".join(bytes([i + 1, 0]) for i in range(in_first_scan))
                   + b"\x00\x3f\x00")
    return b"\xff\xd8" + quant + frame + huffman + scan + b"\x00" * 64 + b"\xff\xd9"


def test_a_jpeg_gathered_whole_is_priced_its_coefficients_at_any_scale() -> None:
    """A baseline JPEG whose first scan lacks a component is decoded through the same
    whole-image coefficient buffer as a progressive one (libjpeg's rule), however small the
    DCT-scaled decode: 2 bytes a sample at the stored size, 18 MB for 3 MP of three components."""
    one_pass, whole = jpeg_header(3, 3), jpeg_header(3, 1)
    assert not jpeg_multi_scan(one_pass) and jpeg_multi_scan(whole)
    with Image.open(io.BytesIO(whole)) as img:  # Pillow opens it as any baseline JPEG
        assert img.format == "JPEG" and not img.info.get("progressive")
    priced = []
    for data in (one_pass, whole):
        item = InspectedImage(index=0, filename=None, data=data)
        probe_into(item, MODEL, LIMITS, Rendering())
        priced.append(item.cost)
    assert priced[0] == 500 * 375 + 2 * MODEL * MODEL  # decoded at 1/4, plus the model's input and map
    assert (priced[1] - priced[0]) * PRICED_PIXEL_BYTES >= 2 * 3 * 2000 * 1500
