"""Clients waiting for a slot: one FIFO queue per app (SPEC 9).

A session whose app has every eligible target at its ``HardLimit`` waits
here, its client's bytes held by the kernel (nothing is read from it), until
a slot frees or the app's ``QueueTimeout`` passes::

    wait -> [woken -> resume -> (left | wait again, keeping its place)]*
         -> left: got a target, or closed (timeout, client gone, shutdown)

* **Order.**  First come, first served within an app: a client arriving
  while others wait joins the tail (and a walk is scheduled in case a slot
  is free that the head cannot use).  A freed slot starts a walk from the
  head (:meth:`WaitQueues.freed`); each waiter in turn tries again
  (``resume``) until one that has tried no target yet must still wait: every
  later one would find the same, since they all see the same targets.  A
  waiter that failed over (it has tried some targets) may be passed by
  later ones that can use a target it already tried.
* **At once, not polled.**  The walk runs on the loop's next turn
  (``call_soon``), coalesced per app, never inside the close that freed
  the slot: a resumed session may connect, fail and free a slot itself,
  and must not re-enter the walk.  Across ``--workers`` the wake arrives
  through the shared counters' pipe (:meth:`WaitQueues.wake_all`).
* **Timeout.**  Each wait is bounded by its app's ``QueueTimeout``, from
  when the client first joined; the waiter is then told
  (``queue_timed_out``), and closes itself.

Time and the loop come in as arguments (``call_later``, ``call_soon``,
``time``), so tests drive the queue with a fake clock.
"""

from __future__ import annotations

import collections
from typing import Callable, Hashable, Mapping, Optional, Protocol

__all__ = ["WaitQueues", "Waiter"]


class _Cancellable(Protocol):
    def cancel(self) -> None: ...


class Waiter(Hashable, Protocol):
    """What the queue needs of a waiting session."""

    @property
    def has_tried(self) -> bool:
        """Whether some target was tried for it already (it failed over)."""

    def resume(self) -> None:
        """Try for a slot again: connect, or call ``wait`` again, or close."""

    def queue_timed_out(self, waited_s: float) -> None:
        """Waited too long: close (with ``end=queue-timeout``)."""


class _Entry:
    __slots__ = ("app", "since", "timer")

    def __init__(self, app: str, since: float, timer: _Cancellable) -> None:
        self.app = app
        self.since = since
        self.timer = timer


class WaitQueues:
    def __init__(self, time: Callable[[], float],
                 call_later: Callable[[float, Callable[[], None]], _Cancellable],
                 call_soon: Callable[[Callable[[], None]], None],
                 on_left: Callable[[str, float], None] = lambda app, waited_s: None) -> None:
        """``on_left(app, waited_s)``: a waiter left its queue, by any way."""
        self._time = time
        self._call_later = call_later
        self._call_soon = call_soon
        self._on_left = on_left
        self._queues: dict[str, collections.deque[Waiter]] = {}
        self._entries: dict[Waiter, _Entry] = {}  # waiting now
        # The same, read-only outside: empty, nobody waits, and a session
        # need not ask about its app's queue (one call fewer each way).
        self.waiting: Mapping[Waiter, object] = self._entries
        self._lengths: dict[str, int] = {}
        self._walks: set[str] = set()  # apps with a walk scheduled
        self._resuming: Optional[Waiter] = None
        self._requeued = False

    def __len__(self) -> int:
        return len(self._entries)

    def length(self, app: str) -> int:
        return self._lengths.get(app, 0)

    def lengths(self) -> dict[str, int]:
        return {app: n for app, n in self._lengths.items() if n}

    def wait(self, waiter: Waiter, app: str, timeout_s: float) -> None:
        """``waiter`` found no slot: to the tail (or keeps its place, when
        it was being resumed)."""
        if waiter is self._resuming:
            self._requeued = True
            return
        if waiter in self._entries:
            return
        queue = self._queues.get(app)
        if queue is None:
            queue = self._queues[app] = collections.deque()
        timer = self._call_later(timeout_s, lambda: self._expire(waiter))
        self._entries[waiter] = _Entry(app, self._time(), timer)
        self._lengths[app] = self._lengths.get(app, 0) + 1
        queue.append(waiter)
        if len(queue) > 1:
            self.freed(app)  # a slot may be free that those ahead cannot use

    def leave(self, waiter: Waiter) -> None:
        """``waiter`` closed while waiting (or was never here): forget it."""
        entry = self._entries.pop(waiter, None)
        if entry is None:
            return
        entry.timer.cancel()
        self._lengths[entry.app] -= 1
        queue = self._queues[entry.app]
        if queue and queue[0] is waiter:
            queue.popleft()
        elif len(queue) > 2 * self._lengths[entry.app] + 16:
            # Gone from the middle: compact now and then, so queues of
            # clients that timed out do not keep their sessions alive.
            # In place: a walk in progress holds this deque.
            live = [w for w in queue if w in self._entries]
            queue.clear()
            queue.extend(live)
        self._on_left(entry.app, self._time() - entry.since)

    def _expire(self, waiter: Waiter) -> None:
        entry = self._entries.get(waiter)
        if entry is not None:
            waited_s = self._time() - entry.since
            self.leave(waiter)
            waiter.queue_timed_out(waited_s)

    def freed(self, app: str) -> None:
        """A slot of ``app`` may be free: walk its queue on the next turn."""
        if self._lengths.get(app) and app not in self._walks:
            self._walks.add(app)
            self._call_soon(lambda: self._walk(app))

    def wake_all(self) -> None:
        """Another worker freed a slot: walk every queue."""
        for app, length in self._lengths.items():
            if length:
                self.freed(app)

    def _walk(self, app: str) -> None:
        self._walks.discard(app)
        queue = self._queues.get(app)
        if not queue:
            return
        passed: list[Waiter] = []  # still waiting, ahead of where the walk stopped
        while queue:
            waiter = queue.popleft()
            if waiter not in self._entries:
                continue  # left already
            if self._resume(waiter):
                continue  # got a slot, or closed
            passed.append(waiter)
            if not waiter.has_tried:
                break  # the rest would find the same: no slot for them
        queue.extendleft(reversed(passed))

    def _resume(self, waiter: Waiter) -> bool:
        """Resume ``waiter``; True if it left the queue."""
        self._resuming, self._requeued = waiter, False
        try:
            waiter.resume()
        finally:
            self._resuming = None
        if self._requeued and waiter in self._entries:
            return False
        self.leave(waiter)
        return True
