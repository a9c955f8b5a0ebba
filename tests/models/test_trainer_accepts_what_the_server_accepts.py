"""The trainer reads exactly the images the server accepts, with the server's own rules
(models.image_acceptance): a model trained or calibrated on images the line can never send
is a silent mismatch, found only in production. Each file here is made by Pillow; the
server's answer is asked of the server's own decode (service.pipeline.decode)."""

from __future__ import annotations

import io
import zlib
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageFile, PngImagePlugin

from harness import png_chunk

from models.data import DataError, MVTecCategory
from models.data_loading import load_images, load_masks
from models.image_acceptance import DEFAULT_MAX_IMAGE_PIXELS, MAX_PNG_TEXT_BYTES, max_image_pixels
from service.pipeline.decode import ImageLimits, ImageRejected, configure_pillow, decode_image

SIZE = 32
# The server's defaults (MSFLOW_MAX_UPLOAD_BYTES, MSFLOW_MAX_IMAGE_PIXELS).
SERVER = ImageLimits(max_bytes=20 * 1024 * 1024, max_pixels=DEFAULT_MAX_IMAGE_PIXELS)


# Pillow's own guards in a process that set none (a bare `msflow train`).
PILLOW_MAX_IMAGE_PIXELS = int(1024 * 1024 * 1024 // 4 // 3)
PILLOW_MAX_TEXT_MEMORY = 64 * PngImagePlugin.MAX_TEXT_CHUNK


@pytest.fixture(autouse=True)
def fresh_process() -> Iterator[None]:
    """Each test starts as a fresh trainer process does: Pillow's defaults, the default limit.
    configure_pillow sets process-wide state (Pillow's and the trainer's limit): restored after."""
    before = Image.MAX_IMAGE_PIXELS, PngImagePlugin.MAX_TEXT_MEMORY, max_image_pixels()
    configure_pillow(DEFAULT_MAX_IMAGE_PIXELS)
    Image.MAX_IMAGE_PIXELS, PngImagePlugin.MAX_TEXT_MEMORY = PILLOW_MAX_IMAGE_PIXELS, PILLOW_MAX_TEXT_MEMORY
    yield
    configure_pillow(before[2])
    Image.MAX_IMAGE_PIXELS, PngImagePlugin.MAX_TEXT_MEMORY = before[:2]


def _noise(size: tuple[int, int] = (40, 40), seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8))


def _encode(img: Image.Image, fmt: str, **save: object) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt, **save)
    return buf.getvalue()


def _text_heavy_png() -> bytes:
    """A PNG whose zTXt chunks inflate to 1.2 MiB of text (each under Pillow's per-chunk cap):
    about 2.5 KB on disk, what a tool writing a big XML sidecar into the file makes."""
    info = PngImagePlugin.PngInfo()
    for i in range(2):
        info.add_text(f"note{i}", "x" * (600 * 1024), zip=True)
    return _encode(_noise(), "PNG", pnginfo=info)


def _huge_png() -> bytes:
    """8000 x 5001 = 40,008,000 pixels of grey: just over the server's default, 40 KB on disk."""
    return _encode(Image.new("L", (8000, 5001), 128), "PNG", compress_level=1)


def _claims_huge_png(side: int = 7000) -> bytes:
    """A valid PNG header claiming side x side (7000: 49 Mpx, under Pillow's own guard) over 100
    bytes: one row of pixels, whose zlib stream ends there. Unchecked, Pillow decodes it to
    49 Mpx (the rest black) and converts and resizes all of them."""
    png = bytearray(_encode(Image.new("RGB", (side, 1)), "PNG"))
    ihdr = png[16:29]
    ihdr[4:8] = side.to_bytes(4, "big")
    png[16:29] = ihdr
    png[29:33] = zlib.crc32(b"IHDR" + bytes(ihdr)).to_bytes(4, "big")
    return bytes(png)


def _server_answer(data: bytes) -> ImageRejected | None:
    """What the server answers for this upload: None if it accepts it."""
    configure_pillow(SERVER.max_pixels)
    try:
        decode_image(data, SIZE, SERVER, "upload.png")
    except ImageRejected as exc:
        return exc
    return None


def _trainer_answer(tmp_path: Path, name: str, data: bytes) -> DataError | None:
    root = tmp_path / "root"
    good = root / "part/train/good"
    good.mkdir(parents=True, exist_ok=True)
    _noise(seed=1).save(good / "000.png")
    (good / name).write_bytes(data)
    try:
        load_images(MVTecCategory(root, "part").train_samples(), SIZE)
    except DataError as exc:
        return exc
    return None


def _both_refuse(tmp_path: Path, data: bytes, status: int, code: str) -> str:
    """The trainer refuses ``data`` (as ``a.png``), the server answers ``status code``, and the
    trainer's message names that answer: the trainer's message."""
    refused = _trainer_answer(tmp_path, "a.png", data)  # first: the server's answer configures Pillow
    server = _server_answer(data)
    assert server is not None and (server.status_code, server.code) == (status, code), server
    assert refused is not None, f"the trainer read what the server refuses ({status} {code})"
    message = str(refused)
    assert f"the server refuses it ({status} {code})" in message, message
    return message


# ----------------------------------------------------------------------------- each case, reproduced


def test_a_gif_named_png_is_refused_as_the_server_refuses_it(tmp_path: Path) -> None:
    """It trained (the trainer picked it by its name); the server refuses it by its content (415)."""
    message = _both_refuse(tmp_path, _encode(_noise(), "GIF"), 415, "unsupported_media_type")
    assert message.startswith(str(tmp_path / "root/part/train/good/a.png") + ": a GIF named .png;"), message
    assert "convert it to PNG" in message


def test_a_png_with_more_text_than_the_server_reads_is_refused(tmp_path: Path) -> None:
    """1.2 MiB of PNG text trained (Pillow's default cap: 64 MiB); the server stops at 1 MiB (422)."""
    message = _both_refuse(tmp_path, _text_heavy_png(), 422, "undecodable_image")
    assert "a.png" in message and f"{MAX_PNG_TEXT_BYTES:,} bytes of PNG text" in message


def test_an_image_over_the_servers_pixel_limit_is_refused(tmp_path: Path) -> None:
    """40,008,000 pixels trained (Pillow's guard warns at 89 M); the server refuses above 40 M (413)."""
    message = _both_refuse(tmp_path, _huge_png(), 413, "image_too_large")
    assert "a.png: 8000x5001 = 40,008,000 pixels" in message, message
    assert "--max-image-pixels" in message


def test_the_pixel_limit_is_checked_from_the_header_before_decoding(tmp_path: Path,
                                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    """A header claiming 49 Mpx over 100 bytes: refused at its header, so it costs only itself
    (unchecked, 49 Mpx were decoded, converted to RGB and resized)."""
    decoded: list[tuple[int, int]] = []
    load = ImageFile.ImageFile.load

    def spied_load(img: ImageFile.ImageFile) -> object:
        decoded.append(img.size)
        return load(img)

    monkeypatch.setattr(ImageFile.ImageFile, "load", spied_load)
    data = _claims_huge_png()
    refused = _trainer_answer(tmp_path, "a.png", data)
    assert refused is not None and "7000x7000 = 49,000,000 pixels" in str(refused), refused
    assert (7000, 7000) not in decoded, decoded
    assert (40, 40) in decoded  # the spy sees the decodes that do happen (the other image)
    server = _server_answer(data)
    assert server is not None and server.status_code == 413


def test_not_an_image_under_an_image_name_says_415(tmp_path: Path) -> None:
    _both_refuse(tmp_path, b"lot 7, shift B\n" * 10, 415, "unsupported_media_type")


def test_a_truncated_image_says_422(tmp_path: Path) -> None:
    _both_refuse(tmp_path, _encode(_noise((64, 64)), "PNG")[:-200], 422, "undecodable_image")


def _png_in_small_chunks(chunk: int = 8) -> bytes:
    """A real PNG whose pixel stream is cut into ``chunk``-byte IDAT chunks: more chunks than the
    server's framing budget (1024, plus one per KiB) lets Pillow walk, one by one in Python."""
    png = _encode(_noise((64, 64)), "PNG", compress_level=0)
    stream = b"".join(png[at + 8:at + 8 + n] for at, n in _chunks(png) if png[at + 4:at + 8] == b"IDAT")
    return (png[:33] + b"".join(png_chunk(b"IDAT", stream[i:i + chunk]) for i in range(0, len(stream), chunk))
            + png_chunk(b"IEND", b""))


def _chunks(png: bytes) -> Iterator[tuple[int, int]]:
    at = 8
    while at < len(png):
        yield at, int.from_bytes(png[at:at + 4], "big")
        at += 12 + int.from_bytes(png[at:at + 4], "big")


def test_a_png_in_more_chunks_than_the_server_walks_is_refused(tmp_path: Path) -> None:
    """The server counts a PNG's chunks before Pillow walks them (422 past its budget); the
    trainer read such a file and trained on it."""
    message = _both_refuse(tmp_path, _png_in_small_chunks(), 422, "undecodable_image")
    assert "a.png: holds more than" in message and "PNG chunks" in message, message


def test_an_empty_file_says_the_servers_answer(tmp_path: Path) -> None:
    """A 0-byte file (a copy cut short) was refused as 'not an image in a format the server
    reads (415 unsupported_media_type)'; the server answers it 422 undecodable_image, 'is empty'."""
    message = _both_refuse(tmp_path, b"", 422, "undecodable_image")
    assert "a.png: an empty file" in message, message


# ----------------------------------------------------------------------------- the rule as a whole

CASES: dict[str, Callable[[], bytes]] = {
    "png": lambda: _encode(_noise(), "PNG"),
    "jpeg named png": lambda: _encode(_noise(), "JPEG", quality=90),
    "webp": lambda: _encode(_noise(), "WEBP", lossless=True),
    "bmp": lambda: _encode(_noise(), "BMP"),
    "tiff": lambda: _encode(_noise(), "TIFF"),
    "16-bit png": lambda: _encode(Image.fromarray(np.full((40, 40), 40000, dtype=np.uint16)), "PNG"),
    "png with a little text": lambda: _encode(_noise(), "PNG", pnginfo=_small_text()),
    "gif": lambda: _encode(_noise(), "GIF"),
    "ico": lambda: _encode(_noise(), "ICO"),
    "ppm": lambda: _encode(_noise(), "PPM"),
    "tga": lambda: _encode(_noise(), "TGA"),
    "text-heavy png": _text_heavy_png,
    "40,008,000 pixels": _huge_png,
    "claims 49 Mpx": _claims_huge_png,
    "truncated": lambda: _encode(_noise((64, 64)), "PNG")[:-200],
    "not an image": lambda: b"lot 7\n" * 20,
    "empty": lambda: b"",
    "png in 8-byte chunks": _png_in_small_chunks,
}


def _small_text() -> PngImagePlugin.PngInfo:
    info = PngImagePlugin.PngInfo()
    info.add_text("Comment", "lot 7" * 1000, zip=True)
    return info


@pytest.mark.parametrize("case", list(CASES))
def test_the_trainer_accepts_exactly_what_the_server_accepts(tmp_path: Path, case: str) -> None:
    data = CASES[case]()
    trainer = _trainer_answer(tmp_path, "a.png", data)
    server = _server_answer(data)
    if server is None:
        assert trainer is None, f"the server accepts {case}; the trainer refused it: {trainer}"
    else:
        assert trainer is not None, f"the server refuses {case} ({server.status_code}); the trainer read it"
        assert f"the server refuses it ({server.status_code} {server.code})" in str(trainer), str(trainer)


def test_the_trainers_pixel_limit_is_what_the_process_configured(tmp_path: Path) -> None:
    """`msflow train --max-image-pixels` configures it as the server's setting configures the server."""
    configure_pillow(50_000_000)
    assert max_image_pixels() == 50_000_000
    assert _trainer_answer(tmp_path, "a.png", _huge_png()) is None
    configure_pillow(DEFAULT_MAX_IMAGE_PIXELS)
    refused = _trainer_answer(tmp_path, "a.png", _huge_png())
    assert refused is not None and "at most 40,000,000" in str(refused), refused


# ----------------------------------------------------------------------------- the command


def test_msflow_train_refuses_such_a_set_and_its_flag_raises_the_limit(tmp_path: Path,
                                                                       capsys: pytest.CaptureFixture[str]) -> None:
    """`msflow train` on a set holding an image the server refuses (40,008,000 px) ended in a
    trained run; now it stops before training, naming the file and the server's 413, and
    --max-image-pixels (set on the server too) lets it train."""
    from msflow.cli import main

    good = tmp_path / "data/part/train/good"
    good.mkdir(parents=True)
    for i in range(2):
        _noise(seed=i).save(good / f"00{i}.png")
    (good / "big.png").write_bytes(_huge_png())
    tiny = ["train", "--data", str(tmp_path / "data"), "--category", "part", "--input-size", "64",
            "--meta-epochs", "1", "--sub-epochs", "1", "--warmup-meta-epochs", "0", "--decay-milestones",
            "--holdout-fraction", "0", "--device", "cpu"]
    assert main([*tiny, "--out", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err
    assert "big.png: 8000x5001 = 40,008,000 pixels; the server refuses it (413 image_too_large)" in err, err
    assert not (tmp_path / "run/checkpoint.pt").exists()
    assert main([*tiny, "--out", str(tmp_path / "run2"), "--max-image-pixels", "41000000"]) == 0
    assert (tmp_path / "run2/checkpoint.pt").is_file()


@pytest.mark.parametrize("side", [7000, 9000])  # under, and over, twice the limit (Pillow's own guard)
def test_the_mask_of_an_image_over_the_limit_is_not_decoded(tmp_path: Path, side: int) -> None:
    """load_masks decoded the mask of an image the server refuses (its one row, the rest black:
    'marks no defect'); in a process that set Pillow's guard to the limit (as the server and now
    the trainer do), one over twice the limit escaped as a bare DecompressionBombError."""
    data = _claims_huge_png(side)
    cat = tmp_path / "root/part"
    for where in ("train/good/000.png", "test/crack/000.png", "ground_truth/crack/000_mask.png"):
        (cat / where).parent.mkdir(parents=True, exist_ok=True)
        (cat / where).write_bytes(data)
    with pytest.raises(DataError, match=r"000\.png: .*the server refuses it \(413 image_too_large\)"):
        load_masks(MVTecCategory(tmp_path / "root", "part").test_samples(), SIZE)


def test_every_command_that_reads_images_takes_the_same_limit(tmp_path: Path,
                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    """A set trained with --max-image-pixels past the default was refused by `msflow eval`,
    `export` and `recalibrate`, which had no such flag. All four take it now, by default the
    server's MSFLOW_MAX_IMAGE_PIXELS where set, and it is the process's limit before they run."""
    from models.image_acceptance import DEFAULT_MAX_IMAGE_BYTES, max_image_bytes, set_max_image_bytes
    from msflow.cli import build_parser, main

    monkeypatch.setenv("MSFLOW_MAX_IMAGE_PIXELS", "45000000")
    monkeypatch.setenv("MSFLOW_MAX_UPLOAD_BYTES", "30000000")
    parser = build_parser()
    for command in (["train", "--data", "d"], ["eval", "--run", "r"], ["export", "--run", "r", "--store", "s"],
                    ["recalibrate", "--store", "s", "--category", "c"]):
        args = parser.parse_args(command)
        assert (args.max_image_pixels, args.max_image_bytes) == (45_000_000, 30_000_000), command
        assert parser.parse_args([*command, "--max-image-pixels", "41000000"]).max_image_pixels == 41_000_000
    try:
        assert main(["eval", "--run", str(tmp_path / "no-run")]) == 2  # refused later: the limits set first
        assert (max_image_pixels(), max_image_bytes()) == (45_000_000, 30_000_000)
    finally:
        configure_pillow(DEFAULT_MAX_IMAGE_PIXELS)
        set_max_image_bytes(DEFAULT_MAX_IMAGE_BYTES)


def test_an_image_file_over_the_servers_upload_limit_is_refused_as_the_server_refuses_it(tmp_path: Path) -> None:
    """An uncompressed camera TIFF of 3000x3000 (27 MB) trained, and the server answered its
    upload 413 (MSFLOW_MAX_UPLOAD_BYTES, 20 MiB). Both refuse it now, by its size alone; the
    trainer's --max-image-bytes raises the trainer's limit as the setting raises the server's."""
    from models.image_acceptance import DEFAULT_MAX_IMAGE_BYTES, set_max_image_bytes

    data = _encode(_noise((3000, 3000)), "TIFF")
    assert len(data) > DEFAULT_MAX_IMAGE_BYTES == SERVER.max_bytes
    server = _server_answer(data)
    assert server is not None and server.status_code == 413
    refused = _trainer_answer(tmp_path, "cam.tif", data)
    assert refused is not None and f"cam.tif: {len(data):,} bytes; the server refuses it (413 image_too_large)" \
        in str(refused), refused
    set_max_image_bytes(len(data))
    try:
        assert _trainer_answer(tmp_path, "cam.tif", data) is None
    finally:
        set_max_image_bytes(DEFAULT_MAX_IMAGE_BYTES)
