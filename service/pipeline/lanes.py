"""One batcher per model version in use (:class:`Lane`), and letting go of the old ones.

A request or a batch of jobs pins a lane (:meth:`service.pipeline.runtime.PipelineRuntime.pin`)
and uses only it. When a version stops serving (a reload's swap, a failed follow, the store
watch retiring its category) its lanes retire: requests and jobs already pinned to one
finish there, and its batcher drains once the last of them is done; new ones get the new
lane, or none.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from dataclasses import dataclass, field

from service.config import Settings
from service.metrics import ServiceMetrics
from service.pipeline.batch_queue import BatchQueue
from service.pipeline.batcher import Batcher, engine_runner
from service.pipeline.engine_client import EngineClient, RemoteEngine
from service.pipeline.loaded_model import LoadedModel
from service.pipeline.remote_batcher import RemoteBatcher


@dataclass
class Lane:
    """One loaded model version and its batcher. A request or a batch of jobs pins a lane
    (:meth:`~service.pipeline.runtime.PipelineRuntime.pin`) and uses only it; a reload gives the new version a new
    lane, and the old one is drained once its last user is done."""

    model: LoadedModel
    batcher: BatchQueue  # a local Batcher, or a RemoteBatcher in a front end of the engine process
    users: int = 0
    retired: bool = field(default=False)
    on_drained: Callable[[], None] | None = None  # once retired and drained


class Lanes:
    """The lanes of the versions in use, by model, and their drains."""

    def __init__(self, settings: Settings, metrics: ServiceMetrics, engine_link: EngineClient | None) -> None:
        self.settings = settings
        self.metrics = metrics
        self.engine_link = engine_link
        self._lanes: dict[int, Lane] = {}  # by id(LoadedModel)
        self._draining: dict[asyncio.Task[None], LoadedModel] = {}  # drains under way -> the model drained

    def lane(self, model: LoadedModel) -> Lane:
        lane = self._lanes.get(id(model))
        if lane is None:
            # Created on first use, on the running loop. Not refused while only readiness is
            # down (shutdown_delay_s): load balancers may still route here until they notice.
            s, engine = self.settings, model.engine
            batcher: BatchQueue
            if self.engine_link is not None and isinstance(engine, RemoteEngine):
                batcher = RemoteBatcher(self.engine_link, engine, s.max_queue_delay_ms / 1e3, self.metrics)
            else:
                batcher = Batcher(model.category, engine_runner(engine), label=engine.name,
                                  max_batch_size=max(1, min(s.max_batch_size, int(engine.max_batch_size))),
                                  max_queue_delay_s=s.max_queue_delay_ms / 1e3, max_queue_size=s.max_queue_size,
                                  observer=self.metrics)
            lane = self._lanes[id(model)] = Lane(model, batcher)
        return lane

    def batchers(self) -> list[tuple[str, BatchQueue]]:
        """(category, batcher) of every lane in use (read by the stall watch's thread too)."""
        return [(lane.model.category, lane.batcher) for lane in list(self._lanes.values())]

    def stalled(self, now: float, limit_s: float) -> dict[str, float]:
        """Category -> seconds, for each lane whose engine has been on work it has not answered
        for longer than ``limit_s`` (see :meth:`BatchQueue.running_for`)."""
        stalled: dict[str, float] = {}
        for category, batcher in self.batchers():
            seconds = batcher.running_for(now)
            if seconds > limit_s:
                stalled[category] = max(seconds, stalled.get(category, 0.0))
        return stalled

    def retire(self, keep: Callable[[LoadedModel], bool], on_drained: Callable[[], None] | None = None) -> None:
        """Every lane whose model ``keep`` refuses retires; an idle one drains now, a busy one
        once its last user is done; ``on_drained`` is called after each drain, those of lanes
        retired before (a swap's) and of drains already under way included: a retirement's
        callback must come after the last of them, whose batcher writes its queue depth."""
        if on_drained is not None:
            for task, model in list(self._draining.items()):
                if not keep(model):
                    task.add_done_callback(lambda _: on_drained())
        for lane in list(self._lanes.values()):
            if not keep(lane.model):
                lane.retired = True
                lane.on_drained = on_drained
                self.release(lane)

    def release(self, lane: Lane) -> None:
        if lane.retired and lane.users == 0 and self._lanes.get(id(lane.model)) is lane:
            del self._lanes[id(lane.model)]
            task = asyncio.get_running_loop().create_task(lane.batcher.drain(self.settings.graceful_shutdown_s))
            self._draining[task] = lane.model
            task.add_done_callback(lambda done: self._draining.pop(done, None))
            if lane.on_drained is not None:
                then = lane.on_drained
                task.add_done_callback(lambda _: then())

    async def drain(self) -> None:
        """Queued and running batches of every lane finish (the runtime's close)."""
        await asyncio.gather(*(lane.batcher.drain(self.settings.graceful_shutdown_s)
                               for lane in list(self._lanes.values())), *self._draining)
