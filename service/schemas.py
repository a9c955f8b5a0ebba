"""Response payloads of the v1 API (pydantic, so the OpenAPI document is the contract)."""

from __future__ import annotations

from datetime import datetime
from enum import Enum
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field


class _Model(BaseModel):
    model_config = ConfigDict(protected_namespaces=())


class HeatmapMode(str, Enum):
    inline = "inline"
    url = "url"  # needs Redis; a later issue
    none = "none"


class HeatmapSize(str, Enum):
    model = "model"  # the model's input size (S x S)
    original = "original"  # the upload's upright size


class Heatmap(_Model):
    format: Literal["png"] = "png"
    encoding: Literal["base64"] = "base64"
    data: str
    width: int
    height: int


class Timings(_Model):
    decode: float
    queue: float
    engine: float
    render: float
    total: float


class ImageSize(_Model):
    width: int
    height: int


class ImageResult(_Model):
    index: int = Field(description="position of the image in the request")
    filename: str | None
    score: float = Field(description="calibrated score in [0, 1]; 0.5 is the threshold")
    raw_score: float = Field(description="the engine's raw score")
    threshold: float = Field(description="raw-score threshold of the model that scored this image")
    is_anomalous: bool
    model_version: str
    batch_size: int = Field(description="images in the engine call that scored this one")
    heatmap: Heatmap | None
    timings_ms: Timings
    image_size: ImageSize = Field(description="upright size of the upload")


class InspectResponse(_Model):
    request_id: str
    category: str
    model_version: str
    engine: str
    results: list[ImageResult]


class ModelInfo(_Model):
    category: str
    version: str
    engine: str
    input_size: int
    backbone: str
    threshold: float
    calibration: dict[str, Any]
    metrics: dict[str, Any] | None
    created_at: datetime
    loaded_at: datetime
    warmup_ms: float
    pinned: bool
    available_versions: list[str]


class ModelList(_Model):
    models: list[ModelInfo]
    failed: dict[str, str] = Field(default_factory=dict, description="category -> why it did not load")


class ErrorBody(_Model):
    code: str
    message: str
    details: Any | None = None


class ErrorResponse(_Model):
    error: ErrorBody


class Health(_Model):
    status: Literal["ok"] = "ok"


class Readiness(_Model):
    status: Literal["ready"] = "ready"
    models: dict[str, str] = Field(description="category -> version serving")


__all__ = [
    "ErrorBody", "ErrorResponse", "Health", "Heatmap", "HeatmapMode", "HeatmapSize", "ImageResult", "ImageSize",
    "InspectResponse", "ModelInfo", "ModelList", "Readiness", "Timings",
]
