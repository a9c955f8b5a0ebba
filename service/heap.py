"""The cycle collector and what a server process holds from its start.

CPython frees most objects by reference counting; its collector exists for reference cycles,
and its full pass (generation 2) walks every container object the process holds. A server
process holds ~120,000 from its imports alone (functions, classes, module dicts of the web
stack, the pipeline, numpy, SciPy, Pillow), none of which can ever become garbage. Under
load that pass came every 8-10 s and walked them all for ~100 ms (when `msflow serve` still
imported torch), holding the GIL: every request in flight stood still for it (p99.9 latency
135 ms against a p99 of 20 ms; docs/PERFORMANCE.md, "A tenth box").

:func:`freeze_startup_objects` moves what start-up made into the collector's permanent
generation, which no pass walks (``gc.freeze``). What the process makes later (engines,
lanes, requests) is collected as before, so a version unloaded on reload is freed as it was.
"""

from __future__ import annotations

import gc


def freeze_startup_objects() -> int:
    """Call once, after the imports and before serving; returns how many objects were frozen."""
    gc.collect()  # start-up's own garbage is freed, not kept forever
    gc.freeze()
    return gc.get_freeze_count()
