"""Recent scores of a multi-process server (service/pipeline/recent.py): the admin routes read
every front end's ring merged by time, and each front end's anomaly-rate window is its share
of the configured one. The relay itself is tested in tests/integration/test_multiprocess_recent.py."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from typing import Any

import pytest

from service.config import Settings
from service.metrics import ServiceMetrics
from service.pipeline.engine_client import Collected, EngineUnavailable
from service.pipeline.recent import RecentScores
from service.schemas import ImageResult


class Peers:
    """What RecentScores uses of a front end's EngineClient: the other front ends' items."""

    def __init__(self, answer: Collected | Exception) -> None:
        self.collectors: dict[str, Any] = {}
        self.answer = answer
        self.asked: list[tuple[str, dict[str, Any]]] = []

    async def collect(self, topic: str, args: dict[str, Any]) -> Collected:
        self.asked.append((topic, args))
        if isinstance(self.answer, Exception):
            raise self.answer
        return self.answer


def result(raw: float, name: str, version: str = "1") -> ImageResult:
    return ImageResult.model_construct(raw_score=raw, score=raw / 2, threshold=1.0, is_anomalous=raw >= 1.0,
                                       model_version=version, filename=name)


def settings(**overrides: Any) -> Settings:
    return Settings(model_store=Path("."), **{"recent_scores": 4, "anomaly_rate_window": 5, **overrides})


def test_gather_merges_every_front_ends_ring_by_time_and_keeps_the_capacity() -> None:
    now = time.time()
    theirs = [[now - 60, 0.1, 1.0, False, "1", "old"], [now + 60, 2.0, 1.0, True, "1", "new"],
              [now + 61, 0.5, 1.0, False, "0", "other version"]]
    peers = Peers(Collected(theirs, asked=1, answered=1))
    recent = RecentScores(settings(api_processes=2), ServiceMetrics(), peers=peers)  # type: ignore[arg-type]
    recent.observe("brick", [result(0.2, "a"), result(1.5, "b")])
    view = asyncio.run(recent.gather("brick"))
    assert peers.asked == [("recent", {"category": "brick"})]
    # Newest first, the two rings interleaved by time; the oldest of five falls out (capacity 4).
    assert [s.filename for s in view.scores()] == ["other version", "new", "b", "a"]
    assert view.raw_scores("1") == [0.2, 1.5, 2.0]
    summary = view.summary("1", threshold=0.1, current=1.0)
    assert (summary.images, summary.anomalous, summary.anomalous_now, summary.changed) == (3, 3, 2, 1)
    assert [s.filename for s in recent.scores("brick")] == ["b", "a"]  # this process's own ring


def test_each_front_end_hands_its_ring_to_the_others_with_names_cut() -> None:
    peers = Peers(Collected([], 0, 0))
    recent = RecentScores(settings(api_processes=2), ServiceMetrics(), peers=peers)  # type: ignore[arg-type]
    recent.observe("brick", [result(0.3, "x" * 5000), result(1.2, None)])  # type: ignore[arg-type]
    rows = peers.collectors["recent"]({"category": "brick"})
    assert [row[1:] for row in rows] == [[0.3, 1.0, False, "1", "x" * 1024], [1.2, 1.0, True, "1", None]]
    assert peers.collectors["recent"]({"category": "unknown"}) == []


def test_without_an_engine_process_the_gather_is_this_front_ends_ring(caplog: pytest.LogCaptureFixture) -> None:
    recent = RecentScores(settings(api_processes=2), ServiceMetrics(),
                          peers=Peers(EngineUnavailable("restarting")))  # type: ignore[arg-type]
    recent.observe("brick", [result(0.2, "a")])
    view = asyncio.run(recent.gather("brick"))
    assert [s.filename for s in view.scores()] == ["a"]
    assert "this front end's only" in caplog.text
    assert view.partial and view.front_ends == (1, 2)


@pytest.mark.parametrize("asked, answered, front_ends, partial", [
    (1, 1, (2, 2), False),
    (1, 0, (1, 2), True),  # stuck past the engine process's 2 s
    (0, 0, (1, 2), True),  # a dead front end not replaced yet: not asked, yet missing
])
def test_a_gather_counts_the_front_ends_it_holds(asked: int, answered: int, front_ends: tuple[int, int],
                                                partial: bool) -> None:
    recent = RecentScores(settings(api_processes=2), ServiceMetrics(),
                          peers=Peers(Collected([], asked, answered)))  # type: ignore[arg-type]
    view = asyncio.run(recent.gather("brick"))
    assert (view.front_ends, view.partial) == (front_ends, partial)
    one = RecentScores(settings(), ServiceMetrics())
    assert (asyncio.run(one.gather("brick")).front_ends, asyncio.run(one.gather("brick")).partial) == (None, False)


def test_a_front_ends_window_is_its_share_of_the_configured_one() -> None:
    """Two front ends of a window of 5: 3 each, so that the sum /metrics divides by is ~5
    (one process: all 5)."""
    def window(recent: RecentScores) -> int:
        recent.observe("brick", [result(1.5, str(i)) for i in range(9)])
        return len(recent._windows["brick"].verdicts)

    assert window(RecentScores(settings(api_processes=2), ServiceMetrics(), peers=Peers(Collected([], 0, 0)))) == 3  # type: ignore[arg-type]
    assert window(RecentScores(settings(), ServiceMetrics())) == 5
    single = RecentScores(settings(), ServiceMetrics())
    single.observe("brick", [result(1.5, "a"), result(0.5, "b"), result(0.5, "c"), result(0.5, "d")])
    assert single.metrics.anomaly_rate.labels("brick")._value.get() == pytest.approx(0.25)
