"""``MaxConnections`` for the whole process, and waking what waits for room.

A server's :class:`Admission` counts each app's open connections in the
shared counters (:mod:`rawproxy.counters`: one count for all ``--workers``)
and says whether its listeners may accept::

    admit (before each accept) -> reserve the app's slot (under the lock
        when the app has MaxConnections: the limit holds exactly)
      -> a client came: the session takes the reservation (consume)
      -> none came, or it was refused at accept: unreserve
    session closed -> release (wakes other workers waiting for room)

While this worker waits for room -- a listener paused at the limit, or
sessions queued for a target's ``HardLimit`` (:mod:`rawproxy.waitqueue`) --
its mark in the counters is set, and a slot freed by another worker writes
to its wake pipe; :meth:`Admission.start` watches that pipe and calls
``on_wake`` (which re-asks the listeners and walks the queues).  One
process has no pipe: every free is local and wakes what it should at once.

``--max-connections`` (``max_connections``) is one more slot, every app of
every worker together (named by the empty app name, which no app has): it is
reserved before the app's, given back with it, and pauses every listener.
"""

from __future__ import annotations

from typing import Callable, Optional

from .counters import Counters
from .loop import EVENT_READ, EventLoop
from .router import Route

__all__ = ["Admission"]


class Admission:
    def __init__(self, loop: EventLoop, counters: Counters,
                 waiting_sessions: Callable[[], int],
                 max_connections: Optional[int] = None) -> None:
        """``waiting_sessions()``: how many of this worker's sessions wait;
        ``max_connections``: ``--max-connections``, or None."""
        self._loop = loop
        self.counters = counters
        self.max_connections = max_connections
        self._total_slot = counters.slot("") if max_connections is not None else -1
        self.total_paused = False  # a listener was paused at --max-connections
        self._waiting_sessions = waiting_sessions
        # The route whose slot was taken for the client being accepted (None once
        # a session holds it, or it was given back).
        self.reserved: Optional[Route] = None
        self._limit_paused = False  # a listener was paused at MaxConnections
        self._wake_fd: Optional[int] = None
        self._on_wake: Callable[[], None] = lambda: None

    def start(self, on_wake: Callable[[], None]) -> None:
        """Watch the wake pipe (under --workers): ``on_wake`` when room may be free."""
        self._on_wake = on_wake
        fd = self.counters.wake_fd
        if fd is not None and self._wake_fd is None:
            self._wake_fd = fd
            self._loop.watch(fd, self._on_pipe)
            self._loop.set_interest(fd, EVENT_READ)

    def open_total(self) -> int:
        """Open connections counted against ``--max-connections`` (all workers)."""
        return self.counters.total(self._total_slot) if self.max_connections is not None else 0

    def _total_has_room(self, reserve: bool) -> bool:
        limit = self.max_connections
        if limit is None:
            return True
        counters, slot = self.counters, self._total_slot
        if counters.take(slot, limit) if reserve else counters.has_room(slot, limit):
            return True
        self._limit_paused = self.total_paused = True
        return False

    def has_room(self, route: Route) -> bool:
        """Whether the app is below its MaxConnections (no reservation)."""
        if not self._total_has_room(reserve=False):
            return False
        limit = route.app.max_connections
        if limit is None or route.counters.has_room(route.slot, limit):
            return True
        self._limit_paused = True
        return False

    def reserve(self, route: Route) -> bool:
        """Take the app's slot for the client about to be accepted."""
        if self.max_connections is not None and not self._total_has_room(reserve=True):
            return False
        limit = route.app.max_connections
        if limit is None:
            route.counters.add(route.slot, 1)
        elif not route.counters.take(route.slot, limit):
            self._limit_paused = True
            self._release_total()
            return False
        self.reserved = route
        return True

    def consume(self) -> None:
        """The accepted client became a session: it holds the reservation."""
        self.reserved = None

    def unreserve(self) -> None:
        """No session took the reservation: give it back."""
        route, self.reserved = self.reserved, None
        if route is not None:
            self.release(route, route)

    def release(self, route: Route, current: Optional[Route]) -> None:
        """A session of ``route``'s app closed; ``current`` is the app's route
        now (a reload may have changed its limit, or removed it)."""
        limited = route.app.max_connections is not None or (
            current is not None and current.app.max_connections is not None)
        if limited:
            route.counters.give_back(route.slot)
        else:
            route.counters.add(route.slot, -1)
        if self.max_connections is not None:
            self._release_total()

    def _release_total(self) -> None:
        if self.max_connections is not None:
            self.counters.give_back(self._total_slot)  # wakes workers paused at the limit

    def settle(self) -> None:
        """Nothing of this worker waits any more: stop being woken."""
        if not self._limit_paused and not self._waiting_sessions():
            self.counters.clear_waiting()

    def _on_pipe(self, events: int) -> None:
        self.counters.drain_wake()
        self._limit_paused = False  # asked again by on_wake
        self._on_wake()
        self.settle()

    def close(self) -> None:
        if self._wake_fd is not None:
            self._loop.unwatch(self._wake_fd)
            self._wake_fd = None
        self.counters.clear_waiting()
