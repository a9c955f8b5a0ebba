"""What recent images scored, per category: the admin console's "what if" and the drift metrics.

Every answered image (scored now or from the result cache) is observed once:

* a bounded ring of its raw score, the effective threshold and verdict at the time, the
  model version and file name (``MSFLOW_RECENT_SCORES`` per category, memory only, this
  replica only): ``GET /v1/models/{category}/recent?threshold=X`` shows how the last
  images of the serving version would be classified at ``X``;
* ``msflow_score{category}``: histogram of the normalised score (buckets 0..1 by 0.05), the
  distribution a dashboard watches for drift of normal parts;
* ``msflow_anomaly_rate{category}``: share of anomalous verdicts among the last
  ``MSFLOW_ANOMALY_RATE_WINDOW`` images (a count window, so it means the same at 2 and at
  2000 images a minute, and it does not decay to 0 when the line stops).

A multi-process server (``MSFLOW_API_PROCESSES`` = N) has a ring and a window in each front
end, and a GET lands on any one: the admin routes read :meth:`RecentScores.gather`, which
merges every front end's ring by time on demand (through the engine process,
:meth:`EngineClient.collect`) and keeps the newest ``MSFLOW_RECENT_SCORES``; before, a GET
showed the images of the front end that answered it (5 or 6 of 11 with two). The anomaly
rate is the ratio of the front ends' anomalous verdicts to their images, added up at
``/metrics`` (:mod:`service.metrics`), each front end's window ``ceil(W / N)`` images, so
that the server's is the configured ``W`` (the last ``W`` images when the kernel spreads the
load; a front end that gets none keeps its older ones, as one process keeps its window when
the line stops). Neither costs an image anything more than in one process.
"""

from __future__ import annotations

import collections
import logging
import math
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any

from service.config import Settings
from service.metrics import ServiceMetrics
from service.pipeline.batch_queue import BatcherError
from service.pipeline.engine_client import EngineClient
from service.schemas import ImageResult, RecentScore, RecentSummary

log = logging.getLogger(__name__)
_TOPIC = "recent"
_FILENAME_CHARS = 1024  # a file name handed to another front end is cut here (a gather's frame stays small)


@dataclass(frozen=True)
class _Seen:
    at: float  # time.time()
    raw_score: float
    threshold: float
    is_anomalous: bool
    model_version: str
    filename: str | None


class _Window:
    """The last ``size`` verdicts and how many of them are anomalous, in O(1) per image."""

    def __init__(self, size: int) -> None:
        self.verdicts: collections.deque[bool] = collections.deque(maxlen=size)
        self.anomalous = 0

    def add(self, anomalous: bool) -> None:
        if len(self.verdicts) == self.verdicts.maxlen:
            self.anomalous -= self.verdicts[0]
        self.verdicts.append(anomalous)
        self.anomalous += anomalous


class RecentView:
    """The recent images of one category, oldest first: one ring, or every front end's merged.
    ``front_ends``: (answered, of) for a multi-process gather, this front end included; fewer
    answered than there are: the view is partial."""

    def __init__(self, seen: Iterable[_Seen], front_ends: tuple[int, int] | None = None) -> None:
        self.seen = list(seen)
        self.front_ends = front_ends

    @property
    def partial(self) -> bool:
        return self.front_ends is not None and self.front_ends[0] < self.front_ends[1]

    def raw_scores(self, version: str) -> list[float]:
        """Raw scores of the recent images ``version`` scored (what an operator picks thresholds from)."""
        return [s.raw_score for s in self.seen if s.model_version == version]

    def scores(self, limit: int | None = None, threshold: float | None = None) -> list[RecentScore]:
        """Newest first; ``would_be_anomalous`` filled in when ``threshold`` is given."""
        return [RecentScore(at=datetime.fromtimestamp(s.at, timezone.utc), raw_score=s.raw_score,
                            threshold=s.threshold, is_anomalous=s.is_anomalous, model_version=s.model_version,
                            filename=s.filename,
                            would_be_anomalous=None if threshold is None else s.raw_score >= threshold)
                for s in self.seen[::-1][:limit]]

    def summary(self, version: str, threshold: float, current: float) -> RecentSummary:
        """How the recent images of ``version`` classify at ``threshold`` vs the ``current`` one.
        (Raw scores of another version are on another scale: not counted.)"""
        raws = self.raw_scores(version)
        at_new = sum(r >= threshold for r in raws)
        at_now = sum(r >= current for r in raws)
        changed = sum((r >= threshold) != (r >= current) for r in raws)
        return RecentSummary(threshold=threshold, images=len(raws), anomalous=at_new, anomalous_now=at_now,
                             changed=changed)


class RecentScores:
    """Per-category ring of recent scores plus the drift metrics. Event-loop only.

    ``peers``: a front end's link to the engine process (multi-process mode): this ring is
    handed to the other front ends' :meth:`gather` through it, and this one's gathers theirs."""

    def __init__(self, settings: Settings, metrics: ServiceMetrics, peers: EngineClient | None = None) -> None:
        self.capacity = settings.recent_scores
        # Each front end's share of the configured window: their sum, at /metrics, is the server's.
        self.window = math.ceil(settings.anomaly_rate_window / (settings.api_processes if peers else 1))
        self.front_ends = settings.api_processes if peers else 1
        self.metrics = metrics
        self._peers = peers
        self._rings: dict[str, collections.deque[_Seen]] = {}
        self._windows: dict[str, _Window] = {}
        if peers is not None:
            peers.collectors[_TOPIC] = self._export

    def observe(self, category: str, results: Sequence[ImageResult]) -> None:
        ring = self._rings.setdefault(category, collections.deque(maxlen=self.capacity))
        window = self._windows.setdefault(category, _Window(self.window))
        now = time.time()
        for r in results:
            ring.append(_Seen(now, r.raw_score, r.threshold, r.is_anomalous, r.model_version, r.filename))
            self.metrics.observe_score(category, r.score)
            window.add(r.is_anomalous)
        if results:
            self.metrics.set_anomaly_window(category, window.anomalous, len(window.verdicts))

    def view(self, category: str) -> RecentView:
        """This process's ring."""
        return RecentView(self._rings.get(category, ()))

    async def gather(self, category: str) -> RecentView:
        """The server's recent images: this process's ring, merged by time with every other
        front end's in multi-process mode, the newest ``capacity`` kept. A front end that does
        not answer (stuck, restarting, not replaced yet, no engine process) is left out, logged,
        and counted in the view's ``front_ends`` (answered of the configured number)."""
        local = self.view(category)
        if self._peers is None:
            return local
        try:
            got = await self._peers.collect(_TOPIC, {"category": category})
        except BatcherError as exc:  # EngineUnavailable: this front end's images only
            log.warning("recent scores of %s: this front end's only (%s)", category, exc)
            return RecentView(local.seen, (1, self.front_ends))
        # Of the configured number: a dead front end not replaced yet is not asked, yet missing.
        answered, of = 1 + got.answered, max(self.front_ends, 1 + got.asked)
        if answered < of:
            log.warning("recent scores of %s: %d of %d front ends answered", category, answered, of)
        seen = local.seen + [_Seen(*item) for item in got.items]
        seen.sort(key=lambda s: s.at)
        return RecentView(seen[-self.capacity:], (answered, of))

    def _export(self, args: dict[str, Any]) -> list[list[Any]]:
        """This ring, for another front end's :meth:`gather` (plain lists: they cross as JSON)."""
        return [[s.at, s.raw_score, s.threshold, s.is_anomalous, s.model_version,
                 None if s.filename is None else s.filename[:_FILENAME_CHARS]] for s in self._rings.get(str(args.get("category")), ())]

    # This process's ring (one process: the server's).
    def raw_scores(self, category: str, version: str) -> list[float]:
        return self.view(category).raw_scores(version)

    def scores(self, category: str, limit: int | None = None,
               threshold: float | None = None) -> list[RecentScore]:
        return self.view(category).scores(limit, threshold)

    def summary(self, category: str, version: str, threshold: float, current: float) -> RecentSummary:
        return self.view(category).summary(version, threshold, current)
