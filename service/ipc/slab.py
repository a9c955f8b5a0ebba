"""Slots of shared memory for engine inputs and outputs, on an anonymous ``memfd``.

A front-end process owns one :class:`Slab` per category and model input size. A slot holds
one image's engine input (uint8 ``[S, S, 3]``) and its output map (float32 ``[S, S]``); the
front end writes the input, the engine process reads it and writes the map, the front end
reads the map. Nothing is pickled and nothing is copied twice.

Why ``memfd_create`` and a file descriptor passed over the socket, not named POSIX shared
memory: a memfd has no name in ``/dev/shm``, so there is nothing to leak. The kernel frees
it when the last process that maps it, or holds its descriptor, is gone, however it
ends (SIGKILL included). Named segments would need a janitor after every crash.

The slab's capacity (``slots``) is the front end's queue budget for that category: a request
that finds no free slots is refused (503) before it costs anything.

Why sealed: the engine process maps a file another process owns. Were that file shrunk under
the mapping (a front end's bug: one ``ftruncate``), the engine process's next touch of a page
past the new end would be SIGBUS, killing it and every front end's batches with it. So the
owner seals its memfd at its size (``F_SEAL_SHRINK | F_SEAL_GROW``, then ``F_SEAL_SEAL`` so
the seals cannot be taken off) before handing it over, and :meth:`Slab.attach` maps only a
descriptor so sealed, of exactly the size its layout needs.
"""

from __future__ import annotations

import fcntl
import mmap
import os
from dataclasses import dataclass

import numpy as np

PAGE = mmap.PAGESIZE
# What a slab's memfd must carry before another process maps it (see the module docstring).
SEALS = fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW | fcntl.F_SEAL_SEAL


def _round_up(n: int, to: int = PAGE) -> int:
    return -(-n // to) * to


@dataclass(frozen=True)
class SlabLayout:
    """Where slot ``i``'s input and output lie (page-aligned, so neither shares a page)."""

    size: int  # the model's input side S
    slots: int

    @property
    def input_bytes(self) -> int:
        return self.size * self.size * 3

    @property
    def output_bytes(self) -> int:
        return self.size * self.size * 4

    @property
    def slot_bytes(self) -> int:
        return _round_up(self.input_bytes) + _round_up(self.output_bytes)

    @property
    def total_bytes(self) -> int:
        return self.slot_bytes * self.slots


class Slab:
    """One shared mapping of ``layout.slots`` slots; see the module docstring.

    ``Slab.create`` makes a new memfd (the owner: a front end); ``Slab.attach`` maps a
    descriptor received from its owner (the engine process). Pages are committed only when
    touched, so an idle slab costs address space, not memory.
    """

    def __init__(self, layout: SlabLayout, fd: int, name: str) -> None:
        self.layout = layout
        self.name = name
        self.fd = fd
        self._map = mmap.mmap(fd, layout.total_bytes)
        self._buffer = np.frombuffer(self._map, dtype=np.uint8)
        # Fixed for the slab's life, and read twice per image on each side of the link.
        self._slot_bytes = layout.slot_bytes
        self._input_bytes = layout.input_bytes
        self._output_at = _round_up(layout.input_bytes)
        self._output_bytes = layout.output_bytes
        self._side = layout.size
        # Each slot's views, made on its first use: a view is a slice, a reshape (and a dtype
        # view for the map), which each side of the link otherwise made again for every image.
        # They hold the mapping as ``_buffer`` does, no longer than the slab object.
        self._inputs: list[np.ndarray | None] = [None] * layout.slots
        self._outputs: list[np.ndarray | None] = [None] * layout.slots

    @classmethod
    def create(cls, size: int, slots: int, name: str) -> "Slab":
        layout = SlabLayout(size, slots)
        fd = os.memfd_create(name, os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
        try:
            os.ftruncate(fd, layout.total_bytes)
            fcntl.fcntl(fd, fcntl.F_ADD_SEALS, SEALS)  # its size is final: no process can change it now
            return cls(layout, fd, name)
        except BaseException:
            os.close(fd)
            raise

    @classmethod
    def attach(cls, fd: int, size: int, slots: int, name: str) -> "Slab":
        """Map ``fd``, received from its owner. The slab owns ``fd`` from here: it is closed
        when the slab is, or right here when it cannot be mapped (a peer's bad descriptor must
        not stay open in this process)."""
        try:
            layout = SlabLayout(size, slots)
            if size < 1 or slots < 1:
                raise ValueError(f"slab {name}: {slots} slots of {size}x{size}: nothing to map")
            # Not a memfd at all, or one its owner could still resize under the mapping.
            seals = fcntl.fcntl(fd, fcntl.F_GET_SEALS)
            if seals & SEALS != SEALS:
                raise ValueError(f"slab {name}: descriptor not sealed against resizing (seals {seals:#x})")
            actual = os.fstat(fd).st_size
            if actual != layout.total_bytes:
                raise ValueError(f"slab {name}: descriptor of {actual} bytes, {slots} slots of {size}x{size} "
                                 f"need {layout.total_bytes}")
            return cls(layout, fd, name)
        except BaseException:
            os.close(fd)
            raise

    def input(self, slot: int) -> np.ndarray:
        """Slot ``slot``'s engine input, a uint8 ``[S, S, 3]`` view."""
        views = self._inputs
        view = views[slot] if 0 <= slot < len(views) else None
        if view is None:
            start = self._offset(slot)
            view = views[slot] = self._buffer[start:start + self._input_bytes].reshape(
                self._side, self._side, 3)
        return view

    def output(self, slot: int) -> np.ndarray:
        """Slot ``slot``'s output map, a float32 ``[S, S]`` view."""
        views = self._outputs
        view = views[slot] if 0 <= slot < len(views) else None
        if view is None:
            start = self._offset(slot) + self._output_at
            raw = self._buffer[start:start + self._output_bytes]
            view = views[slot] = raw.view(np.float32).reshape(self._side, self._side)
        return view

    def check_slot(self, slot: int) -> None:
        """Raise IndexError unless ``slot`` is one of this slab's."""
        if not 0 <= slot < self.layout.slots:
            raise IndexError(f"slot {slot} outside 0..{self.layout.slots - 1} of slab {self.name}")

    def _offset(self, slot: int) -> int:
        self.check_slot(slot)
        return slot * self._slot_bytes

    def close(self) -> None:
        """Close the descriptor. The mapping goes when the last view of it is collected, so a
        batch still writing into it never writes into unmapped memory."""
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


class SlotPool:
    """The free slots of one slab (the owner's side): all-or-nothing reservations.

    Last freed, first taken: the slots in use stay the same few, so the pages of a large
    slab that only a burst ever needed are touched once, not cycled through (a first-in,
    first-out pool would commit the whole slab under steady load)."""

    def __init__(self, slots: int) -> None:
        self._free: list[int] = list(range(slots - 1, -1, -1))  # slot 0 on top
        self.capacity = slots

    @property
    def free(self) -> int:
        return len(self._free)

    def take(self, count: int) -> list[int] | None:
        """``count`` slots, or None (nothing taken) when fewer are free."""
        if count > len(self._free):
            return None
        return [self._free.pop() for _ in range(count)]

    def give_back(self, slots: list[int]) -> None:
        self._free.extend(slots)
