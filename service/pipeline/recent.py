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
"""

from __future__ import annotations

import collections
import time
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timezone

from service.config import Settings
from service.metrics import ServiceMetrics
from service.schemas import ImageResult, RecentScore, RecentSummary


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

    def add(self, anomalous: bool) -> float:
        if len(self.verdicts) == self.verdicts.maxlen:
            self.anomalous -= self.verdicts[0]
        self.verdicts.append(anomalous)
        self.anomalous += anomalous
        return self.anomalous / len(self.verdicts)


class RecentScores:
    """Per-category ring of recent scores plus the drift metrics. Event-loop only."""

    def __init__(self, settings: Settings, metrics: ServiceMetrics) -> None:
        self.capacity = settings.recent_scores
        self.window = settings.anomaly_rate_window
        self.metrics = metrics
        self._rings: dict[str, collections.deque[_Seen]] = {}
        self._windows: dict[str, _Window] = {}

    def observe(self, category: str, results: Sequence[ImageResult]) -> None:
        ring = self._rings.setdefault(category, collections.deque(maxlen=self.capacity))
        window = self._windows.setdefault(category, _Window(self.window))
        now = time.time()
        for r in results:
            ring.append(_Seen(now, r.raw_score, r.threshold, r.is_anomalous, r.model_version, r.filename))
            self.metrics.observe_score(category, r.score)
            rate = window.add(r.is_anomalous)
        if results:
            self.metrics.set_anomaly_rate(category, rate)

    def raw_scores(self, category: str, version: str) -> list[float]:
        """Raw scores of the recent images ``version`` scored (what an operator picks thresholds from)."""
        return [s.raw_score for s in self._rings.get(category, ()) if s.model_version == version]

    def scores(self, category: str, limit: int | None = None,
               threshold: float | None = None) -> list[RecentScore]:
        """Newest first; ``would_be_anomalous`` filled in when ``threshold`` is given."""
        ring = list(self._rings.get(category, ()))[::-1][:limit]
        return [RecentScore(at=datetime.fromtimestamp(s.at, timezone.utc), raw_score=s.raw_score,
                            threshold=s.threshold, is_anomalous=s.is_anomalous, model_version=s.model_version,
                            filename=s.filename,
                            would_be_anomalous=None if threshold is None else s.raw_score >= threshold)
                for s in ring]

    def summary(self, category: str, version: str, threshold: float, current: float) -> RecentSummary:
        """How the recent images of ``version`` classify at ``threshold`` vs the ``current`` one.
        (Raw scores of another version are on another scale: not counted.)"""
        raws = [s.raw_score for s in self._rings.get(category, ()) if s.model_version == version]
        at_new = sum(r >= threshold for r in raws)
        at_now = sum(r >= current for r in raws)
        changed = sum((r >= threshold) != (r >= current) for r in raws)
        return RecentSummary(threshold=threshold, images=len(raws), anomalous=at_new, anomalous_now=at_now,
                             changed=changed)
