"""A front end's submit that names a slab of another size than the engine it names: refused
before the batch, like a slot outside the slab. Every front end feeds the same batcher, so
one such request in a batch failed all of it (``np.stack`` of inputs of two shapes): three
requests sharing a batch with it answered ``ValueError: all input arrays must have the same
shape``, the good ones too. The engine core runs in this process, with the null engine."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

from harness import fake_version
from multiprocess_fixtures import RecordedChannel
from service.config import Settings
from service.engine_core import EngineCore, FrontEnd
from service.ipc import frames
from service.ipc.slab import Slab

SIZE = 32  # the engine's input side (fake_version's manifest)


def test_a_slab_of_another_size_fails_its_request_alone(tmp_path: Path) -> None:
    async def main() -> None:
        version_dir = fake_version(tmp_path / "store", "aaa", size=SIZE)
        # A window long enough that every submit below shares one batch.
        core = EngineCore(Settings(model_store=tmp_path / "store", device="cpu", engine="null", max_batch_size=8,
                                   max_queue_delay_ms=50, store_poll_s=0))
        hosted = await core.engines.load(str(version_dir))
        channel = RecordedChannel()
        frontend = FrontEnd(1, channel)  # type: ignore[arg-type]
        slabs = [frontend.slabs.setdefault(1, Slab.create(SIZE, 4, "test-right-size")),
                 frontend.slabs.setdefault(2, Slab.create(SIZE // 2, 4, "test-other-size"))]
        try:
            deadline = time.monotonic() + 30
            core._handle_frame(frontend, frames.pack_submit(1, hosted.handle, 1, deadline, [0]))
            core._handle_frame(frontend, frames.pack_submit(2, hosted.handle, 2, deadline, [0]))  # one image
            core._handle_frame(frontend, frames.pack_submit(3, hosted.handle, 2, deadline, [1, 2]))  # two
            core._handle_frame(frontend, frames.pack_submit(4, hosted.handle, 1, deadline, [1, 2]))
            while len(channel.frames) < 4:
                channel.arrived.clear()
                await asyncio.wait_for(channel.arrived.wait(), 10)
            answers = dict(frames.unpack_result(f) for f in channel.frames)
            assert [o.code for o in answers[1]] == [frames.OK]
            assert [o.code for o in answers[4]] == [frames.OK, frames.OK]
            assert answers[1][0].batch_size == answers[4][0].batch_size == 3  # the good ones, in one batch
            for rid, count in ((2, 1), (3, 2)):
                assert [o.code for o in answers[rid]] == [frames.ENGINE_ERROR] * count, answers[rid]
                assert f"{SIZE // 2}x{SIZE // 2}" in answers[rid][0].message and "test-other-size" in answers[rid][0].message
        finally:
            await hosted.batcher.drain(5)
            for slab in slabs:
                slab.close()

    asyncio.run(main())
