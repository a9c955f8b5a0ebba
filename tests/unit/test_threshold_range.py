"""The range of thresholds an operator may set without ``force`` (:func:`sane_range`)."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from models.manifest import Calibration, ScoreStats
from service.config import Settings
from service.pipeline.thresholds import ThresholdOutOfRange, ThresholdOverrides, sane_range

# brick's demo calibration: normals 2.2..3.0 (raw), threshold 2.63
BRICK = Calibration(score_output="image_score_log", method="target_fpr", threshold=2.63, score_min=2.22,
                    score_max=3.04, map_low=2.1, map_high=5.5, pixel_threshold=3.8,
                    normal_scores=ScoreStats(count=60, mean=2.2, std=0.26, min=1.63, p50=2.22, p95=2.58, p99=2.63,
                                             max=2.63))
NORMALS = [2.1 + i * 0.01 for i in range(40)]


def test_one_junk_image_does_not_widen_the_range() -> None:
    """A black frame scored 513: a threshold of 400 passed without force, which passes every
    real defect (they score 3..84)."""
    low, high = sane_range(BRICK, [*NORMALS, 513.29])
    assert high < 400 and low == pytest.approx(2.12 - 0.82)  # the third lowest normal
    assert sane_range(BRICK, [*NORMALS, 513.29, 139.27]) == (low, high)  # two are still outliers
    assert sane_range(BRICK, [*NORMALS, 513.29, 513.29, 513.29])[1] < 400  # the same image again is one


def test_a_cluster_of_recent_scores_widens_it() -> None:
    """Defects that score far above the calibration (3 or more) make a threshold between the
    normals and them sane: that is what the recent scores are for."""
    defects = [13.9, 25.7, 83.5]
    low, high = sane_range(BRICK, [*NORMALS, *defects])
    assert high == pytest.approx(13.9 + 0.82) and 10.0 < high
    assert sane_range(BRICK, [*NORMALS, *defects, float("nan"), float("inf")]) == (low, high)
    assert sane_range(BRICK, [-50.0, -40.0, -30.0, *NORMALS])[0] == pytest.approx(-30.0 - 0.82)


def test_a_put_past_a_single_outlier_is_refused(tmp_path: Path) -> None:
    overrides = ThresholdOverrides(Settings(model_store=tmp_path), None)
    with pytest.raises(ThresholdOutOfRange) as refused:
        asyncio.run(overrides.set("brick", "1", 400.0, calibration=BRICK, seen=[*NORMALS, 513.29]))
    assert refused.value.details["sane_max"] < 400
    assert not (tmp_path / "brick" / "1").exists()  # nothing written


def test_only_the_bounds_a_change_moves_are_held_to_the_range(tmp_path: Path) -> None:
    """A bound forced beyond the range stays where it is while the other one moves: the API
    carries the bound a body leaves out into the change, and that kept value was checked again,
    so with the NG bound forced to 100 (never NG without a person) a PUT of threshold 2.55 was
    refused 'threshold 100 is outside ...', naming a value the operator never sent, and the
    console's reset of the NG bound was refused over the ok bound it re-sends."""
    overrides = ThresholdOverrides(Settings(model_store=tmp_path), None)
    (tmp_path / "brick" / "1").mkdir(parents=True)

    async def scenario() -> None:
        await overrides.set("brick", "1", 2.63, calibration=BRICK, ng_threshold=100.0, force=True)
        moved, _ = await overrides.set("brick", "1", 2.55, calibration=BRICK, ng_threshold=100.0)  # ng kept
        assert (moved.threshold, moved.ng_threshold) == (2.55, 100.0)
        await overrides.set("brick", "1", 1.0, calibration=BRICK, force=True)
        back, _ = await overrides.set("brick", "1", 1.0, calibration=BRICK, ng_threshold=BRICK.ng_bound)
        assert (back.threshold, back.ng_threshold) == (1.0, BRICK.ng_bound)
        with pytest.raises(ThresholdOutOfRange) as refused:  # a new value is still checked, and named
            await overrides.set("brick", "1", 1.0, calibration=BRICK, ng_threshold=100.0)
        assert refused.value.details["field"] == "ng_threshold"
        assert str(refused.value).startswith("ng_threshold 100 is outside")

    asyncio.run(scenario())
