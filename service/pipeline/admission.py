"""Admission by decoded pixels: what a request may cost before any of it is decoded.

Bytes say little about memory: a 52 KB PNG of solid grey decodes to 6300 x 6300 pixels,
and an original-size overlay of it renders as many again. So every image is priced in the
pixels the pipeline will hold for it (:func:`image_cost`: the decode after DCT scaling, a
display copy for original-size heatmaps, the model input and the rendered heatmap), read
from the header alone, and a request is admitted against two budgets:

* per request (``max_request_megapixels``): over it the request can never run here, 413;
* per server (``max_inflight_megapixels``, a :class:`PixelBudget`): the pixels of all
  admitted requests not yet answered. Over it the request is refused now with 503 +
  Retry-After (the API sheds load); a worker waits for room instead (it already holds the job).

The server's budget is shared fairly between categories (product lines), and work-conserving:
one category alone may use all of it, but a category asking for no more than its share
(the budget over the categories holding or waiting for pixels) is not refused because
others hold the room. It waits (:meth:`PixelBudget.admit_fairly`, bounded by its deadline)
while the categories over their shares are refused any room it waits for; they are answered
within about one request's time, which gives it back.

A :class:`Ticket` gives its pixels back only when the request is over *and* every blocking
call it started in the thread pool has returned: a request that timed out (504) while its
image was still decoding keeps costing what that thread holds until the thread is done, so
the budget bounds memory, not just requests.

A priced pixel stands for :data:`~service.pipeline.decode_memory.PRICED_PIXEL_BYTES` (4.5
bytes: one pixel of an 8-bit RGB decode at its peak; ~3 for the rendered heatmap and display
copy). A decoded pixel of another format or mode is priced at what it holds (a grey PNG 5.5
bytes, a float TIFF 10, any WEBP 17), and a progressive JPEG's whole-image coefficients on top
(:mod:`service.pipeline.decode_memory`, measured); docs/performance-log.md has the measured
peak resident memory of the hostile-load scenario against this budget.
"""

from __future__ import annotations

import asyncio
import collections
import math
import time
from collections.abc import Callable
from dataclasses import dataclass

MEGA = 1_000_000


class AdmissionRefused(RuntimeError):
    """Base of the admission errors; ``status_code``/``code`` are the HTTP answer."""

    status_code = 503
    code = "server_busy"
    # msflow_rejections_total's reason where the refusal is counted as it is answered (one met
    # while reading the body, before the runtime sees the request); None: the runtime counts it.
    reason: str | None = None

    def __init__(self, message: str, details: dict[str, object] | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.details = details


class RequestTooExpensive(AdmissionRefused):
    """The request's images decode to more pixels than one request may hold (413)."""

    status_code = 413
    code = "too_many_pixels"


class ServerBusy(AdmissionRefused):
    """The server holds its budget of decoded pixels already (503 + Retry-After)."""

    status_code = 503
    code = "server_busy"


@dataclass(frozen=True)
class ImageCost:
    """The pixels one image will hold, by where they are held."""

    decode: int  # the decode (after DCT scaling), plus a second one for a sharper display copy
    display: int  # the display copy kept for an original-size heatmap
    model: int  # the model input and its anomaly map
    render: int  # the rendered heatmap

    @property
    def total(self) -> int:
        return self.decode + self.display + self.model + self.render


def image_cost(decoded: tuple[int, int], display: tuple[int, int] | None, model_size: int,
               rendered: tuple[int, int] | None, redecode: tuple[int, int] | None = None, *,
               weight: float = 1.0, held: int = 0) -> ImageCost:
    """The cost of one image: ``decoded`` = (w, h) the decoder produces, ``display`` the copy
    kept for an original-size heatmap (None: none), ``rendered`` the heatmap's size (None: not
    rendered), ``redecode`` a second, larger decode for that display copy (JPEG only);
    ``weight`` what a decoded pixel costs in priced pixels (its format and mode, >= 1), ``held``
    priced pixels the decoder holds besides (a progressive JPEG's coefficients):
    :mod:`service.pipeline.decode_memory`."""
    area = _area
    decode = math.ceil((area(decoded) + area(redecode)) * max(1.0, weight)) + max(0, held)
    return ImageCost(decode=decode, display=area(display), model=2 * model_size * model_size, render=area(rendered))


def _area(size: tuple[int, int] | None) -> int:
    return 0 if size is None else int(size[0]) * int(size[1])


class Ticket:
    """One admitted request's pixels, held until it is over and its blocking calls returned."""

    def __init__(self, budget: "PixelBudget", pixels: int, category: str = "") -> None:
        self.budget = budget
        self.pixels = pixels
        self.category = category
        self._running = 0
        self._closed = False
        self._released = False

    def call_started(self) -> None:
        """A blocking call of this request went to a thread (:class:`~service.pipeline.offload.Offload`):
        the pixels stay admitted until its :meth:`call_done`, even if the request gives up first."""
        self._running += 1

    def call_done(self) -> None:
        self._running -= 1
        self._maybe_release()

    def close(self) -> None:
        """The request is over (answered or failed); pixels return once its calls are done."""
        self._closed = True
        self._maybe_release()

    def _maybe_release(self) -> None:
        if self._closed and self._running == 0 and not self._released:
            self._released = True
            self.budget._give_back(self.pixels, self.category)

    def __enter__(self) -> "Ticket":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class PixelBudget:
    """Decoded pixels in flight on this server (or worker), with the per-request bound."""

    def __init__(self, max_request_pixels: int, max_inflight_pixels: int,
                 on_change: Callable[[int], object] | None = None) -> None:
        if max_request_pixels > max_inflight_pixels:
            raise ValueError("the per-request pixel budget exceeds the server's: such requests could never run")
        self.max_request = max_request_pixels
        self.capacity = max_inflight_pixels
        self.in_flight = 0
        self._on_change = on_change
        self._room: asyncio.Event | None = None
        self._held: collections.Counter[str] = collections.Counter()  # category -> pixels admitted
        self._waiting: collections.Counter[str] = collections.Counter()  # category -> pixels waiting fairly

    def check_request(self, pixels: int) -> None:
        """:class:`RequestTooExpensive` when ``pixels`` exceed what one request may hold."""
        if pixels > self.max_request:
            raise RequestTooExpensive(
                f"the images of this request are priced at {pixels / MEGA:.1f} megapixels (their decoded pixels, "
                "weighted by what their format and mode hold while decoding); one request may hold "
                f"{self.max_request / MEGA:.1f} (send fewer or smaller images, 8-bit PNG or JPEG rather than WEBP "
                "or 16-bit, float or palette images, or heatmap_size=model)",
                details={"megapixels": round(pixels / MEGA, 3), "limit_megapixels": round(self.max_request / MEGA, 3)})

    def admit(self, pixels: int, category: str = "") -> Ticket:
        """A ticket for ``pixels`` now, or :class:`RequestTooExpensive` / :class:`ServerBusy`."""
        self.check_request(pixels)
        if not self._may_take(pixels, category):
            raise self._busy(pixels)
        return self._take(pixels, category)

    async def admit_fairly(self, pixels: int, category: str, deadline: float) -> Ticket:
        """The API's admission: a ticket now if there is room for ``category``; else, when
        the request is within its category's share and the room is held by categories over
        theirs, once they have given it back (:class:`ServerBusy` at ``deadline``); else
        :class:`ServerBusy` now, as :meth:`admit`. So a flood of one category is refused
        beyond its share while its neighbours wait at most about one of its requests' time,
        and a category alone is refused at the budget as before (it is never over its share)."""
        self.check_request(pixels)
        if self._may_take(pixels, category):
            return self._take(pixels, category)
        if not self._within_share(pixels, category):
            raise self._busy(pixels)
        # Within its share and no room: others hold more than theirs (the shares add up to the
        # capacity). They take none of the room this request waits for (_may_take) until it fits.
        self._waiting[category] += pixels
        try:
            await self._wait_for_room(pixels, deadline)
        finally:
            self._waiting[category] -= pixels
            if self._waiting[category] <= 0:
                del self._waiting[category]
        return self._take(pixels, category)

    async def wait_admit(self, pixels: int, deadline: float, category: str = "") -> Ticket:
        """A ticket once there is room (a worker's back-pressure), or :class:`ServerBusy` at
        ``deadline`` (``time.monotonic()``); :class:`RequestTooExpensive` at once."""
        self.check_request(pixels)
        await self._wait_for_room(pixels, deadline)
        return self._take(pixels, category)

    def _within_share(self, pixels: int, category: str) -> bool:
        """Whether ``category`` would hold (and wait for) no more than an equal share of the
        capacity among the categories holding or waiting for pixels, itself included."""
        active = {c for c, n in self._held.items() if n > 0} | set(self._waiting) | {category}
        return self._held[category] + self._waiting[category] + pixels <= self.capacity / len(active)

    def _may_take(self, pixels: int, category: str) -> bool:
        """Room now: within the capacity, and without the room waiters wait for, unless the
        request is within its share (waiters are too: first to fit goes first)."""
        if self.in_flight + pixels > self.capacity:
            return False
        waiting = sum(self._waiting.values())
        return waiting == 0 or self.in_flight + waiting + pixels <= self.capacity or self._within_share(pixels, category)

    async def _wait_for_room(self, pixels: int, deadline: float) -> None:
        while self.in_flight + pixels > self.capacity:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise ServerBusy("no room in the pixel budget before the deadline")
            if self._room is None:
                self._room = asyncio.Event()
            try:  # not wait_for: on 3.11 it drops a cancellation that comes as room does (gh-86296)
                async with asyncio.timeout(remaining):
                    await self._room.wait()
            except TimeoutError:
                pass

    def _busy(self, pixels: int) -> ServerBusy:
        return ServerBusy(
            f"the server is decoding {self.in_flight / MEGA:.0f} of its {self.capacity / MEGA:.0f} megapixels; "
            "retry shortly", details={"megapixels": round(pixels / MEGA, 3)})

    def _take(self, pixels: int, category: str) -> Ticket:
        self.in_flight += pixels
        self._held[category] += pixels
        if self._on_change is not None:
            self._on_change(self.in_flight)
        return Ticket(self, pixels, category)

    def _give_back(self, pixels: int, category: str) -> None:
        self.in_flight -= pixels
        self._held[category] -= pixels
        if self._held[category] <= 0:
            del self._held[category]
        if self._on_change is not None:
            self._on_change(self.in_flight)
        if self._room is not None:  # wake every waiter; each re-checks the room it needs
            self._room.set()
            self._room = None
