"""A server process freezes what start-up made (service/heap.py): the collector's full passes
no longer walk the imports, and what the process makes afterwards is collected as before."""

from __future__ import annotations

import gc
import weakref

from service.heap import freeze_startup_objects


class _Node:
    def __init__(self) -> None:
        self.me = self  # a reference cycle: only the collector frees it


def test_startup_garbage_is_freed_the_rest_frozen_and_later_cycles_still_collected() -> None:
    startup_garbage = _Node()
    freed = weakref.ref(startup_garbage)
    del startup_garbage
    try:
        frozen = freeze_startup_objects()
        assert freed() is None, "start-up's own garbage must be collected, not frozen forever"
        assert frozen == gc.get_freeze_count() > 10_000  # this interpreter's imports: pytest, numpy, the service
        later = _Node()
        collected = weakref.ref(later)
        del later
        gc.collect()
        assert collected() is None, "a cycle made after the freeze (an unloaded engine's) must still be freed"
        assert gc.get_freeze_count() == frozen
    finally:
        gc.unfreeze()
