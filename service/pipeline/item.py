"""The one per-image record of the pipeline: :class:`InspectedImage`.

An image travels from upload to answer as one object, and each stage fills its own fields:

=================  ==========================================  ==============================
stage              fills                                       where
=================  ==========================================  ==============================
intake             ``index``, ``filename``, ``data``           runtime (API) / worker (jobs)
probe (header)     ``format``, ``width``, ``height``,          :mod:`service.pipeline.decode`
                   ``render_size``, ``display_size``, ``cost``  (priced for admission)
decode             ``tensor``, ``display``, ``decode_ms``      :mod:`service.pipeline.decode`
engine             ``raw_score``, ``anomaly_map``,             the lane's batcher
                   ``batch_size``, ``queue_ms``,               (:mod:`service.pipeline.runtime`)
                   ``engine_ms``, ``engine``
postprocess        ``heatmap_png`` (+ size), ``render_ms``,    :mod:`service.pipeline.postprocess`
                   ``regions``, ``regions_ms``, ``result``,
                   ``durable``
=================  ==========================================  ==============================

A cache hit skips decode and engine: it gets ``result``, ``engine`` and ``cached`` only.

Why one mutable record rather than a value per stage: the stages run in different places
(threads of the pool, the batcher's engine thread, the event loop), and a record that keeps
its index, name and timings with it cannot be mis-zipped with another image's scores; a
caller that wants to know how far an image got asks :attr:`InspectedImage.stage`. Each
record is written by one stage at a time (the stages run in sequence per image), so no lock
is needed. The wire types (:mod:`service.schemas`) are unchanged: ``result`` is the
:class:`~service.schemas.ImageResult` the API and the worker answer.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

import numpy as np
from PIL import Image

from service.schemas import ImageResult, Region, Upload

Stage = Literal["received", "decoded", "scored", "answered"]


class StageMissing(RuntimeError):
    """A stage read a field an earlier stage should have filled (a pipeline bug)."""


@dataclass(eq=False)
class InspectedImage:
    """One image from decode to answer; see the module docstring for who fills what."""

    index: int  # position in its request or job (error details, result order)
    filename: str | None
    data: bytes = b""  # the upload's bytes (empty for a record made from pixels already decoded)
    # --- probe (header only)
    format: str | None = None
    width: int = 0  # upright size of the upload
    height: int = 0
    render_size: tuple[int, int] | None = None  # the heatmap to render (None: none), capped
    display_size: tuple[int, int] | None = None  # the overlay background to keep (original-size overlays)
    redecode_size: tuple[int, int] | None = None  # a second, larger JPEG decode for that background
    cost: int = 0  # pixels the pipeline holds for this image (service.pipeline.admission)
    progressive: bool = False  # a progressive JPEG: decode time grows with its scans (service.pipeline.placement)
    # --- decode (the full-size decode itself is not kept)
    tensor: np.ndarray | None = None  # the model input, uint8 [S, S, 3]
    display: Image.Image | None = None  # upright RGB at display_size, for original-size overlays
    decode_ms: float = 0.0
    # --- engine (one batch of the lane's batcher)
    raw_score: float | None = None
    anomaly_map: np.ndarray | None = None  # float32 [S, S]
    batch_size: int = 0
    queue_ms: float = 0.0  # waiting before the engine: a job's wait in its stream, plus the batcher's
    engine_ms: float = 0.0  # the whole batch's engine call
    engine: str | None = None  # the engine that scored it (for a cache hit: the one that scored it then)
    # --- postprocess
    map_finite: bool = True  # False: the map holds NaN or infinity (found in postprocess; no answer then)
    heatmap_png: bytes | None = None
    heatmap_width: int = 0
    heatmap_height: int = 0
    render_ms: float = 0.0
    regions: list[Region] = field(default_factory=list)
    regions_ms: float = 0.0
    result: ImageResult | None = None  # the answer, as the wire carries it
    durable: bool = True  # False when its heatmap link lives only in this process's memory
    cached: bool = False  # answered from the result cache (no decode, no engine)

    @classmethod
    def received(cls, index: int, upload: Upload, queue_ms: float = 0.0) -> InspectedImage:
        """A record for one upload; ``queue_ms``: time it already waited (a job in its stream)."""
        return cls(index=index, filename=upload.filename, data=upload.data, queue_ms=queue_ms)

    @property
    def stage(self) -> Stage:
        """The last stage that completed for this image."""
        if self.result is not None:
            return "answered"
        if self.raw_score is not None:
            return "scored"
        if self.tensor is not None:
            return "decoded"
        return "received"

    # Typed accessors: each stage reads what the one before it must have filled.
    @property
    def model_input(self) -> np.ndarray:
        if self.tensor is None:
            raise StageMissing(f"image {self.index} ({self.filename!r}) was not decoded")
        return self.tensor

    @property
    def score_map(self) -> np.ndarray:
        if self.anomaly_map is None or self.raw_score is None:
            raise StageMissing(f"image {self.index} ({self.filename!r}) was not scored")
        return self.anomaly_map

    @property
    def raw(self) -> float:
        """The engine's raw score (higher: more anomalous)."""
        if self.raw_score is None:
            raise StageMissing(f"image {self.index} ({self.filename!r}) was not scored")
        return self.raw_score

    @property
    def answer(self) -> ImageResult:
        if self.result is None:
            raise StageMissing(f"image {self.index} ({self.filename!r}) has no result")
        return self.result

    @property
    def size(self) -> tuple[int, int]:
        """(width, height) of the upright upload."""
        if not self.width:
            raise StageMissing(f"image {self.index} ({self.filename!r}) was not probed")
        return self.width, self.height
