"""Response payloads of the v1 API (pydantic, so the OpenAPI document is the contract)."""

from __future__ import annotations

from dataclasses import dataclass

from datetime import datetime
from enum import Enum
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from models.build_progress import BuildProgress
from models.manifest import Verdict
from models.review_records import ReviewItem, ReviewLabel


class _Model(BaseModel):
    model_config = ConfigDict(protected_namespaces=())


class HeatmapMode(str, Enum):
    inline = "inline"
    url = "url"  # a link to GET /v1/heatmaps/<id>.png (Redis, or this host's memory without it)
    none = "none"


class HeatmapSize(str, Enum):
    model = "model"  # the model's input size (S x S)
    original = "original"  # the upload's upright size, scaled down to MSFLOW_MAX_HEATMAP_PIXELS at most


_RENDERED = ("size of the PNG as rendered: the model's input size, or the upload's for heatmap_size=original, "
             "scaled down (aspect kept) to at most MSFLOW_MAX_HEATMAP_PIXELS")


class Heatmap(_Model):
    format: Literal["png"] = "png"
    encoding: Literal["base64"] = "base64"
    data: str
    width: int = Field(description=_RENDERED)
    height: int = Field(description=_RENDERED)


class HeatmapLink(_Model):
    format: Literal["png"] = "png"
    url: str = Field(description="/v1/heatmaps/<id>.png, relative to the API")
    expires_at: datetime
    width: int = Field(description=_RENDERED)
    height: int = Field(description=_RENDERED)


class Timings(_Model):
    decode: float
    queue: float
    engine: float
    render: float
    total: float


class ImageSize(_Model):
    width: int
    height: int


class Region(_Model):
    """A connected defect region: anomaly-map pixels above the calibration's ``pixel_threshold``."""

    x: int = Field(description="left edge, in pixels of the upright original image")
    y: int = Field(description="top edge, in pixels of the upright original image")
    width: int
    height: int
    area: int = Field(description="defective pixels, in original-image pixels")
    peak: float = Field(description="highest normalised map value in the region, [0, 1] as the heatmap colours it")
    mean: float = Field(description="mean normalised map value in the region, [0, 1]")


class ImageResult(_Model):
    index: int = Field(description="position of the image in the request")
    filename: str | None
    score: float = Field(description="calibrated score in [0, 1]; 0.5 is the threshold")
    raw_score: float = Field(description="the engine's raw score")
    threshold: float = Field(description="raw-score threshold of the model that scored this image (the ok bound)")
    is_anomalous: bool = Field(description="raw_score >= threshold (review or ng)")
    # Required, like regions: a cached result written before the verdict existed is a miss.
    verdict: Verdict = Field(description="ok: raw_score < threshold; ng: raw_score >= ng_threshold; review: between "
                                         "(a person decides: GET /v1/review/{category}/items)")
    ng_threshold: float = Field(description="raw-score bound from which the verdict is ng without review")
    model_version: str
    batch_size: int = Field(description="images in the engine call that scored this one")
    heatmap: Heatmap | HeatmapLink | None
    timings_ms: Timings
    image_size: ImageSize = Field(description="upright size of the upload")
    # Required (no default): a cached result written before regions existed fails validation
    # and is a cache miss instead of an answer without regions.
    regions: list[Region] = Field(description="defect regions, largest first (MSFLOW_MAX_REGIONS at most, "
                                              "specks under MSFLOW_MIN_REGION_AREA dropped)")
    cached: bool = Field(False, description="answered from the result cache (same bytes, model version and "
                                            "parameters); timings then are this request's")


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
    threshold: float = Field(description="effective raw-score threshold: the override if one is set, else the "
                                         "calibrated one")
    calibrated_threshold: float | None = Field(None, description="the manifest's calibrated threshold")
    ng_threshold: float | None = Field(None, description="effective ng bound (override, else the manifest's)")
    calibrated_ng_threshold: float | None = Field(None, description="the manifest's ng bound")
    threshold_override: "ThresholdOverride | None" = Field(
        None, description="set by PUT /v1/models/{category}/threshold; DELETE returns to the calibrated value")
    calibration: dict[str, Any]
    metrics: dict[str, Any] | None
    created_at: datetime
    loaded_at: datetime
    warmup_ms: float
    pinned: bool
    available_versions: list[str]
    failed_versions: dict[str, str] = Field(default_factory=dict, description="versions in the store that failed to "
                                            "load on this server, with why (not retried until a reload; the "
                                            "version above serves meanwhile)")
    assets: list[str] = Field(default_factory=list, description="evaluation files of this version served by "
                                                                "GET /v1/models/{category}/assets/{name}")


class ThresholdOverride(_Model):
    threshold: float = Field(description="raw-score threshold used instead of the calibrated one")
    ng_threshold: float | None = Field(None, description="ng bound used instead of the manifest's (None: the "
                                                         "manifest's, never below threshold)")
    version: str = Field(description="the model version it applies to (a new version starts calibrated)")
    set_at: datetime


class ThresholdUpdate(_Model):
    """Body of ``PUT /v1/models/{category}/threshold``: a RAW score threshold (the unit of
    ``raw_score`` and of the calibrated ``threshold``)."""

    # The schema says what _something refuses: a body without either bound (``{}`` validated
    # against the document, and was 422 from the server). Strict: a value of the wrong type is
    # refused, never coerced (``true`` was a threshold of 1.0, ``"force": "no"`` a force).
    model_config = ConfigDict(extra="forbid", strict=True, protected_namespaces=(), json_schema_extra={"anyOf": [
        {"required": ["threshold"], "properties": {"threshold": {"type": "number"}}},
        {"required": ["ng_threshold"], "properties": {"ng_threshold": {"type": ["number", "null"]}}}]})

    threshold: float | None = Field(None, allow_inf_nan=False, description="raw-score threshold (the ok bound), "
                                    "e.g. a raw_score seen in a result or in GET /v1/models/{category}/recent; "
                                    "omitted: the effective one stays")
    ng_threshold: float | None = Field(None, allow_inf_nan=False, description="raw-score ng bound (>= threshold); "
                                       "null: back to the manifest's (never below threshold), the ok bound kept; "
                                       "omitted: an ng override already set stays, else the manifest's")
    force: bool = Field(False, description="set a threshold outside the calibration's sane range (422 otherwise)")
    version: str | None = Field(None, description="the model version the threshold was chosen for (the one GET "
                                ".../threshold or .../recent showed); another version served now answers 409 "
                                "version_changed and nothing changes. Omitted: whatever version is served")

    @property
    def ends_ng_override(self) -> bool:
        """``"ng_threshold": null`` sent (left out, an NG override stays)."""
        return self.ng_threshold is None and "ng_threshold" in self.model_fields_set

    @model_validator(mode="after")
    def _something(self) -> "ThresholdUpdate":
        if self.threshold is None and "ng_threshold" not in self.model_fields_set:
            raise ValueError("give threshold, ng_threshold (null: the manifest's) or both")
        return self


class ThresholdState(_Model):
    category: str
    version: str
    calibrated_threshold: float
    threshold: float = Field(description="effective threshold now")
    calibrated_ng_threshold: float | None = None
    ng_threshold: float | None = Field(None, description="effective ng bound now")
    override: ThresholdOverride | None
    persisted: list[Literal["file", "redis"]] = Field(
        default_factory=list, description="where the change was stored (file: beside the manifest; redis: shared "
                                          "by every replica)")


class RecentScore(_Model):
    at: datetime
    raw_score: float
    threshold: float = Field(description="effective threshold when it was scored")
    is_anomalous: bool
    model_version: str
    filename: str | None
    would_be_anomalous: bool | None = Field(None, description="at the ?threshold= of the query")


class RecentSummary(_Model):
    threshold: float
    images: int = Field(description="recent images of the serving version")
    anomalous: int = Field(description="of those, anomalous at `threshold`")
    anomalous_now: int = Field(description="of those, anomalous at the effective threshold now")
    changed: int = Field(description="verdicts that differ between `threshold` and the effective threshold now")


class FrontEndsAnswered(_Model):
    answered: int = Field(description="front-end processes whose recent images the answer holds (the one "
                                      "answering included)")
    of: int = Field(description="front-end processes of the server (MSFLOW_API_PROCESSES)")


class RecentScores(_Model):
    category: str
    version: str
    calibrated_threshold: float
    threshold: float = Field(description="effective threshold now")
    capacity: int = Field(description="MSFLOW_RECENT_SCORES: how many recent images are kept per category")
    scores: list[RecentScore] = Field(description="newest first")
    summary: RecentSummary | None = Field(None, description="with ?threshold=: how the recent images of the "
                                                            "serving version would be classified at it")
    partial: bool = Field(False, description="some front end's images are missing (a multi-process server's "
                                             "front end did not answer within 2 s: stuck, restarting; or the "
                                             "engine process is away): `scores` and `summary` hold fewer images")
    front_ends: FrontEndsAnswered | None = Field(None, description="a multi-process server: how many front ends' "
                                                                   "images the answer holds; null with one process")


class ModelList(_Model):
    models: list[ModelInfo]
    failed: dict[str, str] = Field(default_factory=dict, description="category -> why it did not load")
    building: BuildProgress | None = Field(None, description="progress of a model build writing into the store "
                                                             "(<store>/.build/status.json), when there is one")


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
    categories: dict[str, str] = Field(default_factory=dict,
                                       description="category -> 'serving <version>', 'loading' or 'failed'")
    failed: dict[str, str] = Field(default_factory=dict, description="category -> why it is not served (skipped; "
                                                                     "the others serve)")
    unhealthy: dict[str, str] = Field(default_factory=dict, description="category -> why its serving version looks "
                                                                        "broken (e.g. non-finite outputs)")
    redis: Literal["ok", "degraded", "disabled"] = Field(
        "disabled", description="degraded: Redis is configured but unreachable; inspection keeps serving "
                                "(no cache, links from this host), jobs answer 503")


JobState = Literal["queued", "running", "done", "failed"]


class JobAccepted(_Model):
    id: str
    status: JobState = "queued"
    category: str
    images: int
    url: str = Field(description="/v1/jobs/<id>: poll it for the state and the result")
    workers: int | None = Field(None, description="msflow workers consuming the category now (their heartbeats); "
                                                  "0: none is running, the job waits for one (until MSFLOW_JOB_TTL_S); "
                                                  "null when the job is done or failed already")


class JobStatus(_Model):
    id: str
    status: JobState
    category: str
    created_at: datetime
    updated_at: datetime
    attempts: int = Field(description="deliveries to a worker so far")
    worker: str | None = Field(None, description="the worker (consumer name) of the latest attempt")
    result: InspectResponse | None = Field(None, description="when done: what POST /v1/inspect would answer")
    error: ErrorBody | None = Field(None, description="when failed: why; while queued again: the last attempt's")
    workers: int | None = Field(None, description="while queued or running: msflow workers consuming the category now "
                                                  "(their heartbeats, a few seconds old at most); 0: none is running, "
                                                  "the job waits for one (until MSFLOW_JOB_TTL_S; a running job's "
                                                  "worker is gone and another takes it over once started)")



@dataclass(frozen=True)
class Upload:
    """One image part of a request, as received."""

    filename: str | None
    data: bytes


class InspectOptions(BaseModel):
    """The query parameters that change an answer (and so are part of a cache key and a job)."""

    model_config = ConfigDict(frozen=True)

    heatmap: HeatmapMode = HeatmapMode.inline
    overlay: bool = False
    heatmap_size: HeatmapSize = HeatmapSize.model


# ---------------------------------------------------------------------- review queue (api/review.py)
class ReviewLabelRequest(_Model):
    """Body of ``PUT /v1/review/{category}/items/{id}/label``."""

    # The schema says what _defect_with_ng refuses: a defect type with a label other than ng.
    model_config = ConfigDict(extra="forbid", protected_namespaces=(), json_schema_extra={
        "if": {"properties": {"label": {"const": "ng"}}},
        "else": {"properties": {"defect_type": {"type": "null"}}}})

    label: Literal["ok", "ng"]
    defect_type: str | None = Field(None, pattern=r"^[a-z0-9][a-z0-9_-]{0,63}$",
                                    description="with ng only (422 with ok): e.g. scratch, stain (lower case, "
                                                "digits, _ and -)")
    note: str | None = Field(None, max_length=500)

    @model_validator(mode="after")
    def _defect_with_ng(self) -> "ReviewLabelRequest":
        # The store kept an ok label and dropped its defect type without a word: the reviewer
        # believed the type recorded. The console sends one with ng only.
        if self.defect_type is not None and self.label != "ng":
            raise ValueError(f"defect_type is for ng labels only, not {self.label}")
        return self


class ReviewEntry(_Model):
    """A kept image as the queue lists it: the stored answer plus its label, when it has one."""

    item: ReviewItem
    label: ReviewLabel | None = None
    image_url: str
    heatmap_url: str | None


class ReviewPage(_Model):
    category: str
    verdict: Verdict | None = Field(description="the filter, if any")
    items: list[ReviewEntry] = Field(description="pending (unlabelled) items, oldest first")
    next_cursor: str | None = Field(description="pass as ?after= for the next page")


class DisagreementCounts(_Model):
    false_positive: int = Field(description="model anomalous (score >= threshold), operator OK")
    false_negative: int = Field(description="model not anomalous, operator NG")


class ReviewStats(_Model):
    category: str
    pending: dict[str, int] = Field(description="unlabelled items by verdict")
    labelled: dict[str, int] = Field(description="labels by outcome (ok, ng)")
    agree: int = Field(description="labels where the model's call (score >= threshold) matches the operator")
    disagreements: dict[str, DisagreementCounts] = Field(description="by model version")
    items: int = Field(description="items of this category in the store")
    store_items: int = Field(description="items in the whole store (bounded by MSFLOW_REVIEW_MAX_ITEMS)")
    store_bytes: int = Field(description="bytes the budget counts (bounded by MSFLOW_REVIEW_MAX_BYTES)")


class ReviewLabelled(_Model):
    label: ReviewLabel
    previous: ReviewLabel | None = Field(None, description="the label this one replaced")
    stats: ReviewStats
