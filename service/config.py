"""Service settings: one pydantic-settings model read from ``MSFLOW_*`` environment variables.

Everything an operator tunes on a production line lives here, typed and validated at
start-up, so a typo in a deployment manifest fails loudly before the first request
instead of as a strange 500 later. ``msflow serve`` flags override the environment.
"""

from __future__ import annotations

import json
import logging
import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import Field, field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

from models.image_acceptance import DEFAULT_MAX_IMAGE_BYTES, DEFAULT_MAX_IMAGE_PIXELS
from models.manifest import CATEGORY_PATTERN

log = logging.getLogger(__name__)

MiB = 1024 * 1024

EngineKind = Literal["auto", "onnx", "tensorrt", "torch", "null"]
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


PLACEHOLDER_KEY_PREFIX = "change-me"  # the example files' keys: refused, so they never go live
LOOPBACK_HOSTS = frozenset({"127.0.0.1", "::1", "localhost"})
REVIEWER_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.@-]{0,63}$")  # recorded with each label


class Settings(BaseSettings):
    """Settings of the inspection service (environment variable = ``MSFLOW_`` + upper-case name)."""

    # hide_input_in_errors: a refused value stays out of the error, which `msflow serve` prints
    # and the container log keeps: a reviewer list written "alice:KEY", or a JSON key list with
    # an empty entry, printed every key of it (and a refused Redis URL its password).
    model_config = SettingsConfigDict(env_prefix="MSFLOW_", extra="ignore", protected_namespaces=(),
                                      hide_input_in_errors=True)

    # --- models -------------------------------------------------------------------------
    model_store: Path = Field(Path("model_store"), description="model_store/<category>/<version>/ root")
    pinned_versions: dict[str, str] = Field(
        default_factory=dict, description='category -> version to serve instead of the newest, e.g. {"grass":"1"}')
    engine: EngineKind = Field("auto", description="auto: TensorRT plan if usable, else ONNX Runtime; null: "
                                                 "zero outputs, for front-end benchmarks only")
    device: str = Field("auto", description="auto (a GPU if usable, else the CPU), cpu, or cuda / cuda:N (that "
                        "GPU, or the load fails: never a quiet CPU engine)")
    intra_op_threads: int | None = Field(None, ge=1, description="engine CPU threads (None: runtime default)")
    ort_tensorrt_cache_dir: Path | None = Field(
        None, description="where ONNX Runtime's TensorRT provider keeps the engines it builds (a folder per "
                          "model) and its timing cache, so a restart loads them instead of building for minutes; "
                          "a writable folder, not the model store (None: <TMPDIR>/msflow-ort-tensorrt-<uid>)")
    ort_tensorrt_cache_max_bytes: int = Field(
        512 * MiB, ge=1, description="bytes that cache may take (engines of every model, and the timing cache); "
                                     "before an engine is built the least recently used models' engines no process "
                                     "holds are removed, and a model it cannot hold is served uncached. Keep it "
                                     "well under the volume's size: Kubernetes evicts a pod past its /tmp emptyDir's "
                                     "sizeLimit")
    store_poll_s: float = Field(5.0, ge=0.0, description="how often the server looks for new categories and "
                                "versions in the model store (0: only at start-up and on reload)")
    store_removal_grace_s: float = Field(
        30.0, allow_inf_nan=False, description="how long a category folder, or the folder of the version served (unpinned), must stay "
                          "gone from the model store, on every scan of the watch, before the server lets go of it: "
                          "the category is retired (404 unknown_category), the version replaced by the newest one "
                          "left. A store that cannot be listed proves nothing gone. 0: at the first scan that "
                          "finds it gone; negative: never (served on from memory until a restart)")

    # --- batching -----------------------------------------------------------------------
    max_batch_size: int = Field(8, ge=1, le=1024)
    max_queue_delay_ms: float = Field(5.0, ge=0.0, description="how long a batch waits for company")
    max_queue_size: int = Field(64, ge=1, description="images waiting per category before 503; also the most "
                                "images one POST /v1/inspect may carry (its images queue together: 413 beyond)")
    request_deadline_ms: float = Field(10_000.0, gt=0.0, description="answer 504 past this")

    # --- input limits -------------------------------------------------------------------
    max_upload_bytes: int = Field(DEFAULT_MAX_IMAGE_BYTES, ge=1, description="per image")  # the trainer's default too
    max_request_bytes: int = Field(64 * MiB, ge=1, description="whole request body (all parts)")
    max_image_pixels: int = Field(DEFAULT_MAX_IMAGE_PIXELS, ge=1,  # the trainer's default too
                                  description="width x height, checked before decoding")
    max_files_per_request: int = Field(32, ge=1)
    max_request_megapixels: float = Field(
        160.0, gt=0.0, description="decoded pixels one request may hold (all its images: the decode after JPEG "
                                   "scaling, display copies and rendered heatmaps), from the headers before any "
                                   "decoding; over it: 413 too_many_pixels")
    max_inflight_megapixels: float = Field(
        320.0, gt=0.0, description="decoded pixels all admitted requests of this process may hold at once; a "
                                   "request that would go over it: 503 server_busy + Retry-After (a worker waits "
                                   "instead). About 4 bytes of memory per pixel at peak (docs/PERFORMANCE.md)")
    max_inflight_upload_bytes: int = Field(
        512 * MiB, ge=1, description="bytes of uploads (image request bodies) this process reads and holds at once, "
                                     "before any image is priced in pixels; a request that would go over it: 503 "
                                     "server_busy + Retry-After (service/api/body_limits.py)")
    max_heatmap_pixels: int = Field(4 * 1024 * 1024, ge=1, description="heatmap_size=original heatmaps larger "
                                    "than this are rendered scaled down to it; the answer gives the size rendered")
    max_header_bytes: int = Field(64 * 1024, ge=1024, description="a request's line and headers; over it: 431 "
                                  "header_too_large and the connection closes (the HTTP parser would hold them "
                                  "all: service/api/connections.py)")
    header_timeout_s: float = Field(10.0, gt=0.0, description="a request's line and headers must arrive within "
                                    "this (counted from its first byte, or from the connection's opening); "
                                    "else 408 request_timeout and the connection closes")
    max_connections: int = Field(1024, ge=1, description="open HTTP connections per server process (each front "
                                 "end of a multi-process server); one more is closed as soon as it opens")

    # --- security -----------------------------------------------------------------------
    # repr=False: keys must never end up in a log line that prints the settings.
    api_keys: Annotated[list[str], NoDecode] = Field(default_factory=list, repr=False,
                                                     description="empty: the API is open")
    admin_api_keys: Annotated[list[str], NoDecode] = Field(default_factory=list, repr=False,
                                                           description="keys allowed to reload models and change "
                                                                       "thresholds; none: admin routes refuse (403)")
    dev_open_admin: bool = Field(False, description="development only: with no keys at all, admin routes are "
                                                    "open. Refused unless the server binds a loopback address")

    # --- server -------------------------------------------------------------------------
    # Loopback by default: an open API (no keys) must not be exposed by accident; containers
    # set MSFLOW_HOST=0.0.0.0 explicitly.
    host: str = "127.0.0.1"
    port: int = Field(8000, ge=0, le=65535)
    decode_threads: int = Field(4, ge=1, description="threads decoding uploads and rendering heatmaps")
    loop_work_pixels: int = Field(
        500_000, ge=0, description="a request whose images add up to at most this many pixels of work (header "
        "pixels plus admission's price) is decoded and rendered on the event loop, not in the decode threads: "
        "for small images the hand-off to a thread costs more than the work (service/pipeline/placement.py); "
        "0: always in the threads")
    api_processes: int = Field(1, ge=1, le=64, description="front-end processes (HTTP, decode, heatmaps); above 1, "
                               "one engine process runs the engines and forms the batches for all of them "
                               "(docs/DESIGN.md, docs/PERFORMANCE.md)")
    engine_stall_s: float = Field(
        60.0, ge=0.0, description="an engine that has run one batch this long (a GPU call that never returns, an "
                                  "engine process stopped) takes the server out of rotation: /readyz 503 "
                                  "engine_stalled; one process also fails /healthz (a restart is the only way "
                                  "out), and the engine process of several exits and is restarted (killed and "
                                  "restarted by the supervisor when its event loop has not run this long). Above the "
                                  "request deadline, which a request may legitimately wait. 0: never")
    frontend_stall_s: float = Field(
        30.0, ge=0.0, description="above 1 API process: a front end whose event loop has not run for this long "
                                  "(stopped, or stuck in a call that never returns) is killed and replaced; its "
                                  "socket stays on the port, and the connections the kernel hands it would wait "
                                  "for as long as it stays stuck. 0: never")
    engine_socket: Path | None = Field(None, description="internal: set by msflow serve for its front-end "
                                                         "processes (the engine process's Unix socket)")
    heatmap_links_dir: Path | None = Field(None, description="internal: set by msflow serve for its front-end "
                                           "processes (the folder of this front end's heatmap=url PNGs, beside "
                                           "the other front ends' folders, which it reads too)")
    graceful_shutdown_s: float = Field(30.0, ge=0.0, description="max wait for in-flight requests on SIGTERM")
    shutdown_delay_s: float = Field(
        0.0, ge=0.0, description="after SIGTERM, keep serving with /readyz 503 this long so load balancers "
                                 "stop routing before the socket closes")
    retry_after_s: int = Field(1, ge=0, description="Retry-After on 503 answers")
    heap_retain_mb: int = Field(64, ge=0, le=1024, description="free memory each C heap of a server process keeps "
                                "for the next requests' buffers instead of giving it back to the kernel (glibc; "
                                "service/allocator.py); 0: glibc's adaptive default")
    access_log: bool = Field(True, description="a line per request on stdout (service/api/request_metrics.py): "
                             "UTC time, client, method, target (cut at 256 characters), status (499: the client "
                             "left first), ms, request id; at INFO, so a log_level above info quiets it too")
    log_level: LogLevel = "info"

    # --- Redis: heatmap links, result cache, async jobs -----------------------------------
    # Without a URL the service runs on one host: inline heatmaps, links from a bounded
    # in-process store, no cache, and /v1/jobs answers 503.
    redis_url: str | None = Field(None, repr=False, description="redis://[:PASSWORD@]host:6379/0, rediss:// for "
                                                                 "TLS; None: no Redis")
    redis_password: str | None = Field(None, repr=False, description="password when the URL carries none (keeps it "
                                                                       "out of the URL)")
    redis_ssl_ca_certs: Path | None = Field(None, description="CA bundle for rediss:// (default: system CAs)")
    redis_prefix: str = Field("msflow:", max_length=64, description="prefix of every key and stream")
    redis_socket_timeout_s: float = Field(0.25, gt=0.0, description="per command, API side: an outage must not "
                                                                     "stall requests")
    redis_connect_timeout_s: float = Field(0.25, gt=0.0)
    redis_retries: int = Field(1, ge=0, le=10, description="retries of a command on a connection error")
    redis_health_check_interval_s: float = Field(10.0, ge=0.0, description="PING idle connections before reuse")
    redis_breaker_s: float = Field(3.0, ge=0.0, description="after a Redis failure the API skips Redis this long")
    redis_probe_s: float = Field(5.0, ge=0.1, le=300.0, description="every API process and worker PINGs Redis this "
                                 "often, traffic or not (msflow_redis_up, the MsflowRedisDown alert)")
    redis_max_connections: int = Field(64, ge=1, le=10_000, description="Redis connections per client and process; "
                                       "a call waits up to redis_socket_timeout_s for one, then 503 (a busy "
                                       "pool is not an outage: the breaker stays closed)")
    heatmap_ttl_s: float = Field(600.0, gt=0.0, description="lifetime of a heatmap=url link (a job's lives "
                                 "job_ttl_s, as long as its record)")
    heatmap_max_bytes: int = Field(256 * MiB, ge=1, description="bytes of heatmap=url PNGs in Redis (every "
                                   "replica's together); a new link past it evicts those expiring soonest; at least "
                                   "4 x max_heatmap_pixels + 64 KiB, the largest PNG a heatmap can be")
    heatmap_memory_items: int = Field(512, ge=1, description="in-process link store bound (links)")
    heatmap_memory_bytes: int = Field(64 * MiB, ge=1, description="in-process link store bound (PNG bytes)")
    cache_enabled: bool = Field(True, description="result cache (needs Redis)")
    cache_ttl_s: float = Field(3600.0, gt=0.0)
    cache_max_entry_bytes: int = Field(1 * MiB, ge=1, description="larger results (big inline heatmaps) are not "
                                                                   "cached")
    cache_max_bytes: int = Field(256 * MiB, ge=1, description="bytes of cached results in Redis (every replica's "
                                 "together); a new entry past it evicts those expiring soonest")
    job_ttl_s: float = Field(86_400.0, gt=0.0, description="how long job records, inputs and results are kept")
    job_max_attempts: int = Field(3, ge=1, description="deliveries before a job goes to the dead-letter stream")
    job_max_backlog: int = Field(10_000, ge=1, description="unfinished jobs per category stream; a submission "
                                                           "beyond answers 503 (finished jobs leave the stream)")
    job_max_backlog_bytes: int = Field(512 * MiB, ge=1, description="input bytes of a category's unfinished jobs "
                                       "held in Redis; a submission beyond answers 503 (keep it and "
                                       "job_max_results_bytes times the categories, plus heatmap_max_bytes and "
                                       "cache_max_bytes, under Redis's maxmemory)")
    job_max_results_bytes: int = Field(256 * MiB, ge=1, description="bytes of a category's finished job records "
                                       "in Redis; a job finishing past it evicts the records expiring soonest "
                                       "(their GET answers 404 before job_ttl_s)")
    dead_letter_max: int = Field(10_000, ge=1, description="dead-letter stream length (approximate, oldest "
                                                           "trimmed first)")
    job_claim_idle_s: float = Field(60.0, gt=0.0, description="a pending job idle this long (its worker died) "
                                                              "is claimed by another worker")
    job_consumer_idle_s: float = Field(600.0, gt=0.0, description="a consumer of a job stream's group with "
                                       "nothing pending and unseen this long (a dead worker's: the name is new at "
                                       "every start) is deleted by the workers")
    worker_block_s: float = Field(2.0, gt=0.0, description="XREADGROUP BLOCK of an idle worker")
    worker_name: str | None = Field(None, max_length=128, description="consumer name (default host-pid)")
    worker_metrics_port: int | None = Field(None, ge=0, le=65535, description="Prometheus port of msflow worker")
    worker_max_input_bytes: int = Field(128 * MiB, ge=1, description="job images one msflow worker holds at once "
                                        "(fetched from Redis, not yet run); the jobs of a read beyond it wait in hand "
                                        "and are fetched in turn; a larger job runs alone")
    bench_threads: int = Field(0, ge=0, description="msflow bench: onnxruntime intra-op threads (0: default)")

    # --- defect regions, runtime thresholds, drift (service/regions.py, thresholds.py, recent.py)
    max_regions: int = Field(10, ge=0, le=1000, description="defect regions per image, largest first")
    min_region_area: float = Field(
        0.005, ge=0.0, le=1.0, description="smallest region kept, as a FRACTION of the image area (0.005 = 0.5 %: "
                                           "82 px of a 128x128 map, 6144 px of a 1280x960 photo); resolution-"
                                           "independent. The pixel threshold lets ~0.1 % of normal pixels through, "
                                           "so smaller blobs are mostly noise; lower it for fine scratches")
    recent_scores: int = Field(500, ge=1, le=100_000, description="recent raw scores kept per category (memory) "
                                                                  "for GET /v1/models/{category}/recent")
    anomaly_rate_window: int = Field(200, ge=1, le=100_000, description="images behind the msflow_anomaly_rate "
                                                                        "gauge (sliding window per category)")
    threshold_overrides_dir: Path | None = Field(None, description="where runtime threshold overrides are kept "
                                                 "durably (None: beside each version's manifest in the model store; "
                                                 "deployments with a read-only store point it at a writable volume)")
    threshold_sync_s: float = Field(5.0, gt=0.0, description="how often threshold overrides are re-read from "
                                                             "Redis, or without Redis from their files where those "
                                                             "changed (replicas and processes converge within this)")

    # --- review queue (service/pipeline/review.py, models/review_store.py, api/review.py) ---------
    review_store: Path | None = Field(None, description="where kept images and labels live, shared by replicas and "
                                                        "workers (None: <model_store>/.review; deployments that "
                                                        "mount the model store read-only set a writable volume)")
    review_enabled: bool = Field(True, description="keep review verdicts (and the audit sample) for operators")
    review_audit_rate: float = Field(0.02, ge=0.0, le=1.0, description="share of ok and ng verdicts also kept, "
                                                                        "at random, to audit the model")
    review_max_bytes: int = Field(1024 * MiB, ge=1, description="review store bound (bytes, whole store)")
    review_max_items: int = Field(10_000, ge=1, description="review store bound (items, whole store); each "
                                  "process reading the store keeps its index in memory, ~0.5 KB an item and ~2 KB "
                                  "a label (9 MB at 10,000 items, 2,000 labelled)")
    review_category_share: float = Field(0.5, gt=0.0, le=1.0, description="the most of those bounds one category "
                                         "may hold: a line in a defect wave cannot have every other line's "
                                         "captures refused (1: no share of its own)")
    review_retention_s: float = Field(7 * 86_400.0, gt=0.0, description="unlabelled items are removed after this")
    review_label_retention_s: float = Field(90 * 86_400.0, gt=0.0, description="labelled items (and their labels) "
                                                                               "are removed after this")
    review_queue_items: int = Field(32, ge=1, description="images waiting to be written to the review store")
    review_queue_bytes: int = Field(64 * MiB, ge=1, description="their memory (uploads + decoded pixels) bound")
    review_scan_s: float = Field(30.0, gt=0.0, description="how often retention runs and the pending gauge is read")
    reviewer_api_keys: Annotated[dict[str, str], NoDecode] = Field(
        default_factory=dict, repr=False, description="name=key,name2=key2 (or a JSON object): keys that may label "
                                                      "review items; the name is recorded with each label")

    @field_validator("api_keys", "admin_api_keys", mode="before")
    @classmethod
    def _parse_keys(cls, value: Any) -> Any:
        keys = _key_list(value)
        if isinstance(keys, list) and any(not str(k).strip() for k in keys):
            # A JSON list from a template whose variable was unset ('["k", ""]'): refused at start
            # rather than kept as a key that matches nothing (service.api.auth), unnoticed.
            raise ValueError("an API key in the list is empty: remove it, or set the variable it came from")
        if isinstance(keys, list) and any(str(k).lower().startswith(PLACEHOLDER_KEY_PREFIX) for k in keys):
            raise ValueError(f"an API key starts with {PLACEHOLDER_KEY_PREFIX!r}: replace the example keys "
                             "(deploy/env.example, deploy/k8s/secret.yaml) with real ones")
        return keys

    @field_validator("reviewer_api_keys", mode="before")
    @classmethod
    def _parse_named_keys(cls, value: Any) -> Any:
        if isinstance(value, str):
            text = value.strip()
            if text.startswith("{"):
                value = json.loads(text)
            else:
                pairs = [part.split("=", 1) for part in text.split(",") if part.strip()]
                if any(len(pair) != 2 for pair in pairs):
                    raise ValueError("reviewer_api_keys: write name=key pairs separated by commas")
                value = {name.strip(): key.strip() for name, key in pairs}
        if isinstance(value, dict):
            for name, key in value.items():
                if not REVIEWER_NAME.fullmatch(str(name)) or not str(key):
                    raise ValueError(f"reviewer key name {name!r} must match {REVIEWER_NAME.pattern}, with a key")
                if str(key).lower().startswith(PLACEHOLDER_KEY_PREFIX):
                    raise ValueError(f"a reviewer key starts with {PLACEHOLDER_KEY_PREFIX!r}: use a real key")
        return value

    @field_validator("redis_url", "redis_password", "worker_name", mode="before")
    @classmethod
    def _empty_is_none(cls, value: Any) -> Any:
        return None if isinstance(value, str) and not value.strip() else value

    @field_validator("log_level", mode="before")
    @classmethod
    def _lower_level(cls, value: Any) -> Any:
        return value.lower() if isinstance(value, str) else value

    @field_validator("pinned_versions")
    @classmethod
    def _check_pins(cls, value: dict[str, str]) -> dict[str, str]:
        for category in value:
            if not CATEGORY_PATTERN.fullmatch(category):
                raise ValueError(f"pinned category {category!r} must match {CATEGORY_PATTERN.pattern}")
        return value

    @model_validator(mode="after")
    def _consistent(self) -> "Settings":
        if self.max_files_per_request > self.max_queue_size:
            # A request is queued atomically (all its images or none), so a request with more
            # images than the queue holds could never be served: POST /v1/inspect refuses it
            # with 413 too_many_files (not 503 queue_full, whose Retry-After no retry satisfies).
            # Not refused here: a worker queues a job's images in parts and serves any number.
            log.warning("max_files_per_request (%d) > max_queue_size (%d): POST /v1/inspect takes at most %d images "
                        "a request (413 too_many_files beyond); jobs take up to %d",
                        self.max_files_per_request, self.max_queue_size, self.max_queue_size,
                        self.max_files_per_request)
        if 0 < self.engine_stall_s <= self.request_deadline_ms / 1e3:
            # A batch or a request in the engine process may take up to the deadline without
            # anything being wrong: a stall limit within it would take a busy server out of rotation.
            raise ValueError(f"engine_stall_s ({self.engine_stall_s:g}) must be above the request deadline "
                             f"({self.request_deadline_ms / 1e3:g} s), or 0 (never)")
        if self.max_request_megapixels > self.max_inflight_megapixels:
            raise ValueError("max_request_megapixels exceeds max_inflight_megapixels: such requests could never run")
        if self.max_request_bytes > self.max_inflight_upload_bytes:
            raise ValueError("max_request_bytes exceeds max_inflight_upload_bytes: such requests could never run")
        if self.max_upload_bytes > self.max_request_bytes:
            log.warning("max_upload_bytes > max_request_bytes: the request limit applies first")
        if self.heatmap_max_bytes < (largest := largest_heatmap_png_bytes(self.max_heatmap_pixels)):
            # A link is stored whole or not at all: below this, a large heatmap's link would fail
            # as though Redis were down, and the worker would retry that job until dead-lettered.
            raise ValueError(f"heatmap_max_bytes ({self.heatmap_max_bytes}) is below the largest heatmap PNG "
                             f"(max_heatmap_pixels {self.max_heatmap_pixels}: up to {largest} bytes)")
        if self.redis_url is not None and not self.redis_url.startswith(("redis://", "rediss://", "unix://")):
            raise ValueError("redis_url must start with redis://, rediss:// or unix://")
        if self.dev_open_admin and self.host not in LOOPBACK_HOSTS:
            raise ValueError(f"dev_open_admin opens the admin routes to anyone who reaches {self.host}: it is "
                             f"allowed only on a loopback host ({', '.join(sorted(LOOPBACK_HOSTS))}); configure "
                             "MSFLOW_ADMIN_API_KEYS instead")
        return self


def largest_heatmap_png_bytes(pixels: int) -> int:
    """An upper bound on a heatmap PNG of ``pixels``: an RGB overlay that deflate could not
    shrink (3 bytes a pixel, a filter byte a row, at most one row a pixel) plus the PNG and
    zlib framing and what Redis charges per entry (service/redisq/budget.py), both well under
    64 KiB."""
    return 4 * pixels + 64 * 1024


# MSFLOW_* variables that are no setting but the project's own, read by its scripts and tools,
# and so often in a server's environment (exported in the shell that runs scripts/demo.sh, a
# .env sourced for compose): not typos, so not warned about. tests/unit/test_settings.py checks
# that each is read where named here and is no setting.
PROJECT_VARIABLES = frozenset({
    "MSFLOW_DEMO_CATEGORIES", "MSFLOW_DEMO_FULL",  # scripts/demo.sh, scripts/build-demo.sh
    "MSFLOW_TORCH_SPEC",  # scripts/setup.sh (which scripts/demo.sh runs)
    # docker-compose.yml and deploy/env.example: compose's own, or the trainer service's
    "MSFLOW_VARIANT", "MSFLOW_PUBLISH_PORT", "MSFLOW_WORKERS", "MSFLOW_REDIS_MAXMEMORY", "MSFLOW_LOG_MAX_SIZE",
    "MSFLOW_LOG_MAX_FILES", "MSFLOW_TRAINER_TENSORRT",
    # loadtests/ (Locust)
    "MSFLOW_LOAD_API_KEY", "MSFLOW_LOAD_IMAGES", "MSFLOW_LOAD_CATEGORIES", "MSFLOW_LOAD_MAX_IMAGES",
    "MSFLOW_LOAD_BATCH", "MSFLOW_LOAD_TIMEOUT", "MSFLOW_LOAD_JOB_TIMEOUT",
    # the test suite and scripts/install-browser.sh
    "MSFLOW_TEST_HOSTILE_REQUESTS", "MSFLOW_TEST_ARTIFACTS", "MSFLOW_CHROMIUM",
})


def unknown_env(environ: Mapping[str, str] | None = None) -> list[str]:
    """``MSFLOW_*`` variables of ``environ`` that no setting reads (misspelt, or left over),
    but for the project's scripts' and tools' own (:data:`PROJECT_VARIABLES`)."""
    environ = os.environ if environ is None else environ
    known = {f"MSFLOW_{name.upper()}" for name in Settings.model_fields} | PROJECT_VARIABLES
    return sorted(k for k in environ if k.upper().startswith("MSFLOW_") and k.upper() not in known)


def warn_unknown_env(environ: Mapping[str, str] | None = None) -> list[str]:
    """Log a warning naming every ``MSFLOW_*`` variable no setting reads; called at start-up
    so a misspelt setting does not pass in silence."""
    unknown = unknown_env(environ)
    if unknown:
        log.warning("ignored environment variables (no such setting): %s", ", ".join(unknown))
    return unknown
