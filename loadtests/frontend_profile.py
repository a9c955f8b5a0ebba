"""Where a front end's CPU goes: each stage of a request alone, and the bare engine.

Used by the front-end benchmark (:mod:`loadtests.frontend`):

* :func:`profile`: each stage run in this process, alone, on the benchmark's input, timed
  with ``time.thread_time`` over many repetitions (multipart parsing, header probe, decode,
  resize, regions, heatmap encode, base64, JSON);
* :func:`bare_engine_cpu_ms` and :func:`outside_the_engine`: the engine alone in this
  process at the batch sizes the server formed, and what the server spent beyond it.
"""

from __future__ import annotations

import asyncio
import io
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image


def _cpu_ms(fn: Any, repeat: int) -> float:
    fn()  # warm
    t0 = time.thread_time()
    for _ in range(repeat):
        fn()
    return (time.thread_time() - t0) / repeat * 1e3


def profile(store: Path, category: str, data: bytes, heatmap: str, answer: str, repeat: int = 30,
            engine: str = "null", overlay: bool = False) -> dict[str, float]:
    """CPU ms per image of each stage, alone, in this thread (see the module docstring). The
    regions and the heatmap are those of the map the server's engine gives this image: the
    null engine's flat one, or (any other ``engine``) the real model's, run here on ONNX
    Runtime; a defect's map costs several times a flat one to label and to deflate."""
    import base64

    from starlette.datastructures import Headers
    from starlette.formparsers import MultiPartParser

    from models.manifest import Manifest
    from models.preprocessing import reduce_while_decoding, to_rgb
    from service.pipeline.decode import ImageLimits, Rendering, probe_into
    from service.pipeline.item import InspectedImage
    from service.pipeline.plain_png import decode_plain_png
    from service.pipeline.regions import find_regions
    from service.pipeline.render import render_heatmap
    from service.schemas import InspectResponse

    version = max((p for p in (store / category).iterdir() if p.is_dir() and not p.name.startswith(".")),
                  key=lambda p: int(p.name) if p.name.isdigit() else -1)
    manifest = Manifest.read(version)
    size, cal = manifest.input_size, manifest.calibration
    boundary = "benchboundary"
    body = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"file\"; filename=\"x\"\r\n"
            f"Content-Type: application/octet-stream\r\n\r\n").encode() + data + f"\r\n--{boundary}--\r\n".encode()
    headers = Headers({"content-type": f"multipart/form-data; boundary={boundary}"})

    def multipart() -> None:
        async def stream() -> Any:
            yield body

        async def parse() -> None:
            form = await MultiPartParser(headers, stream()).parse()
            await form.close()
        asyncio.run(parse())

    loop_only = _cpu_ms(lambda: asyncio.run(asyncio.sleep(0)), repeat)  # asyncio.run's own cost, subtracted
    limits = ImageLimits(max_bytes=1 << 30, max_pixels=1 << 30)
    item = InspectedImage(index=0, filename="x", data=data)
    rendering = Rendering(heatmap="model") if heatmap != "none" else Rendering()
    decoded: dict[str, Any] = {}

    def decode() -> None:  # the server's: libspng for a plain PNG, Pillow otherwise
        with Image.open(io.BytesIO(data)) as img:
            reduce_while_decoding(img, size)
            plain = decode_plain_png(img, data)
            if plain is None:
                img.load()
            decoded["rgb"] = to_rgb(img) if plain is None else plain

    out = {
        "multipart": round(_cpu_ms(multipart, repeat) - loop_only, 3),
        "probe": round(_cpu_ms(lambda: probe_into(item, size, limits, rendering), repeat), 3),
        "decode": round(_cpu_ms(decode, repeat), 3),
        "resize": round(_cpu_ms(lambda: model_input(decoded["rgb"], size), repeat), 3),
    }
    amap = np.zeros((size, size), np.float32)
    if engine != "null":
        from service.engines.factory import load_engine

        amap = np.ascontiguousarray(load_engine(version, "onnx", device="cpu", max_batch_size=1)
                                    .run(model_input(decoded["rgb"], size)[None])[1][0])
    out["regions"] = round(_cpu_ms(lambda: find_regions(amap, cal, (item.width, item.height)), repeat), 3)
    if heatmap != "none":  # at the model's size; an overlay over the model input, as the server draws it
        background = Image.fromarray(model_input(decoded["rgb"], size)) if overlay else None
        png = render_heatmap(amap, cal, (size, size), background)
        out["heatmap_encode"] = round(_cpu_ms(lambda: render_heatmap(amap, cal, (size, size), background), repeat), 3)
        out["base64"] = round(_cpu_ms(lambda: base64.b64encode(png), repeat), 3)
    response = InspectResponse.model_validate_json(answer)
    out["json"] = round(_cpu_ms(response.model_dump_json, repeat), 3)
    return out


def model_input(rgb: Image.Image | np.ndarray, size: int) -> np.ndarray:
    """What the server's decode does after decoding (:func:`service.pipeline.decode.decode_into`):
    a plain PNG already at the model's size is the input as is; anything else is resized."""
    from models.preprocessing import resize_rgb

    if isinstance(rgb, np.ndarray):
        if rgb.shape == (size, size, 3):
            return rgb
        rgb = Image.fromarray(rgb)
    return resize_rgb(rgb, size)


def bare_engine_cpu_ms(store: Path, category: str, batch: int, image: Image.Image, seconds: float = 8.0,
                       threads: int | None = None) -> float:
    """Process CPU per image of the engine alone, loaded as the server loads it (``threads``:
    its ``MSFLOW_INTRA_OP_THREADS``), at ``batch``, on ``image`` (resized to the model's input)."""
    from service.engines.factory import load_engine

    version = max((p for p in (store / category).iterdir() if p.is_dir() and not p.name.startswith(".")),
                  key=lambda p: int(p.name) if p.name.isdigit() else -1)
    engine = load_engine(version, "onnx", device="cpu", max_batch_size=batch, threads=threads)
    size = engine.manifest.input_size
    images = np.asarray(image.convert("RGB").resize((size, size), Image.Resampling.LANCZOS))[None].repeat(batch, axis=0)
    engine.run(images)
    per_image = []
    for _ in range(3):  # the median of three windows: a shared box drifts by tens of percent
        n, t0, c0 = 0, time.monotonic(), time.process_time()
        while time.monotonic() - t0 < seconds / 3:
            engine.run(images)
            n += batch
        per_image.append((time.process_time() - c0) / n * 1e3)
    return float(np.median(per_image))


def outside_the_engine(r: dict[str, Any], bare: dict[int, float], bare_engine: Callable[[int], float]) -> None:
    """Fill one window's figures of what the server spends outside the engine (CPU hosts):

    * by thread: the engine's threads in the server (named ``engine-*``) against all others;
    * against the bare engine (``bare_engine(batch)``: its CPU per image alone, cached in
      ``bare``) at the batch sizes the server formed, weighted by its images: the engine's CPU
      per image depends on the batch size, and a mix of 2s and 8s costs more per image than 5s.
      Measured right after the window, so that a drifting box moves both alike."""
    inside = r["engine_threads_cpu_ms_per_image"]
    r["outside_threads_ms"] = round(r["server_cpu_ms_per_image"] - inside, 2)
    r["outside_threads_share"] = round(r["outside_threads_ms"] / inside, 3) if inside else None
    mix = {int(b): c for b, c in r["batch_mix"].items()}
    for b in mix:
        if b not in bare:
            bare[b] = bare_engine(b)
    engine_ms = sum(bare[b] * c for b, c in mix.items()) / sum(mix.values())
    r["bare_engine_cpu_ms_per_image"] = round(engine_ms, 2)
    r["bare_engine_by_batch_ms"] = {b: round(bare[b], 2) for b in sorted(mix)}
    r["outside_engine_ms"] = round(r["server_cpu_ms_per_image"] - engine_ms, 2)
    r["outside_over_engine"] = round((r["server_cpu_ms_per_image"] - engine_ms) / engine_ms, 3)
