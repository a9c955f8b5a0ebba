"""The pause before trying again, on either side of the engine link: it doubles while the
tries keep failing, up to a ceiling, and starts over once the caller says one succeeded.

Kept by the caller across tries, not started afresh per loop: a loop that restarts at its
shortest pause after each brief success (a connection made, then dropped at once) is as
tight as no pause at all.
"""

from __future__ import annotations


class Backoff:
    """``next()``: the pause to wait now (then twice that next time, up to ``most_s``);
    ``reset()``: after a success, back to ``first_s``."""

    def __init__(self, first_s: float, most_s: float) -> None:
        self.first_s = first_s
        self.most_s = most_s
        self._pause_s = first_s

    def next(self) -> float:
        pause, self._pause_s = self._pause_s, min(self.most_s, self._pause_s * 2)
        return pause

    def reset(self) -> None:
        self._pause_s = self.first_s
