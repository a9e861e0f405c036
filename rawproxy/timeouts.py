"""Timeouts of one length, kept in the order they were armed (no heap).

When every timeout of a kind has the same length (a connection's
half-open limit, an app's ``ConnectTimeout``), arming order is deadline
order: the first armed is always the first due.  An insertion-ordered
table then does what the loop's heap does for timers of any length, for
less: arming is a store and disarming a pop (no :class:`~rawproxy.loop.Timer`,
no heap entry, no cancelled entry left behind for the garbage collector to
walk), and one loop timer waits for the oldest.  libev's manual describes
the same "timeout list" for timeouts of equal length.

Deadlines come from the loop's clock (not the turn's ``now``), so a key
armed late in a long turn is not due early.  The callback may arm or
disarm any key, itself included.
"""

from __future__ import annotations

import logging
from collections import OrderedDict
from typing import Callable, Generic, Hashable, Optional, TypeVar

from .loop import EventLoop, Timer

K = TypeVar("K", bound=Hashable)

log = logging.getLogger("rawproxy.timeouts")


class Timeouts(Generic[K]):
    """``on_due(key)`` ``delay_s`` after ``arm(key)``, unless disarmed first."""

    __slots__ = ("delay_s", "_loop", "_on_due", "_armed", "_timer", "_running")

    def __init__(self, loop: EventLoop, delay_s: float, on_due: Callable[[K], None]) -> None:
        self.delay_s = delay_s
        self._loop = loop
        self._on_due = on_due
        # key -> deadline, oldest first (OrderedDict: its first entry is
        # found at once, however many were popped before it).
        self._armed: OrderedDict[K, float] = OrderedDict()
        self._timer: Optional[Timer] = None  # the loop's, for the oldest
        self._running = False  # in _run_due, which sets the timer when done

    def __len__(self) -> int:
        return len(self._armed)

    def __contains__(self, key: object) -> bool:
        return key in self._armed

    def arm(self, key: K) -> None:
        """Due in ``delay_s``; a key armed already starts over (to the end)."""
        armed = self._armed
        if key in armed:
            del armed[key]
        armed[key] = self._loop.clock() + self.delay_s
        if self._timer is None and not self._running:
            self._timer = self._loop.call_later(self.delay_s, self._run_due)

    def disarm(self, key: K) -> None:
        """Not due any more (nothing happens for a key not armed)."""
        self._armed.pop(key, None)

    def _run_due(self) -> None:
        self._timer = None
        self._running = True  # a callback that arms must not start a second timer
        armed = self._armed
        now = self._loop.clock()
        try:
            while armed:
                key = next(iter(armed))
                if armed[key] > now:
                    break  # the oldest left; the ones disarmed before it cost nothing
                del armed[key]
                try:
                    self._on_due(key)
                except Exception:  # one key's fault must not strand the ones after it
                    log.exception("unhandled error in a timeout for %r", key)
        finally:
            self._running = False
            if armed and self._timer is None:
                delay = max(0.0, armed[next(iter(armed))] - self._loop.clock())
                self._timer = self._loop.call_later(delay, self._run_due)

    def close(self) -> None:
        self._armed.clear()
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
