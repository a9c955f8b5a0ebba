"""What the C allocator gives back to the kernel: per-image buffers stay in the heap.

A request allocates buffers of 100 KB to a few MB (a decoded image, an engine input, a
copied map, a rendered heatmap) and frees them a few milliseconds later. glibc's ``malloc``
serves chunks above its mmap threshold (128 KB at first) with ``mmap``, and returns the top
of its heap to the kernel (``brk``) whenever more than its trim threshold lies free there.
It raises both thresholds as it sees large chunks freed, but a mix of sizes (a 196 KB input
and a 256 KB map, with small objects between them) still leaves more than the threshold
free at the top after each image: the heap shrinks, and the next image's buffers come back
as fresh pages, each one a page fault and a page of zeros. A front end of a multi-process
server took 18-27 faults per image that way; without them its time in the kernel per image
halved, 0.11 to 0.06 ms (docs/performance-log.md, "A fifteenth box").

:func:`keep_freed_memory` fixes both thresholds from the start: chunks up to 32 MB from the
heap (where glibc's adaptation ends at most), and up to ``retain_bytes`` of free memory kept
at the top of each heap (glibc keeps one per thread that allocates, at most). With the
default of 64 MB that is what glibc itself keeps once it has seen one 32 MB chunk freed.

glibc only (``mallopt``); elsewhere (musl, macOS) nothing changes.
"""

from __future__ import annotations

import ctypes
import logging
from collections.abc import Callable

log = logging.getLogger(__name__)

M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3  # glibc's <malloc.h>
MMAP_THRESHOLD_MAX = 32 * 1024 * 1024  # glibc's ceiling on 64-bit (DEFAULT_MMAP_THRESHOLD_MAX)


def _mallopt() -> Callable[[int, int], int] | None:
    try:
        return ctypes.CDLL(None).mallopt  # type: ignore[no-any-return]
    except (OSError, AttributeError):  # not glibc
        return None


def keep_freed_memory(retain_bytes: int) -> bool:
    """Serve chunks up to 32 MB from the heap and keep up to ``retain_bytes`` of free memory
    at its top for reuse. ``0`` leaves glibc's adaptive defaults. Returns whether the policy
    is in force (False without glibc, or when ``retain_bytes`` is 0)."""
    if retain_bytes <= 0:
        return False
    mallopt = _mallopt()
    if mallopt is None:
        log.debug("no mallopt in this C library: the allocator keeps its own policy")
        return False
    # The mmap threshold first: setting either one ends glibc's adaptation of both, and a
    # fixed threshold below a request's large buffers would map and fault them every time.
    if not (mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD_MAX) and mallopt(M_TRIM_THRESHOLD, retain_bytes)):
        log.warning("mallopt refused the heap policy (retain %d bytes): glibc's defaults stay", retain_bytes)
        return False
    return True
