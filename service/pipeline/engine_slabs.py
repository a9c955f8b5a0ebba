"""A front end's shared-memory slabs in multi-process mode, by key, and their life: made on
first use and handed to the engine process, replaced after a lost connection, freed once
their category has retired. The requests that use them are :mod:`~service.pipeline.engine_images`'s.

* ``(category, size)``: a category's request slots for inputs of ``size``, ``max_queue_size``
  of them (its queue budget in this front end; per category, not per size, so that one
  category's flood cannot take its neighbours' slots: tests/integration/test_multiprocess_category_slots.py;
  per category, not per version, so that a reload's new version takes its slots from the
  pool the old one gives back).
* ``(category, size, WARMUP)``: its warm-up slots (:func:`warmup_slots`), which only a warm-up
  (the registry's, at a start and at each reload) takes. Before, a warm-up took request slots
  and was refused ``QueueFull`` whenever the category's requests held them all: under its own
  flood a category could not be reloaded (tests/integration/test_multiprocess_warmup_slots.py).
  Warm-ups of one category wait for each other's slots (:class:`WarmupSlots`), up to their
  deadline; the engine process's queue has room for them on top of the request slots
  (:mod:`service.engine_core.hosting`).

A category the store watch retired (:meth:`Slabs.retire`) gives its slabs back as soon as none
of their slots is in flight or lent (at once, or when the last comes back), and the engine
process is told to drop its mapping (``drop_slab``): before, each stayed mapped in both
processes for the front end's life (28 MiB of address space at 256² and 64 slots). A slab id
is never used twice (the engine process may still name a dropped one's), and a category
taken into use again (a lane, a warm-up: :meth:`Slabs.serve`) gets fresh slabs.
"""

from __future__ import annotations

import asyncio
import itertools
import os
import time
from typing import Protocol

from service.config import Settings
from service.ipc.channel import Channel
from service.ipc.slab import Slab, SlotPool
from service.pipeline.batch_queue import QueueFull

Key = tuple[str, int]  # requests' slab: (category, input size)
WARMUP = "warm-up"
WarmupKey = tuple[str, int, str]  # a warm-up slab: (category, input size, WARMUP)
SlabKey = Key | WarmupKey
Entry = tuple[int, Slab, SlotPool]  # (slab id, slab, its free slots)


class HasChannel(Protocol):
    channel: Channel | None


def warmup_slots(settings: Settings) -> int:
    """A warm-up slab's slots: a registry warm-up batch (up to ``max_batch_size`` images) in
    parts no larger than the request slab, as when warm-ups took request slots."""
    return min(settings.max_queue_size, settings.max_batch_size)


class WarmupSlots(SlotPool):
    """A warm-up slab's free slots: a warm-up that finds too few (another warm-up of the
    category holds them, or a cancelled one's are still in the engine process) waits for
    them to come back, up to its deadline."""

    def __init__(self, slots: int) -> None:
        super().__init__(slots)
        self._waiters: list[asyncio.Future[None]] = []

    async def take_by(self, count: int, deadline: float) -> list[int]:
        while (slots := self.take(count)) is None:
            waiter: asyncio.Future[None] = asyncio.get_running_loop().create_future()
            self._waiters.append(waiter)
            try:
                async with asyncio.timeout(max(0.0, deadline - time.monotonic())):
                    await waiter
            except TimeoutError:
                raise QueueFull(f"warm-up: {count} of {self.capacity} warm-up slots not free within its "
                                "deadline") from None
            finally:
                if waiter in self._waiters:
                    self._waiters.remove(waiter)
        return slots

    def give_back(self, slots: list[int]) -> None:
        super().give_back(slots)
        waiters, self._waiters = self._waiters, []
        for waiter in waiters:  # each takes again: the first with enough gets them
            if not waiter.done():
                waiter.set_result(None)


class Slabs:
    """``table``: key -> (slab id, slab, its free slots) (see the module docstring)."""

    def __init__(self, settings: Settings, link: HasChannel) -> None:
        self.settings = settings
        self._link = link
        self.table: dict[SlabKey, Entry] = {}
        self._ids = itertools.count(1)
        # Categories the store watch retired, until taken into use again: each slab of theirs
        # goes once idle. A set rather than one pass: slots come back after the retirement,
        # and a request pinned before it may still make a slab (freed again once answered).
        self.retired: set[str] = set()

    def entry(self, key: SlabKey) -> Entry:
        """``key``'s slab, made (and handed to the engine process) on its first use."""
        entry = self.table.get(key)
        if entry is None:
            warmup = len(key) == 3
            pool = WarmupSlots(warmup_slots(self.settings)) if warmup else SlotPool(self.settings.max_queue_size)
            ident = next(self._ids)
            entry = self.table[key] = (ident, _new_slab(key, pool.capacity), pool)
            channel = self._link.channel
            if channel is not None:
                _send_slab(channel, ident, entry[1])
        return entry

    def serve(self, category: str) -> None:
        """``category`` is taken into use (a lane, a warm-up): its slabs stay."""
        self.retired.discard(category)

    def retire(self, category: str) -> None:
        """The store watch retired ``category``: its slabs go once idle (see the module docstring)."""
        self.retired.add(category)
        self.free_idle(category)

    def free_idle(self, category: str) -> None:
        """Free each slab of a retired ``category`` none of whose slots is in flight or lent."""
        if category not in self.retired:
            return
        for key in [key for key in self.table if key[0] == category]:
            ident, slab, pool = self.table[key]
            if pool.free < pool.capacity:
                continue
            del self.table[key]
            slab.close()  # the mapping goes with the last view of it (a map already read out)
            channel = self._link.channel
            if channel is not None:  # else the next connection is never handed it
                channel.send({"op": "drop_slab", "id": ident})

    def hand_over(self, channel: Channel) -> None:
        """A new connection: every slab to the engine process."""
        for ident, slab, _ in self.table.values():
            _send_slab(channel, ident, slab)

    def renew(self, keys: set[SlabKey]) -> None:
        """The connection ended with slots of ``keys``' slabs in flight: each is replaced. The
        engine process may live on (a corrupt stream, a failed send), its batches still reading
        and writing them: a slab with slots in flight is never handed out again."""
        for key in keys:
            _, old, pool = self.table[key]
            old.close()
            self.table[key] = (next(self._ids), _new_slab(key, pool.capacity), pool)

    def close(self) -> None:
        for _, slab, _ in self.table.values():
            slab.close()


def _new_slab(key: SlabKey, slots: int) -> Slab:
    category, size = key[0], key[1]
    suffix = "-warmup" if len(key) == 3 else ""
    return Slab.create(size, slots, name=f"msflow-{os.getpid()}-{category}-{size}{suffix}")


def _send_slab(channel: Channel, ident: int, slab: Slab) -> None:
    channel.send({"op": "slab", "id": ident, "size": slab.layout.size, "slots": slab.layout.slots,
                  "name": slab.name}, [slab.fd])
