"""Service settings: one pydantic-settings model read from ``MSFLOW_*`` environment variables.

Everything an operator tunes on a production line lives here, typed and validated at
start-up, so a typo in a deployment manifest fails loudly before the first request
instead of as a strange 500 later. ``msflow serve`` flags override the environment.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import Field, field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

from models.manifest import CATEGORY_PATTERN

log = logging.getLogger(__name__)

MiB = 1024 * 1024

EngineKind = Literal["auto", "onnx", "tensorrt", "torch"]
LogLevel = Literal["critical", "error", "warning", "info", "debug"]


def _key_list(value: Any) -> Any:
    """Accept a JSON list or a comma-separated string: ``'["a","b"]'`` or ``'a,b'``.

    Secrets are usually injected by a secret manager as a plain string, where a JSON list is
    awkward; both spellings therefore mean the same thing.
    """
    if isinstance(value, str):
        text = value.strip()
        if not text:
            return []
        if text.startswith("["):
            return json.loads(text)
        return [part.strip() for part in text.split(",") if part.strip()]
    return value


class Settings(BaseSettings):
    """Settings of the inspection service (environment variable = ``MSFLOW_`` + upper-case name)."""

    model_config = SettingsConfigDict(env_prefix="MSFLOW_", extra="ignore", protected_namespaces=())

    # --- models -------------------------------------------------------------------------
    model_store: Path = Field(Path("model_store"), description="model_store/<category>/<version>/ root")
    pinned_versions: dict[str, str] = Field(
        default_factory=dict, description='category -> version to serve instead of the newest, e.g. {"grass":"1"}')
    engine: EngineKind = Field("auto", description="auto: TensorRT plan if usable, else ONNX Runtime")
    device: str = Field("auto", description="auto, cpu, cuda, cuda:1 ...")
    intra_op_threads: int | None = Field(None, ge=1, description="engine CPU threads (None: runtime default)")

    # --- batching -----------------------------------------------------------------------
    max_batch_size: int = Field(8, ge=1, le=1024)
    max_queue_delay_ms: float = Field(5.0, ge=0.0, description="how long a batch waits for company")
    max_queue_size: int = Field(64, ge=1, description="images waiting per category before 503")
    request_deadline_ms: float = Field(10_000.0, gt=0.0, description="answer 504 past this")

    # --- input limits -------------------------------------------------------------------
    max_upload_bytes: int = Field(20 * MiB, ge=1, description="per image")
    max_request_bytes: int = Field(64 * MiB, ge=1, description="whole request body (all parts)")
    max_image_pixels: int = Field(40_000_000, ge=1, description="width x height, checked before decoding")
    max_files_per_request: int = Field(32, ge=1)

    # --- security -----------------------------------------------------------------------
    # repr=False: keys must never end up in a log line that prints the settings.
    api_keys: Annotated[list[str], NoDecode] = Field(default_factory=list, repr=False,
                                                     description="empty: the API is open")
    admin_api_keys: Annotated[list[str], NoDecode] = Field(default_factory=list, repr=False,
                                                           description="keys allowed to reload models")

    # --- server -------------------------------------------------------------------------
    # Loopback by default: an open API (no keys) must not be exposed by accident; containers
    # set MSFLOW_HOST=0.0.0.0 explicitly.
    host: str = "127.0.0.1"
    port: int = Field(8000, ge=0, le=65535)
    decode_threads: int = Field(4, ge=1, description="threads decoding uploads and rendering heatmaps")
    graceful_shutdown_s: float = Field(30.0, ge=0.0, description="max wait for in-flight requests on SIGTERM")
    shutdown_delay_s: float = Field(
        0.0, ge=0.0, description="after SIGTERM, keep serving with /readyz 503 this long so load balancers "
                                 "stop routing before the socket closes")
    retry_after_s: int = Field(1, ge=0, description="Retry-After on 503 answers")
    access_log: bool = True
    log_level: LogLevel = "info"

    # --- later issues -------------------------------------------------------------------
    redis_url: str | None = Field(None, description="heatmap links, cache and jobs (not used yet)")

    @field_validator("api_keys", "admin_api_keys", mode="before")
    @classmethod
    def _parse_keys(cls, value: Any) -> Any:
        return _key_list(value)

    @field_validator("log_level", mode="before")
    @classmethod
    def _lower_level(cls, value: Any) -> Any:
        return value.lower() if isinstance(value, str) else value

    @field_validator("pinned_versions")
    @classmethod
    def _check_pins(cls, value: dict[str, str]) -> dict[str, str]:
        for category in value:
            if not CATEGORY_PATTERN.match(category):
                raise ValueError(f"pinned category {category!r} must match {CATEGORY_PATTERN.pattern}")
        return value

    @model_validator(mode="after")
    def _consistent(self) -> "Settings":
        if self.max_files_per_request > self.max_queue_size:
            # A request is queued atomically (all its images or none), so a request with more
            # images than the queue holds could never be served.
            log.warning("max_files_per_request (%d) > max_queue_size (%d): such requests always get 503",
                        self.max_files_per_request, self.max_queue_size)
        if self.max_upload_bytes > self.max_request_bytes:
            log.warning("max_upload_bytes > max_request_bytes: the request limit applies first")
        return self


__all__ = ["Settings", "EngineKind", "MiB"]
