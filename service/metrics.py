"""Prometheus metrics of the service, on a dedicated ``CollectorRegistry``.

A registry per app (instead of prometheus-client's global default) lets tests and several
apps in one process create metrics without "Duplicated timeseries" errors, and ``/metrics``
shows exactly this service. :class:`ServiceMetrics` also implements the batcher's
:class:`service.pipeline.batcher.BatchObserver` hooks.

Several processes, one ``/metrics`` (``MSFLOW_API_PROCESSES`` > 1): each gauge says how its
values add up across processes (``multiprocess_mode``, which a single process ignores);
how they are kept and merged is :mod:`service.metrics_multiprocess`.

Label values are bounded on purpose: categories are only those in the model store (an
unknown category from a client is counted as ``"-"``), endpoints are route templates.
"""

from __future__ import annotations

import asyncio
import os
import sys
import time
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.metrics import MetricWrapperBase
from prometheus_client.metrics_core import Metric
from prometheus_client.registry import Collector

# Imported before any metric is made: it installs the multi-process value class.
from service.metrics_multiprocess import RATE_HELP, RATE_PARTS, merged_view, multiprocess

# 1 ms .. 30 s: a warm GPU answers in a few ms, a cold CPU batch of large images in seconds.
LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
BATCH_BUCKETS = (1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 64, 128, 256)
# Normalised scores 0..1 by 0.05: the calibrated threshold is 0.5, so a drifting normal
# distribution shows as mass moving up through these buckets.
SCORE_BUCKETS = tuple(round(i * 0.05, 2) for i in range(21))
# A young generation's pass takes well under a millisecond; a full one over a large heap,
# tens to hundreds (service/heap.py).
GC_PAUSE_BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0)
UNKNOWN = "-"
# The pause after each metric family of an exposition built beside the event loop: time for the
# loop to take the GIL (_HandingOver). ~35 families and a dozen files: a few ms more per scrape on
# an idle loop, tens on a busy one (the loop runs in the pauses: what they are for).
GIL_HANDOVER_S = 0.00005


class ServiceMetrics:
    """Every metric the service exports."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry(auto_describe=True)
        r = self.registry
        self.requests = Counter("msflow_requests_total", "HTTP requests by endpoint, category and status code",
                                ["endpoint", "category", "status"], registry=r)
        self.request_latency = Histogram("msflow_request_duration_seconds", "HTTP request latency",
                                         ["endpoint"], buckets=LATENCY_BUCKETS, registry=r)
        self.images = Counter("msflow_images_total", "Inspected images by category and verdict",
                              ["category", "label"], registry=r)
        self.batch_size = Histogram("msflow_batch_size", "Images per engine call", ["category"],
                                    buckets=BATCH_BUCKETS, registry=r)
        self.queue_depth = Gauge("msflow_queue_depth", "Images waiting for a batch", ["category"], registry=r,
                                 multiprocess_mode="livesum")
        self.batch_frontends = Histogram("msflow_batch_frontends", "Front-end processes whose images share an "
                                         "engine batch (multi-process mode: the engine process batches for all)",
                                         ["category"], buckets=(1, 2, 3, 4, 6, 8, 12, 16, 32, 64), registry=r)
        self.queue_wait = Histogram("msflow_queue_wait_seconds", "Time from enqueue to engine start",
                                    ["category"], buckets=LATENCY_BUCKETS, registry=r)
        self.engine_time = Histogram("msflow_engine_seconds", "Engine time per batch", ["category", "engine"],
                                     buckets=LATENCY_BUCKETS, registry=r)
        self.stage_time = Histogram("msflow_stage_seconds", "Per-image time in decode and render",
                                    ["stage"], buckets=LATENCY_BUCKETS, registry=r)
        self.work_placement = Counter("msflow_request_work_total", "Requests (and jobs) by where their decode and "
                                      "postprocess ran: on the event loop (small) or in the decode threads",
                                      ["where"], registry=r)
        self.rejections = Counter("msflow_rejections_total", "Requests or images refused, by reason",
                                  ["category", "reason"], registry=r)
        self.model_info = Gauge("msflow_model_info", "1 for each loaded model version and its engine",
                                ["category", "version", "engine"], registry=r, multiprocess_mode="livemax")
        self.model_load_failures = Counter("msflow_model_load_failures_total", "Failed model loads",
                                           ["category"], registry=r)
        # A standing condition beside the event count: a broken export stays in the store (and
        # unretried) until a newer one or a reload, while an older version serves unnoticed.
        self.model_versions_failed = Gauge("msflow_model_versions_failed", "Versions in the store that failed to "
                                           "load and are not retried (an older version serves meanwhile)",
                                           ["category"], registry=r, multiprocess_mode="livemax")
        self.reloads = Counter("msflow_model_reloads_total", "Model reloads by outcome", ["category", "outcome"],
                               registry=r)
        self.cache_requests = Counter("msflow_cache_requests_total", "Result cache lookups per image: hit, miss, "
                                      "or error (Redis failed or skipped)", ["result"], registry=r)
        for result in ("hit", "miss", "error"):
            self.cache_requests.labels(result)
        self.redis_errors = Counter("msflow_redis_errors_total", "Redis operations that failed or were skipped "
                                    "while the circuit breaker was open", ["operation"], registry=r)
        self.heatmap_links = Counter("msflow_heatmap_links_total", "heatmap=url links by where they live "
                                     "(redis: any replica serves them; memory: only this one)", ["store"], registry=r)
        self.redis_evictions = Counter("msflow_redis_evictions_total", "Entries evicted from Redis before their TTL "
                                       "to keep a store within its byte budget (links, cache, job_results)",
                                       ["store"], registry=r)
        for store in ("links", "cache", "job_results"):
            self.redis_evictions.labels(store)
        self.jobs = Counter("msflow_jobs_total", "Async jobs: queued (API); done, retried, dead_lettered, "
                            "duplicate, expired (worker)", ["category", "outcome"], registry=r)
        # Read from Redis at each scrape (api/health.py), the same on every replica: aggregate with
        # max. Several front ends: each writes its own read, and the latest wins (livemostrecent).
        # livemax kept the largest of every front end's last read: after the backlog drained or a
        # worker died, a front end not scraped since held the old value up (backlog 3, workers 1).
        self.job_workers = Gauge("msflow_job_workers", "msflow worker processes whose heartbeat for the category "
                                 "is live (0: its async jobs wait for none), read from Redis at scrape time",
                                 ["category"], registry=r, multiprocess_mode="livemostrecent")
        self.job_backlog = Gauge("msflow_job_backlog", "Unfinished async jobs (queued or running) in the category's "
                                 "stream, read from Redis at scrape time", ["category"], registry=r,
                                 multiprocess_mode="livemostrecent")
        self.score = Histogram("msflow_score", "Normalised image score (0.5 = the effective threshold)",
                               ["category"], buckets=SCORE_BUCKETS, registry=r)
        self.anomaly_rate = Gauge("msflow_anomaly_rate", RATE_HELP, ["category"], registry=r)
        # Multi-process mode: the rate's parts, summed over the live front ends (metrics_multiprocess).
        self._multiprocess = multiprocess()
        self.anomaly_window = [Gauge(name, "", ["category"], registry=r, multiprocess_mode="livesum")
                               for name in RATE_PARTS] if self._multiprocess else []
        self._window_images: dict[str, int] = {}
        self.gpu_memory = Gauge("msflow_gpu_memory_bytes", "GPU memory per device (used, total), read at "
                                "scrape time; absent on hosts without a CUDA GPU", ["device", "kind"], registry=r,
                                multiprocess_mode="livemax")
        self.nonfinite = Counter("msflow_nonfinite_outputs_total", "Images whose engine output (score or map) "
                                 "was NaN or infinite: answered as an error, never as a verdict",
                                 ["category", "engine"], registry=r)
        self.worker_input_bytes = Gauge("msflow_worker_input_bytes", "msflow worker: bytes of job images fetched "
                                        "and not yet run (held), and MSFLOW_WORKER_MAX_INPUT_BYTES (budget)",
                                        ["kind"], registry=r, multiprocess_mode="livesum")
        # The upload byte budget (service/api/body_limits.py), per process: summed over front ends,
        # held and budget alike (each front end has its own). Its refusals are msflow_rejections_total
        # {reason="upload_bytes"}.
        self.upload_bytes = Gauge("msflow_upload_bytes", "Bytes of request bodies being read and held before their "
                                  "images are priced (held), and MSFLOW_MAX_INFLIGHT_UPLOAD_BYTES (budget); per "
                                  "process, summed over front ends", ["kind"], registry=r, multiprocess_mode="livesum")
        self.pixels_in_flight = Gauge("msflow_pixels_in_flight", "Decoded pixels admitted and not yet released "
                                      "(the budget is MSFLOW_MAX_INFLIGHT_MEGAPIXELS, per process)", registry=r,
                                      multiprocess_mode="livesum")
        self.verdicts = Counter("msflow_verdicts_total", "Inspected images by category and three-way verdict "
                                "(ok, review, ng)", ["category", "verdict"], registry=r)
        # The review queue (service/pipeline/review.py, api/review.py). Pending is the store's
        # count (the same on every replica: aggregate with max, not sum).
        self.review_pending = Gauge("msflow_review_pending", "Unlabelled items in the review store",
                                    ["category"], registry=r, multiprocess_mode="livemax")
        self.review_captures = Counter("msflow_review_captures_total", "Images offered to the review store, by "
                                       "outcome: stored, duplicate, full (budget), category_full (the category's "
                                       "share of it), queue_full (writer behind), "
                                       "error (write failed); never an inspect failure",
                                       ["category", "reason", "outcome"], registry=r)
        # Labels are the store's state (a relabel replaces one), so these are gauges read from
        # it (service/pipeline/review.py refresh), the same on every replica: aggregate with max.
        self.review_labels = Gauge("msflow_review_labels", "Labelled items in the review store by the operator's "
                                   "label (ok, ng)", ["category", "label"], registry=r, multiprocess_mode="livemax")
        self.review_disagreements = Gauge("msflow_review_disagreements", "Labelled items whose label contradicts "
                                          "the model's call (false_positive: model anomalous, operator OK; "
                                          "false_negative: the reverse), by the version that scored the image",
                                          ["category", "version", "kind"], registry=r, multiprocess_mode="livemax")
        self.gc_pauses = Histogram("msflow_gc_pause_seconds", "Passes of Python's cycle collector by process "
                                   "(api: the server or a front end; engine: the engine process) and generation; "
                                   "each one holds the GIL, so every request of that process waits it out",
                                   ["process", "generation"], buckets=GC_PAUSE_BUCKETS, registry=r)
        self.connections = Gauge("msflow_http_connections", "Open HTTP connections (summed over front ends)",
                                 registry=r, multiprocess_mode="livesum")
        self.connections_closed = Counter(
            "msflow_http_connections_closed_total", "HTTP connections the server closed on a budget or a parse "
            "error: header_timeout (408), body_timeout (408, or closed after an answer), send_timeout (the client "
            "took none of its answer), header_too_large (431), pipeline_too_deep (429), over_budget (more than "
            "max_connections open: 503, or closed unanswered past the refusal slots), bad_request (400: bytes "
            "that are not HTTP)", ["reason"], registry=r)
        self._redis_up: Gauge | None = None  # made at the first probe: no Redis, no series (0 would read as down)
        self._model_labels: dict[str, tuple[str, str]] = {}
        self._children: dict[tuple[int, tuple[str, ...]], Any] = {}
        # exposition_off_loop: the one building (in a thread), and the one its scrapers wait for next.
        self._exposition_running: asyncio.Task[tuple[bytes, str]] | None = None
        self._exposition_queued: asyncio.Task[tuple[bytes, str]] | None = None

    def _child(self, metric: MetricWrapperBase, *values: str) -> Any:
        """``metric.labels(*values)``, remembered. prometheus-client checks and converts the
        values and takes a lock on every call; a dozen calls per image on the event loop
        cost more than the observations themselves. Only metrics whose series are never
        removed go through here, and their label values are bounded (module docstring)."""
        key = (id(metric), values)
        child = self._children.get(key)
        if child is None:
            child = self._children[key] = metric.labels(*values)
        return child

    # --------------------------------------------------------------- request level
    def observe_request(self, endpoint: str, category: str, status: int, seconds: float) -> None:
        self._child(self.requests, endpoint, category or UNKNOWN, str(status)).inc()
        self._child(self.request_latency, endpoint).observe(seconds)

    def count_image(self, category: str, anomalous: bool, verdict: str | None = None) -> None:
        self._child(self.images, category, "anomalous" if anomalous else "normal").inc()
        if verdict is not None:
            self._child(self.verdicts, category, verdict).inc()

    def observe_score(self, category: str, score: float) -> None:
        self._child(self.score, category).observe(score)

    def set_anomaly_window(self, category: str, anomalous: int, images: int) -> None:
        """The anomaly-rate window of ``category`` holds ``images`` verdicts, ``anomalous`` of them so."""
        if not self._multiprocess:
            self._child(self.anomaly_rate, category).set(anomalous / images)
            return
        self._child(self.anomaly_window[0], category).set(anomalous)
        if self._window_images.get(category) != images:  # once full, it stays: one write per request, as one process
            self._window_images[category] = images
            self._child(self.anomaly_window[1], category).set(images)

    def set_job_census(self, category: str, workers: int, backlog: int) -> None:
        self._child(self.job_workers, category).set(workers)
        self._child(self.job_backlog, category).set(backlog)

    def set_redis_up(self, answered: bool) -> None:
        """The periodic PING's answer (service/redisq/probe.py). Several front ends: each pings,
        the merged /metrics shows the lowest (livemin): 0 once any of them cannot reach Redis."""
        if self._redis_up is None:
            self._redis_up = Gauge("msflow_redis_up", "1 while Redis answers this process's periodic PING (every "
                                   "MSFLOW_REDIS_PROBE_S, traffic or not), 0 while it does not", registry=self.registry,
                                   multiprocess_mode="livemin")
        self._redis_up.set(1 if answered else 0)

    def observe_stage(self, stage: str, seconds: float) -> None:
        self._child(self.stage_time, stage).observe(seconds)

    def count_work_placement(self, on_loop: bool) -> None:
        self._child(self.work_placement, "loop" if on_loop else "threads").inc()

    def observe_gc_pauses(self, process: str, passes: Sequence[tuple[int, float]]) -> None:
        """``(generation, seconds)`` of collector passes (service/heap.py hands them over)."""
        for generation, seconds in passes:
            self._child(self.gc_pauses, process, str(generation)).observe(seconds)

    # --------------------------------------------------------------- BatchObserver
    def observe_batch(self, category: str, engine: str, size: int, engine_s: float) -> None:
        self._child(self.batch_size, category).observe(size)
        self._child(self.engine_time, category, engine).observe(engine_s)

    def observe_queue_wait(self, category: str, wait_s: float) -> None:
        self._child(self.queue_wait, category).observe(wait_s)

    def set_queue_depth(self, category: str, depth: int) -> None:
        self._child(self.queue_depth, category).set(depth)

    def count_rejection(self, category: str, reason: str) -> None:
        self._child(self.rejections, category or UNKNOWN, reason).inc()

    # --------------------------------------------------------------- models
    def set_model(self, category: str, version: str, engine: str) -> None:
        """Point the info gauge at the version now serving ``category`` (one series per category),
        and make its queue depth a series (0 until a batch says otherwise: the autoscaler and
        the dashboards read it before any traffic, and through an engine process's restart)."""
        old = self._model_labels.get(category)
        if old is not None and old != (version, engine):
            # Multi-process files keep a removed series' last value: zero it first (exposition
            # leaves it out then: metrics_multiprocess.INFO_GAUGES).
            self.model_info.labels(category, *old).set(0)
            _remove(self.model_info, category, *old)
        self._model_labels[category] = (version, engine)
        self.model_info.labels(category, version, engine).set(1)
        self._child(self.queue_depth, category)  # made at 0, never overwritten: a batcher may have set it

    def forget_category(self, category: str) -> None:
        """``category`` left the model store (retired): the gauges that describe it now go, its
        info series as at a swap. Multi-process files keep a removed series' last value, so each
        is zeroed first (info series at 0 are left out of /metrics; the others read 0 there).
        Counters and histograms stay: they are its history, and a total must not go backwards."""
        old = self._model_labels.pop(category, None)
        if old is not None:
            self.model_info.labels(category, *old).set(0)
            _remove(self.model_info, category, *old)
        self._window_images.pop(category, None)
        for gauge in (self.queue_depth, self.model_versions_failed, self.anomaly_rate, *self.anomaly_window,
                      self.job_workers, self.job_backlog):
            self._children.pop((id(gauge), (category,)), None)
            if category in _categories_of(gauge):
                gauge.labels(category).set(0)
                _remove(gauge, category)

    # --------------------------------------------------------------- review store
    def set_review_tallies(self, category: str, pending: int, labelled: Mapping[str, int],
                           disagreements: Mapping[tuple[str, str], int]) -> None:
        """The review gauges of ``category`` as the store now holds it. A (version, kind) no
        longer among ``disagreements`` (retention removed every label that version scored)
        goes, zeroed first for the multi-process files: it kept its last count, which GET
        .../stats no longer listed."""
        self.review_pending.labels(category).set(pending)
        for label in ("ok", "ng"):
            self.review_labels.labels(category, label).set(labelled.get(label, 0))
        for (version, kind), n in disagreements.items():
            self.review_disagreements.labels(category, version, kind).set(n)
        for version, kind in _review_versions(self.review_disagreements, category) - disagreements.keys():
            self.review_disagreements.labels(category, version, kind).set(0)
            _remove(self.review_disagreements, category, version, kind)

    def review_categories(self) -> set[str]:
        """The categories this process has review gauges of."""
        return _categories_of(self.review_pending) | _categories_of(self.review_labels)

    def forget_review_category(self, category: str) -> None:
        """``category`` left the review store (its folder removed): its review gauges go."""
        self.set_review_tallies(category, 0, {}, {})
        for gauge, labels in ((self.review_pending, ()), (self.review_labels, ("ok",)), (self.review_labels, ("ng",))):
            _remove(gauge, category, *labels)

    def refresh_gpu_memory(self) -> None:
        """Device-wide memory (what ONNX Runtime's and TensorRT's own pools use too), via
        torch only where torch already runs CUDA in this process: a scrape must never be
        the thing that creates a CUDA context."""
        torch = sys.modules.get("torch")
        if torch is None or not torch.cuda.is_available() or not torch.cuda.is_initialized():
            return
        for index in range(torch.cuda.device_count()):
            free, total = torch.cuda.mem_get_info(index)
            name = f"cuda:{index}"
            self.gpu_memory.labels(name, "used").set(total - free)
            self.gpu_memory.labels(name, "total").set(total)

    def exposition(self, handover_s: float = 0.0) -> tuple[bytes, str]:
        """The ``/metrics`` body and its content type. ``handover_s``: a pause after each metric
        family, in a thread beside the event loop (:meth:`exposition_off_loop`)."""
        self.refresh_gpu_memory()
        source: Collector = merged_view(handover_s) if os.environ.get("PROMETHEUS_MULTIPROC_DIR") else self.registry
        if handover_s:
            source = _HandingOver(source, handover_s)
        return generate_latest(source), CONTENT_TYPE_LATEST

    async def exposition_off_loop(self) -> tuple[bytes, str]:
        """:meth:`exposition` in a thread, one at a time however many scrapes ask. On the event
        loop a scrape held every request in flight for its whole build (10 categories: 5.5 ms,
        the multi-process merge 9.5 ms: docs/DESIGN.md), and a burst of scrapes for one build
        each, in turn. A scrape that finds one running waits for it and shares the next with
        whoever else arrives meanwhile: the running one may have read the values before this
        scrape's flush (api/health.py), so a scrape right after a burst still reads exact totals.
        Everything it reads is behind prometheus-client's locks (the registry, each metric's
        children and values; :mod:`service.metrics_buffer`'s flush lock; the multi-process files
        are read as another process's are)."""
        loop = asyncio.get_running_loop()
        queued = self._exposition_queued
        if queued is None or queued.get_loop() is not loop:  # none, or a closed loop's (tests)
            queued = self._exposition_queued = loop.create_task(self._expose_after(self._exposition_running))
            queued.add_done_callback(_retrieve)
        return await asyncio.shield(queued)  # a scraper gone does not cancel the others' exposition

    async def _expose_after(self, running: asyncio.Task[tuple[bytes, str]] | None) -> tuple[bytes, str]:
        if running is not None and running.get_loop() is asyncio.get_running_loop():
            await asyncio.wait([running])  # its outcome is its own scrapers'
        me = asyncio.current_task()
        self._exposition_queued, self._exposition_running = None, me
        try:
            return await asyncio.to_thread(self.exposition, GIL_HANDOVER_S)
        finally:
            if self._exposition_running is me:
                self._exposition_running = None

    def is_known(self, category: str) -> bool:
        return category in self._model_labels


class _HandingOver(Collector):
    """``source``'s families, with a pause after each that lets the event loop take the GIL.
    A thread that only computes keeps the GIL until the loop has waited the switch interval
    (5 ms): an exposition of 5 ms in a thread held a request's wake-up as long as on the loop.
    A pause of zero hands nothing over (the thread takes the GIL back before the loop wakes)."""

    def __init__(self, source: Collector, pause_s: float) -> None:
        self.source, self.pause_s = source, pause_s

    def collect(self) -> Iterator[Metric]:
        for family in self.source.collect():
            yield family
            time.sleep(self.pause_s)


def _retrieve(task: asyncio.Task[Any]) -> None:
    """Its failure reached the scrapers that waited; with none left (all gone), it is not logged as unretrieved."""
    if not task.cancelled():
        task.exception()


def _categories_of(metric: MetricWrapperBase) -> set[str]:
    """The ``category`` label of each of ``metric``'s series in this process."""
    return {sample.labels.get("category", "") for family in metric.collect() for sample in family.samples}


def _remove(metric: MetricWrapperBase, *values: str) -> None:
    try:
        metric.remove(*values)
    except KeyError:  # never made (or removed already)
        pass


def _review_versions(metric: MetricWrapperBase, category: str) -> set[tuple[str, str]]:
    """The (version, kind) series of ``category`` in a disagreement gauge of this process."""
    return {(sample.labels["version"], sample.labels["kind"]) for family in metric.collect()
            for sample in family.samples if sample.labels.get("category") == category}
