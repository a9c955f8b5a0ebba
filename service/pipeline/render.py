"""Anomaly map -> heatmap PNG, optionally blended over the inspected image.

The map is normalised with the manifest's *absolute* range (``calibration.map_low`` = the
median of normal pixels, ``map_high`` = clearly defective), never per image: a per-image
min/max stretch would paint the noise of a perfect part as bright as a real scratch. So a
good part looks cool and a defect hot, comparably across images and requests.

Blocking (resize, PNG encode): the app runs it in its thread pool.
"""

from __future__ import annotations

import io
from typing import Literal

import numpy as np
from PIL import Image

from models.manifest import Calibration

COLORMAP = "inferno"  # perceptually uniform and readable in grey-scale print-outs
OVERLAY_ALPHA = 0.5
# PNG level 1: heatmaps are smooth, so level 1 is nearly as small as 6 at a fraction of the
# CPU time that would otherwise compete with decoding on the same cores.
PNG_COMPRESS_LEVEL = 1


def _build_lut(name: str) -> np.ndarray:
    from matplotlib import colormaps  # only matplotlib's colour tables, not pyplot

    rgba = colormaps[name](np.linspace(0.0, 1.0, 256))
    return np.ascontiguousarray(np.round(rgba[:, :3] * 255.0).astype(np.uint8))


LUT: np.ndarray = _build_lut(COLORMAP)  # uint8 [256, 3], computed once at import


def normalise_map(anomaly_map: np.ndarray, low: float, high: float) -> np.ndarray:
    """uint8 colour indices: ``low`` -> 0, ``high`` -> 255, clipped; NaN counts as ``low``."""
    span = max(float(high) - float(low), 1e-12)
    scaled = (np.asarray(anomaly_map, dtype=np.float32) - np.float32(low)) * np.float32(255.0 / span)
    scaled = np.nan_to_num(scaled, nan=0.0, posinf=255.0, neginf=0.0)
    return np.clip(np.rint(scaled), 0, 255).astype(np.uint8)


def colorize(anomaly_map: np.ndarray, calibration: Calibration, size: tuple[int, int] | None = None) -> np.ndarray:
    """RGB uint8 ``[H, W, 3]`` heatmap of a float ``[S, S]`` map, resized to ``size`` = (w, h).

    The float map is resized *before* colouring (bilinear), so edges stay smooth and the
    colours stay those of the colormap instead of blends between unrelated colours.
    """
    m = np.asarray(anomaly_map, dtype=np.float32)
    if size is not None and (m.shape[1], m.shape[0]) != tuple(size):
        m = np.asarray(Image.fromarray(m).resize(tuple(size), Image.Resampling.BILINEAR))
    return LUT[normalise_map(m, calibration.map_low, calibration.map_high)]


def render_heatmap(anomaly_map: np.ndarray, calibration: Calibration, size: tuple[int, int],
                   background: Image.Image | None = None, alpha: float = OVERLAY_ALPHA) -> bytes:
    """PNG bytes of the heatmap at ``size`` = (width, height), over ``background`` if given."""
    heat = colorize(anomaly_map, calibration, size)
    if background is not None:
        bg = background if background.mode == "RGB" else background.convert("RGB")
        if bg.size != tuple(size):
            bg = bg.resize(tuple(size), Image.Resampling.BILINEAR)
        base = np.asarray(bg, dtype=np.float32)
        heat = np.clip(np.rint(base * (1.0 - alpha) + heat.astype(np.float32) * alpha), 0, 255).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(heat).save(buf, format="PNG", compress_level=PNG_COMPRESS_LEVEL)
    return buf.getvalue()


def heatmap_for(anomaly_map: np.ndarray, calibration: Calibration, model_input: np.ndarray, original: Image.Image,
                size: Literal["model", "original"], overlay: bool) -> tuple[bytes, tuple[int, int]]:
    """The API's heatmap: at the model's size over the model input it saw, or at the upload's
    upright size over the upload. Returns the PNG and its (width, height)."""
    if size == "original":
        out_size, background = original.size, original
    else:
        s = int(anomaly_map.shape[0])
        out_size = (s, s)
        background = Image.fromarray(model_input) if model_input.shape[0] == s else original
    return render_heatmap(anomaly_map, calibration, out_size, background if overlay else None), out_size
