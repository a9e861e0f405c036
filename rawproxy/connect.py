"""One connect to one target: resolve its name, try each address, within a budget.

Sessions (with failover across targets on top) and active health checks
both connect through a :class:`Connector`, so "connected" and "failed, and
why" mean the same everywhere::

    start -> RESOLVING -> CONNECTING address 1 [-> address 2 ...] -> done
                    \\-> done (name did not resolve, budget spent, our shortage)

It reports once, through a callback, and never after :meth:`cancel`:

* ``on_connected(sock)``: the socket is connected and now the caller's
  (non-blocking, and unwatched; or, with ``keep_watched``, still watched
  with write interest, for the caller to take over with
  ``loop.replace_handler`` and its own mask: one interest change instead
  of a deregistration and a registration).  With ``at_once``, a connect to
  a loopback address that is over when ``connect()`` returns (it usually
  is: :func:`~rawproxy.netio.established`) is reported from within
  :meth:`Connector.start`, never watched and without a timeout armed;
  its fd is then the caller's to watch, ``keep_watched`` or not;
* ``on_failed(reason, detail)``: ``reason`` is a connect reason from
  :mod:`~rawproxy.outcomes` (``DNS``, ``TIMEOUT``, ``REFUSED``, ...) or an
  errno name, ``detail`` the text for logs; or ``reason`` is
  ``outcomes.NO_RESOURCES`` when the shortage is ours (no descriptor, no
  memory, no resolver thread): then the target did nothing wrong and the
  caller must not charge it.

The connect's result comes from its first event where the loop's events
are exact (epoll: write readiness alone means connected, as TCP is not
writable before the handshake, and an error or hang-up comes with more
bits); anything else, or another poller, asks the socket (``SO_ERROR``
and the peer name, :func:`~rawproxy.netio.finish_connect`).

Time: the whole attempt, resolution included, has ``budget_s``
(``ConnectTimeout`` for a session, the check's ``Timeout``).  Each address
gets its own share of what is left, so a first address that drops SYNs
cannot spend the whole budget while a working second one waits (see
:func:`address_share`).
"""

from __future__ import annotations

import socket
from typing import Callable, Optional

from . import netio, outcomes
from .loop import EVENT_WRITE, EventLoop, Timer
from .resolver import Address, Resolution, Resolver
from .timeouts import Timeouts

OnConnected = Callable[[socket.socket], None]
OnFailed = Callable[[str, str], None]

# The least time one address is given, budget allowing: a share shorter
# than a slow network's handshake would turn slow addresses into failed
# ones without helping the next.
ADDRESS_FLOOR_S = 0.25


def address_share(remaining_s: float, addresses_left: int) -> float:
    """How long the next address may take, ``addresses_left`` counting it.

    An equal split of what is left: a name with one address keeps the
    whole budget (as before), the last address gets all that remains, and
    time an address did not need (it failed fast) goes to the ones after
    it.  Happy-eyeballs-style racing (RFC 8305) would not abandon a slow
    first address, but it opens extra connections to the backend per
    client; a sequential split keeps one connect in flight per session.
    The floor keeps shares usable when a name has many addresses; the
    addresses it leaves no time for are not tried.
    """
    if remaining_s <= 0.0:
        return 0.0
    share = remaining_s / max(1, addresses_left)
    return min(remaining_s, max(share, ADDRESS_FLOOR_S))


class Connector:
    """Resolve, then connect to each address in turn until one answers.

    With ``timeouts`` (a table for this ``budget_s``), the usual attempt --
    one address, resolved at once, given the whole budget -- is timed there
    rather than by a loop timer (see :mod:`rawproxy.timeouts`).  With
    ``at_once``, an established loopback connect is reported without a turn.
    """

    __slots__ = ("_loop", "_resolver", "host", "port", "_on_connected", "_on_failed",
                 "_deadline", "_addresses", "_sock", "_fd", "_timer", "_reason", "started_at",
                 "done", "_keep_watched", "_resolving", "_timeouts", "_at_once")

    def __init__(self, loop: EventLoop, resolver: Resolver, host: str, port: int,
                 budget_s: float, on_connected: OnConnected, on_failed: OnFailed,
                 keep_watched: bool = False,
                 timeouts: Optional[Timeouts[Connector]] = None,
                 at_once: bool = False) -> None:
        self._loop = loop
        self._at_once = at_once  # until resolved: then only for loopback addresses
        self._keep_watched = keep_watched
        self._timeouts = timeouts
        self._resolver = resolver
        self.host = host
        self.port = port
        self._on_connected = on_connected
        self._on_failed = on_failed
        # The clock, not the turn's time: a connector may be built outside a
        # turn (health checks start before the loop runs), when now is stale.
        self.started_at = loop.clock()
        self._deadline = self.started_at + budget_s
        self._addresses: list[Address] = []
        self._sock: Optional[socket.socket] = None
        self._fd = -1
        self._timer: Optional[Timer] = None
        self._reason = outcomes.NO_ADDRESS  # the latest address's failure
        self.done = False
        self._resolving = False  # our callback is in the resolver's waiting list

    def start(self) -> None:
        resolution = self._resolver.resolve(self.host, self.port, self._on_resolved)
        if resolution is not None:
            self._on_resolved(resolution)  # a literal or a cached name: no timer yet
        elif not self.done:
            self._resolving = True
            self._timer = self._loop.call_later(self._deadline - self.started_at,
                                                self.on_timeout)

    def cancel(self) -> None:
        """Give up without a report, closing any socket in progress."""
        self._stop()

    def _on_resolved(self, resolution: Resolution) -> None:
        self._resolving = False
        if self.done:
            return  # the budget ran out first, or the caller cancelled
        if resolution.error:
            self._fail(outcomes.NO_RESOURCES if resolution.local else outcomes.DNS,
                       resolution.error)
            return
        self._addresses = list(resolution.addresses)
        self._at_once = self._at_once and resolution.loopback
        self._connect_next()

    def _connect_next(self) -> None:
        try:
            sock, self._reason = netio.connect_next(self._addresses, self._reason)
        except netio.LocalResourceError as exc:
            self._fail(outcomes.NO_RESOURCES, str(exc))
            return
        if sock is None:
            self._fail(self._reason, "")
            return
        if self._at_once and netio.established(sock):
            # Done: nothing to stop but an earlier address's timer (the table
            # is only armed below, for a single address).
            self.done = True
            if self._timer is not None:
                self._timer.cancel()
                self._timer = None
            self._on_connected(sock)  # never watched: the caller watches it
            return
        self._sock = sock
        self._fd = sock.fileno()
        self._loop.watch(self._fd, self._on_writable, mask=EVENT_WRITE)
        timeouts = self._timeouts
        if (timeouts is not None and self._timer is None and not self._addresses
                and self._reason == outcomes.NO_ADDRESS):
            timeouts.arm(self)  # the only address, the whole budget, no wait before it
            return
        if self._timer is not None:
            self._timer.cancel()
        remaining = self._deadline - self._loop.clock()
        share = (address_share(remaining, len(self._addresses) + 1) if self._addresses
                 else max(0.0, remaining))  # the last address: all that is left
        self._timer = self._loop.call_later(share, self.on_timeout)

    def _on_writable(self, events: int) -> None:
        sock = self._sock
        assert sock is not None
        if events != EVENT_WRITE or not self._loop.exact_write_events:
            try:
                if not netio.finish_connect(sock):
                    return  # a stale wake-up: the connect is still under way
            except netio.ConnectFailed as exc:
                self._reason = exc.reason
                self._drop_socket()
                self._connect_next()
                return
        if not self._keep_watched:
            self._loop.unwatch(self._fd)
        self._sock = None  # handed over: _stop must not close it
        self._stop()
        self._on_connected(sock)

    def on_timeout(self) -> None:
        """Time is up for the address being tried (or for the resolution)."""
        self._timer = None
        if self._sock is None:  # still resolving
            if not self._resolver.is_started(self.host, self.port):
                # Queued behind other names' lookups: our threads were short,
                # the name did nothing wrong (not charged to the target).
                self._fail(outcomes.NO_RESOURCES,
                           f"no resolver thread free to look {self.host} up in time")
            else:
                self._fail(outcomes.TIMEOUT, f"resolving {self.host} took too long")
            return
        self._reason = outcomes.TIMEOUT
        self._drop_socket()
        if self._addresses and self._loop.time() < self._deadline:
            self._connect_next()
        else:
            self._fail(outcomes.TIMEOUT, "")

    def _fail(self, reason: str, detail: str) -> None:
        if self._stop():
            self._on_failed(reason, detail or reason)

    def _stop(self) -> bool:
        """Release the timer and socket; False if already stopped."""
        if self.done:
            return False
        self.done = True
        if self._resolving:
            self._resolving = False
            self._resolver.withdraw(self.host, self.port, self._on_resolved)
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if self._timeouts is not None:
            self._timeouts.disarm(self)
        if self._sock is not None:
            self._drop_socket()
        return True

    def _drop_socket(self) -> None:
        if self._sock is not None:
            self._loop.unwatch(self._fd, closing=True)
            netio.close(self._sock)
            self._sock = None
            self._fd = -1


class ConnectTimeouts:
    """The connectors' timeout tables, one per budget (an app's ConnectTimeout)."""

    __slots__ = ("_loop", "_tables")

    def __init__(self, loop: EventLoop) -> None:
        self._loop = loop
        self._tables: dict[float, Timeouts[Connector]] = {}

    def for_budget(self, budget_s: float) -> Timeouts[Connector]:
        table = self._tables.get(budget_s)
        if table is None:
            table = self._tables[budget_s] = Timeouts(self._loop, budget_s, Connector.on_timeout)
        return table
