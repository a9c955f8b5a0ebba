"""A front end through the engine core (MSFLOW_API_PROCESSES > 1), in-process: the engine core
and a front end's runtime on one event loop. It answers as the plain runtime does, a bad
submit fails alone, a front end's lane keeps a bounded list of its images in flight, and a
scrape reads the GPU's memory in the engine process, where the engines' CUDA context is.
"""

from __future__ import annotations

import asyncio
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from harness import CATEGORY
from multiprocess_fixtures import RecordedChannel
from service.config import Settings
from service.engine_core import EngineCore, FrontEnd
from service.ipc import frames
from service.ipc.slab import Slab
from service.metrics_buffer import FLUSH_TOPIC
from models.manifest import Manifest
from service.metrics import ServiceMetrics
from service.pipeline.engine_client import EngineClient, RemoteEngine
from service.pipeline.remote_batcher import RemoteBatcher
from service.pipeline.item import InspectedImage
from service.pipeline.runtime import PipelineRuntime
from service.schemas import InspectOptions, Upload


def test_a_front_end_through_the_engine_core_answers_like_the_local_engine(model_store: Path,
                                                                           good_images: list[Path]) -> None:
    paths = good_images[:3]

    def records() -> list[InspectedImage]:
        return [InspectedImage.received(i, Upload(filename=p.name, data=p.read_bytes())) for i, p in enumerate(paths)]

    async def answers(rt: PipelineRuntime) -> tuple[list[InspectedImage], list[np.ndarray]]:
        """The answers, and the maps as the postprocess read them (a front end reads them in
        its slots, given back once the answer is made)."""
        await rt.registry.load_all()
        items, maps = records(), []
        postprocess = rt.postprocess

        async def reading(lane: Any, done: list[InspectedImage], *args: Any, **kwargs: Any) -> None:
            maps.extend(item.score_map.copy() for item in done)
            await postprocess(lane, done, *args, **kwargs)
        rt.postprocess = reading  # type: ignore[method-assign]
        with rt.pin(CATEGORY) as lane:
            await rt.run(lane, items, InspectOptions(), time.monotonic() + 30, time.monotonic())
        return items, maps

    async def main() -> None:
        base = dict(model_store=model_store, device="cpu", intra_op_threads=1, decode_threads=2, store_poll_s=0,
                    max_batch_size=4, max_queue_delay_ms=20, engine="onnx")
        local = PipelineRuntime(Settings(**base), None)
        local.open()
        try:
            expected, expected_maps = await answers(local)
        finally:
            await local.close()
        with tempfile.TemporaryDirectory() as tmp:
            sock = Path(tmp) / "engine.sock"
            core = EngineCore(Settings(**base))
            serving = asyncio.create_task(core.serve(sock))
            remote = PipelineRuntime(Settings(**base, engine_socket=sock), None,
                                     engine_link=EngineClient(Settings(**base, engine_socket=sock), sock))
            remote.open()
            try:
                got, got_maps = await answers(remote)
                with remote.pin(CATEGORY) as lane:
                    assert isinstance(lane.batcher, RemoteBatcher)
                    assert lane.model.engine.name == "onnxruntime-cpu"
                    pool = lane.batcher.client.pool(CATEGORY, lane.model.manifest.input_size)
                    assert pool.free == pool.capacity  # every map's slot given back
                assert all(item.anomaly_map is None for item in got)  # no view of a reused slot is left
                assert len(core.hosted) == 1 and len(core.frontends) == 1
            finally:
                await remote.close()
                core.stop()
                await serving
        assert len(got_maps) == len(expected_maps) == len(paths)
        for mine, theirs, my_map, their_map in zip(got, expected, got_maps, expected_maps):
            assert mine.answer.raw_score == pytest.approx(theirs.answer.raw_score, rel=1e-5, abs=1e-5)
            assert mine.answer.verdict == theirs.answer.verdict
            assert np.allclose(my_map, their_map, rtol=1e-5, atol=1e-5)
            assert mine.answer.batch_size >= 1

    asyncio.run(main())


def test_a_bad_submit_fails_alone_and_an_unknown_version_is_not_loaded(model_store: Path) -> None:
    """A slot outside the front end's slab is refused before the batch (which would fail
    every front end's images in it), a handle the engine process does not hold answers
    not_loaded, and a good submit in the same turn is answered ok."""
    async def main() -> None:
        core = EngineCore(Settings(model_store=model_store, device="cpu", engine="null", max_batch_size=4,
                                   max_queue_delay_ms=1, store_poll_s=0))
        hosted = await core.engines.load(str(model_store / CATEGORY / "1"))
        channel = RecordedChannel()
        frontend = FrontEnd(1, channel)  # type: ignore[arg-type]
        size = hosted.engine.manifest.input_size
        slab = frontend.slabs[1] = Slab.create(size, 2, "test-bad-submit")
        try:
            deadline = time.monotonic() + 30
            core._handle_frame(frontend, frames.pack_submit(1, hosted.handle, 1, deadline, [5]))  # no slot 5
            core._handle_frame(frontend, frames.pack_submit(2, hosted.handle + 1, 1, deadline, [0]))
            core._handle_frame(frontend, frames.pack_submit(3, hosted.handle, 1, deadline, [0, 1]))
            core._handle_frame(frontend, b"\x09junk")  # logged and dropped; the channel stays up
            while len(channel.frames) < 3:
                channel.arrived.clear()
                await asyncio.wait_for(channel.arrived.wait(), 10)
            answers = dict(frames.unpack_result(f) for f in channel.frames)
            assert [o.code for o in answers[1]] == [frames.ENGINE_ERROR] and "slot 5" in answers[1][0].message
            assert [o.code for o in answers[2]] == [frames.NOT_LOADED]
            assert [o.code for o in answers[3]] == [frames.OK, frames.OK]
            assert all(o.batch_size == 2 for o in answers[3]) and (slab.output(1) == 0).all()
        finally:
            await hosted.batcher.drain(5)
            slab.close()

    asyncio.run(main())


def test_a_lanes_in_flight_list_stays_bounded_and_drain_waits_for_it(model_store: Path) -> None:
    """A front end's lane remembers its images in flight for ``drain`` without a callback per
    image: the list is pruned as it grows, so ten times the lane's slots, one at a time, leave
    at most twice its slots in it; drain returns once the last image is answered."""
    async def main() -> None:
        settings = dict(model_store=model_store, device="cpu", engine="null", max_batch_size=4,
                        max_queue_delay_ms=1, max_queue_size=4, store_poll_s=0)
        version_dir = model_store / CATEGORY / "1"
        with tempfile.TemporaryDirectory() as tmp:
            sock = Path(tmp) / "engine.sock"
            core = EngineCore(Settings(**settings))
            serving = asyncio.create_task(core.serve(sock))
            client = EngineClient(Settings(**settings, engine_socket=sock), sock)
            client.start()
            try:
                hold, answer = await client.acquire(version_dir)
                manifest = Manifest.read(version_dir)
                engine = RemoteEngine(client, version_dir, manifest, str(answer["name"]),
                                      int(answer["max_batch_size"]), hold)
                lane = RemoteBatcher(client, engine, 0.001, ServiceMetrics())
                image = np.zeros((manifest.input_size, manifest.input_size, 3), dtype=np.uint8)
                longest = 0
                for _ in range(10 * lane.max_queue_size):
                    (future,) = lane.submit_many([image], time.monotonic() + 30)
                    longest = max(longest, len(lane._in_flight))
                    assert (await future).batch_size == 1
                assert 0 < longest <= 2 * lane.max_queue_size, longest
                last = lane.submit_many([image, image], time.monotonic() + 30)
                await asyncio.wait_for(lane.drain(), 10)
                assert all(f.done() and not f.cancelled() for f in last) and lane.depth == 0
            finally:
                await client.close()
                core.stop()
                await serving

    asyncio.run(main())


class _GatherChannel:
    """A front end's channel as the engine process sees it, keeping the messages it is sent."""

    def __init__(self) -> None:
        self.messages: list[dict[str, object]] = []

    def send(self, message: dict[str, object]) -> None:
        self.messages.append(message)


def test_a_scrape_reads_gpu_memory_where_the_engines_run(model_store: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """In multi-process mode the engine process holds the CUDA context (TensorRT, torch), and
    the front end that serves ``/metrics`` none: msflow_gpu_memory_bytes was read only by the
    process serving the scrape, so with MSFLOW_API_PROCESSES > 1 the dashboard's "GPU memory"
    panel stayed empty. A scrape's flush (the gather every front end's ``/metrics`` sends) now
    reads it in the engine process too. This host has no GPU: torch's CUDA queries report one
    device of 80 GiB, 60 GiB free."""
    torch = pytest.importorskip("torch")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_initialized", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda index: (60 << 30, 80 << 30))

    async def main() -> None:
        core = EngineCore(Settings(model_store=model_store, device="cpu", engine="null", store_poll_s=0))
        channel = _GatherChannel()
        core._handle(FrontEnd(1, channel), {"op": "gather", "rid": 4, "topic": FLUSH_TOPIC}, [])  # type: ignore[arg-type]
        assert [m["op"] for m in channel.messages] == ["gathered"]
        got = {s.labels["kind"]: s.value for family in core.metrics.registry.collect() for s in family.samples
               if s.name == "msflow_gpu_memory_bytes" and s.labels["device"] == "cuda:0"}
        assert got == {"used": 20 << 30, "total": 80 << 30}

    asyncio.run(main())
