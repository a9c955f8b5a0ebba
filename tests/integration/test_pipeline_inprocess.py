"""The pipeline in-process on the real engine of the trained test model, no server: the
runtime's inspect path (decode -> batcher -> postprocess), batching across callers, failures
that stay with their caller, the API's ServiceState on top of it (and which reloads it
counts), and the registry's discover/refresh on a copied store.

In-process but in tests/integration, not tests/unit: they need the session's model store,
which trains a tiny model (about 80 s on 2 cores), over the unit layer's one-minute budget.
"""

from __future__ import annotations

import asyncio
import base64
import io
import shutil
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image

from harness import CATEGORY, copy_version, engine_run_replaced, failing_run, fake_version
from pipeline_fixtures import loaded_runtime, settings_for
from service.pipeline.decode import UndecodableImage
from service.pipeline.item import InspectedImage
from service.pipeline.loaded_model import LoadedModel
from service.pipeline.registry import ModelRegistry
from service.pipeline.registry_errors import ModelNotLoaded, UnknownCategory, VersionNotFound
from service.pipeline.postprocess import NonFiniteOutput
from service.pipeline.runtime import PipelineRuntime
from service.pipeline.state import ServiceState
from service.schemas import HeatmapLink, HeatmapMode, InspectOptions, Upload


def records(paths: list[Path]) -> list[InspectedImage]:
    return [InspectedImage.received(i, Upload(filename=p.name, data=p.read_bytes())) for i, p in enumerate(paths)]


def test_inspect_path_batches_two_callers_and_fills_every_record(model_store: Path, good_images: list[Path],
                                                                 visible_test_images: dict[str, list[Path]]) -> None:
    goods = records(good_images[:2])
    defects = records([visible_test_images["hole"][0], visible_test_images["foreign"][0]])

    async def main() -> None:
        async with loaded_runtime(model_store) as rt:
            with rt.pin(CATEGORY) as lane:
                started, deadline = time.monotonic(), time.monotonic() + 30
                await asyncio.gather(rt.run(lane, goods, InspectOptions(), deadline, started),
                                     rt.run(lane, defects, InspectOptions(heatmap=HeatmapMode.url), deadline, started))
                for item in defects:  # heatmap=url: the link store of this process holds the PNG
                    link = item.answer.heatmap
                    assert isinstance(link, HeatmapLink)
                    assert await rt.links.get(link.url.split("/")[-1][:-4]) == item.heatmap_png
                    assert item.durable is False  # no Redis: memory only, never cached

    asyncio.run(main())
    for item in goods + defects:
        r = item.answer
        assert item.stage == "answered" and item.engine and r.model_version == "1"
        assert item.batch_size == r.batch_size == 4  # the two callers' images shared one engine batch
        assert item.anomaly_map is not None and item.anomaly_map.shape == (128, 128)
        assert r.is_anomalous == (r.raw_score >= r.threshold) and (r.score >= 0.5) == r.is_anomalous
        assert (r.image_size.width, r.image_size.height) == item.size
        assert r.timings_ms.decode > 0 and r.timings_ms.engine > 0 and r.timings_ms.total >= r.timings_ms.engine
    for i, item in enumerate(goods):
        assert (item.answer.index, item.answer.filename) == (i, good_images[i].name)
        heat = item.answer.heatmap
        assert heat is not None and not isinstance(heat, HeatmapLink)
        assert Image.open(io.BytesIO(base64.b64decode(heat.data))).size == (128, 128)
    assert min(d.answer.raw_score for d in defects) > max(g.answer.raw_score for g in goods)
    assert any(d.answer.regions for d in defects)


def test_a_failure_stays_with_its_caller(model_store: Path, good_images: list[Path]) -> None:
    truncated = good_images[2].read_bytes()
    bad = [InspectedImage.received(0, Upload("fine.png", good_images[3].read_bytes())),
           InspectedImage.received(1, Upload("cut.png", truncated[: len(truncated) // 2]))]
    fine = records(good_images[4:5])
    batch_a, batch_b = records(good_images[:2]), records(good_images[2:3])

    async def main() -> None:
        async with loaded_runtime(model_store) as rt:
            with rt.pin(CATEGORY) as lane:
                deadline = time.monotonic() + 30
                outcomes = await asyncio.gather(rt.run(lane, bad, InspectOptions(), deadline, time.monotonic()),
                                                rt.run(lane, fine, InspectOptions(), deadline, time.monotonic()),
                                                return_exceptions=True)
                assert isinstance(outcomes[0], UndecodableImage) and outcomes[1] is None
                assert outcomes[0].details == {"index": 1, "filename": "cut.png"}
                # An engine failure fails every image of its batch, and only that batch.
                with engine_run_replaced(lane.model.engine, failing_run("device lost")):
                    failed = await asyncio.gather(
                        rt.run(lane, batch_a, InspectOptions(), deadline, time.monotonic()),
                        rt.run(lane, batch_b, InspectOptions(), deadline, time.monotonic()), return_exceptions=True)
                assert [str(e) for e in failed] == ["device lost", "device lost"]
                await rt.run(lane, batch_b, InspectOptions(), deadline, time.monotonic())  # the lane goes on
            with pytest.raises(UnknownCategory):
                with rt.pin("nope"):
                    pass

    asyncio.run(main())
    assert [item.stage for item in bad] == ["decoded", "received"] and fine[0].stage == "answered"
    assert [item.stage for item in batch_a] == ["decoded", "decoded"]  # decoded, never scored
    assert batch_b[0].stage == "answered"


def test_small_requests_work_on_the_loop_with_the_threads_answers(model_store: Path,
                                                                  visible_test_images: dict[str, list[Path]]) -> None:
    """A small request decodes and renders on the event loop (service.pipeline.placement);
    the answer is the one the decode threads give, heatmap bytes and regions included."""
    paths = [visible_test_images["hole"][0]]
    options = InspectOptions(heatmap=HeatmapMode.inline)

    async def answer(**overrides: Any) -> tuple[InspectedImage, dict[str, float]]:
        async with loaded_runtime(model_store, **overrides) as rt:
            item, = records(paths)
            with rt.pin(CATEGORY) as lane:
                await rt.run(lane, [item], options, time.monotonic() + 30, time.monotonic())
            placement = {where: rt.metrics.work_placement.labels(where)._value.get() for where in ("loop", "threads")}
            return item, placement

    on_loop, loop_counts = asyncio.run(answer())
    in_threads, thread_counts = asyncio.run(answer(loop_work_pixels=0))
    assert loop_counts == {"loop": 1, "threads": 0} and thread_counts == {"loop": 0, "threads": 1}
    assert on_loop.answer.raw_score == pytest.approx(in_threads.answer.raw_score, abs=1e-6)
    assert on_loop.heatmap_png == in_threads.heatmap_png and on_loop.answer.regions == in_threads.answer.regions
    assert on_loop.answer.regions  # a defect: the regions were found, on the loop


def test_service_state_answers_through_the_same_path(model_store: Path, good_images: list[Path]) -> None:
    """The API's state (no Redis here: no cache) gives the records of the runtime's path,
    and the image/png answer renders the heatmap whatever ``heatmap`` says."""
    uploads = [Upload(p.name, p.read_bytes()) for p in good_images[:2]]
    direct = records(good_images[:2])

    async def main() -> tuple[list[InspectedImage], list[InspectedImage]]:
        state = ServiceState(settings_for(model_store))
        await state.start()
        rt = PipelineRuntime(settings_for(model_store), None)
        rt.open()
        try:
            await rt.registry.load_all()
            while not state.registry.ready:
                await asyncio.sleep(0.05)
            with state.pin(CATEGORY) as lane:
                deadline = time.monotonic() + 30
                items = await state.inspect(lane, uploads, InspectOptions(), deadline, time.monotonic())
                png = await state.inspect(lane, uploads[:1], InspectOptions(heatmap=HeatmapMode.none), deadline,
                                          time.monotonic(), wants_png=True)
            with rt.pin(CATEGORY) as lane:
                await rt.run(lane, direct, InspectOptions(), time.monotonic() + 30, time.monotonic())
            assert state.recent.scores(CATEGORY)  # the replica's recent scores saw them
            return items, png
        finally:
            await state.stop()
            await rt.close()

    items, png = asyncio.run(main())
    for got, want in zip(items, direct):
        assert got.answer.raw_score == pytest.approx(want.answer.raw_score, abs=1e-5)
        assert set(got.answer.model_dump()) == set(want.answer.model_dump()) and not got.cached
    assert png[0].heatmap_png is not None and Image.open(io.BytesIO(png[0].heatmap_png)).size == (128, 128)


@pytest.mark.parametrize("bad", ["score", "map", "map-no-heatmap"])
def test_non_finite_output_is_an_error_never_a_verdict(model_store: Path, good_images: list[Path], bad: str) -> None:
    """A NaN score would compare False with the threshold, i.e. "normal": it must fail the
    request instead, count in a metric, mark the model unhealthy and reach no drift sample.
    The same for an infinite value in a map (checked in the decode threads, not the loop),
    whether the answer renders a heatmap or not."""
    uploads = [Upload(p.name, p.read_bytes()) for p in good_images[:2]]
    options = InspectOptions(heatmap=HeatmapMode.none) if bad == "map-no-heatmap" else InspectOptions()

    def second_image_broken(real_run: Any) -> Any:
        def run(batch: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
            scores, maps = real_run(batch)
            scores, maps = np.array(scores, np.float32), np.array(maps, np.float32)
            if len(batch) > 1:
                if bad == "score":
                    scores[1] = np.nan
                else:
                    maps[1, 3, 5] = np.inf
            return scores, maps
        return run

    async def main() -> None:
        state = ServiceState(settings_for(model_store))
        await state.start()
        try:
            while not state.registry.ready:
                await asyncio.sleep(0.05)
            with state.pin(CATEGORY) as lane:
                engine = lane.model.engine
                with engine_run_replaced(engine, second_image_broken), pytest.raises(NonFiniteOutput) as caught:
                    await state.inspect(lane, uploads, options, time.monotonic() + 30, time.monotonic())
            assert caught.value.details["index"] == 1 and caught.value.code == "non_finite_output"
            assert state.recent.scores(CATEGORY) == []  # no drift sample, no verdict counted
            assert state.metrics.nonfinite.labels(CATEGORY, engine.name)._value.get() == 1
            assert CATEGORY in state.registry.unhealthy
            assert "non-finite" in state.registry.unhealthy[CATEGORY]
        finally:
            await state.stop()

    asyncio.run(main())


# ---------------------------------------------------------------------- registry
def test_registry_discovers_and_follows_the_store(model_store: Path, tmp_path: Path) -> None:
    store = tmp_path / "store"
    shutil.copytree(model_store, store)
    (store / "not a category").mkdir()
    (store / "empty").mkdir()  # no version: not a category
    swaps: list[LoadedModel] = []

    async def main() -> None:
        registry = ModelRegistry(settings_for(store), on_swap=swaps.append)
        assert registry.discover() == [CATEGORY]
        assert registry.status() == {CATEGORY: "loading"} and not registry.ready
        with pytest.raises(ModelNotLoaded):
            registry.get(CATEGORY)
        await registry.load_all()
        assert registry.serving() == {CATEGORY: "1"} and registry.ready
        assert await registry.refresh() == []  # nothing new

        src = store / CATEGORY / "1"
        (store / CATEGORY / ".9-abcd").mkdir()  # an export in progress is never a version
        shutil.copy(src / "manifest.json", store / CATEGORY / ".9-abcd" / "manifest.json")
        copy_version(src, store / CATEGORY / "2", CATEGORY, "2")
        (store / "gravel").mkdir()
        copy_version(src, store / "gravel" / "1", "gravel", "1")
        assert sorted(await registry.refresh()) == [CATEGORY, "gravel"]
        assert registry.serving() == {CATEGORY: "2", "gravel": "1"}
        assert registry.status() == {CATEGORY: "serving 2", "gravel": "serving 1"}
        assert [(m.category, m.version) for m in swaps] == [(CATEGORY, "1"), (CATEGORY, "2"), ("gravel", "1")]

        # A broken newer version: recorded, the old one keeps serving, not retried until a newer one.
        copy_version(src, store / CATEGORY / "3", CATEGORY, "3")
        (store / CATEGORY / "3" / "model.onnx").write_bytes(b"garbage")
        assert await registry.refresh() == [] and registry.serving()[CATEGORY] == "2"
        assert await registry.refresh() == []
        # An operator's explicit version pins the category: refresh leaves it there.
        await registry.reload(CATEGORY, "1")
        copy_version(src, store / CATEGORY / "4", CATEGORY, "4")
        assert await registry.refresh() == [] and registry.get(CATEGORY).pinned
        assert registry.describe(CATEGORY).available_versions == ["1", "2", "3", "4"]
        assert np.isfinite(registry.get(CATEGORY).warmup_ms)

    asyncio.run(main())


def test_only_reloads_of_known_categories_are_counted(tmp_path: Path) -> None:
    """An admin reload names its category in the path: a name the store does not hold is
    refused (404) and not counted, or each name sent would become a metric series; a failed
    reload of a category of the store is counted."""
    store = tmp_path / "store"
    fake_version(store, CATEGORY)

    async def main() -> None:
        state = ServiceState(settings_for(store, engine="null"))
        for name in ("nosuch", "nosuch2", "../etc"):
            with pytest.raises(UnknownCategory):
                await state.reload(name, None)
        with pytest.raises(VersionNotFound):
            await state.reload(CATEGORY, "9")
        counted = {(s.labels["category"], s.labels["outcome"]): s.value
                   for family in state.metrics.registry.collect() for s in family.samples
                   if s.name == "msflow_model_reloads_total"}
        assert counted == {(CATEGORY, "failed"): 1.0}

    asyncio.run(main())
