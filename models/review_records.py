"""The records of the review store (:mod:`models.review_store`): a kept item's ``item.json``
and an operator's ``labels/<id>.json``. Strict pydantic models, so a file written by another
version or damaged on disk is refused instead of half read; the service answers them as they
are (``GET /v1/review/...``), so they are the wire format too.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from models.manifest import Verdict

Label = Literal["ok", "ng"]
Reason = Literal["review", "audit"]
DEFECT_TYPE_PATTERN = r"^[a-z0-9][a-z0-9_-]{0,63}$"


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, protected_namespaces=())


class ReviewImage(_Strict):
    file: str
    format: str
    media_type: str
    width: int
    height: int
    bytes: int
    sha256: str = Field(pattern=r"^[0-9a-f]{64}$")


class ReviewHeatmap(_Strict):
    file: str = "heatmap.png"
    width: int
    height: int


class ReviewItem(_Strict):
    """One kept image and the answer it got (``item.json``)."""

    id: str
    category: str
    captured_at: datetime
    reason: Reason = Field(description="review: the verdict was review; audit: a random sample of ok or ng")
    model_version: str
    engine: str | None = None
    filename: str | None = None
    verdict: Verdict
    is_anomalous: bool
    raw_score: float
    score: float
    threshold: float
    ng_threshold: float
    regions: list[dict[str, Any]] = Field(default_factory=list, description="as in the inspect answer")
    image: ReviewImage
    heatmap: ReviewHeatmap | None = None


class ReviewLabel(_Strict):
    """An operator's judgement of one item (``labels/<id>.json``)."""

    id: str
    category: str
    label: Label
    defect_type: str | None = Field(None, pattern=DEFECT_TYPE_PATTERN)
    note: str | None = Field(None, max_length=500)
    by: str = Field(max_length=80, description="name of the reviewer (or admin) key that labelled it")
    at: datetime
    model_version: str
    model_verdict: Verdict
    model_is_anomalous: bool
    raw_score: float
    image_sha256: str

    @property
    def agrees(self) -> bool:
        """The model's binary call (score >= threshold) matches the operator."""
        return self.model_is_anomalous == (self.label == "ng")
