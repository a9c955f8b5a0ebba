"""Where a request's blocking work runs: on the event loop itself, or in the decode threads.

A call handed to a decode thread (:mod:`service.pipeline.offload`) costs a queue put, a
thread's wake-up, a ``call_soon_threadsafe`` back and the loop's wake-up; on a virtual
machine each wake-up is an interrupt sent to another vCPU, and the thread's caches are cold
when it gets there. A request makes three such calls per image (probe, decode,
postprocess). For a small image that is more than the work itself: on a 2-vCPU box with the
null engine, a 256² JPEG cost the server 1.06-1.11 ms of CPU with its work on the loop
against 1.22-1.27 ms in the threads, a 256² PNG with an inline heatmap 1.22-1.34 against
1.46-1.53 ms (docs/performance-log.md). With several front-end processes each process is a unit
of parallelism already, and its threads only add hand-offs.

So a *small* request does its probe, decode and postprocess on the loop, a larger one in the
threads, so that no request holds the loop for long: the work it may do there is bounded
by ``loop_work_pixels`` (a millisecond or two for a real image at the default; 5 ms for the
worst upload measured, a PNG whose text Pillow inflates before refusing it).

* The probe reads headers only, but Pillow walks a PNG's chunks and a JPEG's segments (up to
  its first scan) in Python, about two microseconds each, and an upload can hold as many as
  its bytes allow: a 1.5 MB PNG of empty chunks took 0.3 s to probe and 0.4 s to decode. So
  the probe runs on the loop only for a PNG or a JPEG whose uploads add up to at most 3 bytes
  per pixel of the limit (an uncompressed RGB image of that many pixels) and that hold at
  most ``MAX_LOOP_SEGMENTS`` chunks or segments each
  (:func:`~models.image_framing.container_segments` counts them, stopping there: a
  256² PNG has three to five, a camera's JPEG about twenty).
* Decode and postprocess run on the loop when the probe did, and the request's images add
  up to at most the limit in *work pixels*: what the decoder reads (the header's width x
  height, whatever scale it decodes at: a 2048² JPEG's entropy decoding costs by its full
  size) plus what the pipeline holds for the image (admission's price: the decode, a display
  copy, the model input and map, the rendered heatmap), and no image is a progressive JPEG.
  The rest of a decoder's work grows with the bytes or the pixels, except a progressive
  JPEG's scans: each passes over every block of the image, and an upload may hold up to
  :data:`~models.image_framing.MAX_JPEG_SCANS` of them (a 256² JPEG with 5,000 repeated
  scans took 25 ms to decode). PNG text, which Pillow inflates before the pixels, is capped
  per upload (``decode.MAX_PNG_TEXT_BYTES``).
"""

from __future__ import annotations

from collections.abc import Sequence

from models.image_framing import container_segments
from service.pipeline.item import InspectedImage

BYTES_PER_PIXEL = 3  # an uncompressed RGB pixel: the bound on a loop request's upload bytes
MAX_LOOP_SEGMENTS = 64  # PNG chunks / JPEG segments before the first scan, for work on the loop


def work_pixels(item: InspectedImage) -> int:
    """What one probed image costs to decode and postprocess, in pixels (module docstring)."""
    return item.width * item.height + item.cost


def probe_on_loop(items: Sequence[InspectedImage], max_pixels: int) -> bool:
    """Whether the request's header probe runs on the event loop (then its decode may too)."""
    if max_pixels <= 0 or sum(len(item.data) for item in items) > BYTES_PER_PIXEL * max_pixels:
        return False
    return all(_few_segments(item.data) for item in items)


def _few_segments(data: bytes) -> bool:
    """A PNG or JPEG of at most ``MAX_LOOP_SEGMENTS`` chunks or segments (other formats: False)."""
    count = container_segments(data, MAX_LOOP_SEGMENTS)
    return count is not None and count <= MAX_LOOP_SEGMENTS


def work_on_loop(items: Sequence[InspectedImage], max_pixels: int) -> bool:
    """Whether the request's images, probed on the loop, are decoded and postprocessed there."""
    return not any(item.progressive for item in items) and sum(work_pixels(item) for item in items) <= max_pixels
