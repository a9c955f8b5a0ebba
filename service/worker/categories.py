"""Which categories a worker consumes (:class:`ConsumedCategories`): the ones whose streams it
reads and claims from and whose heartbeats it beats, followed as the store watch loads new
categories and retires those whose folder left the model store, and the retired ones whose
streams it still drains."""

from __future__ import annotations

import asyncio
import logging

from service.pipeline.registry_view import RegistryView
from service.redisq.jobs import Delivery, JobQueue

log = logging.getLogger("service.worker")


class ConsumedCategories:
    """The categories ``worker`` consumes, as the store watch changes them. Before, a retired
    category stayed in the heartbeat (a job's answer counted the worker among its workers) and
    its stream was read for good."""

    def __init__(self, worker: str, queue: JobQueue, registry: RegistryView) -> None:
        self.worker = worker
        self.queue = queue
        self.registry = registry
        self.consumed: list[str] = []
        # Retired categories whose streams are still read until a read finds nothing new there:
        # the jobs queued before the retirement fail at once as unknown_category (the worker
        # cannot pin them) instead of waiting out their TTL; then the stream is left alone.
        self.draining: set[str] = set()

    def start(self) -> list[str]:
        """Consume every category that serves now; they are returned."""
        self.consumed = sorted(self.registry.serving())
        return self.consumed

    async def follow(self) -> None:
        """Consume the categories that serve since the last look too (new, or back after a
        retirement), and let go of those the store watch retired. Raises
        :class:`~service.redisq.connection.RedisUnavailable` (what is left undone is done at the
        next call; a heartbeat not left runs out on its own)."""
        known = set(self.registry.categories)  # one failing to load is still known: it is retried
        retired = [c for c in self.consumed if c not in known]
        if retired:
            self.consumed = [c for c in self.consumed if c in known]
            self.draining.update(retired)
            log.info("worker %s: no longer consuming %s (retired from the model store)", self.worker,
                     ", ".join(retired))
            await self.queue.workers.leave(self.worker, retired)  # at once, not three beats later
        new = sorted(set(self.registry.serving()) - set(self.consumed))
        if new:
            await self.queue.ensure_groups(new)
            self.consumed = sorted([*self.consumed, *new])
            self.draining.difference_update(new)
            log.info("worker %s: now consuming %s too", self.worker, ", ".join(new))
            # At once rather than at the next beat: a job's answer counts this worker from now.
            await self.queue.workers.beat(self.worker, self.consumed)

    async def read(self, count: int, block_s: float) -> list[Delivery]:
        """New jobs of the categories consumed and of those draining. A draining category this
        read found nothing new in is drained, and read no more: XREADGROUP answers with every
        stream that holds unread entries, so none there means none left."""
        draining = sorted(self.draining)
        if not self.consumed and not draining:
            # Every category retired (a line's only version replaced for longer than the grace):
            # XREADGROUP of no stream is refused by the client, which read as Redis down every
            # second. Redis is still asked whether it answers, as a read would: the worker's
            # claims count on that (an outage meanwhile holds them off once a category is back).
            await self.queue.conn.run("ping", lambda r: r.ping())
            await asyncio.sleep(block_s)
            return []
        deliveries = await self.queue.read([*self.consumed, *draining], self.worker, count, block_s)
        self.draining.difference_update(set(draining) - {d.message.category for d in deliveries})
        return deliveries

    def streams_gone(self) -> None:
        """Redis lost the streams (it restarted empty): nothing is left to drain."""
        self.draining.clear()


__all__ = ["ConsumedCategories"]
