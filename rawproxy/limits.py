"""Per-client limits (an app's ``PerClient``): pure logic, no sockets.

* :func:`client_key` -- who a client is, for counting: its IPv4 address;
  for IPv6 its /64 (one host or one customer network usually holds a whole
  /64, so counting single IPv6 addresses would let a client step around
  its limit by changing address); an IPv4-mapped IPv6 address counts as
  the IPv4 address it maps.
* :class:`ClientTable` -- one app's clients: open connections, and a token
  bucket of new connections per client (``Rate`` r: r tokens a second,
  holding at most ``max(r, 1)``, so a client may open a burst of r at once).
  ``admit(key)`` says yes (and counts the connection) or why not;
  ``release(key)`` when that connection closes.
* :class:`PerClientLimits` -- the tables of every app with ``PerClient``,
  and which table each admitted connection was counted in, so that it is
  released there even after a reload changed or removed the app's limits.
* :class:`LogThrottle` -- at most one line a second (per app) under a
  flood; what it held back is counted for one summary line.

Memory stays bounded under a flood of distinct addresses:

* A refused connection never adds an entry (the client had one already).
* A client with open connections has an entry: at most one per open
  connection, which the descriptor limit bounds already.
* A client with none left is forgotten as soon as its entry holds nothing
  a fresh one would not: at once without ``Rate``, else once its bucket
  has refilled (``max(r, 1) / r`` seconds: at most 1 s for r >= 1).
* Those idle entries are capped (``max_idle``, :data:`MAX_IDLE_CLIENTS` by
  default), every app together (an :class:`IdleBudget` the tables share):
  at the cap the oldest idle entry of the table adding one is forgotten
  (a flooded app gives up its own entries, not another app's), and that
  client gets a full bucket again a little early.  New clients are never refused
  for want of room, and open connections are never forgotten.
"""

from __future__ import annotations

import collections
import ipaddress
import math
from typing import Callable, Hashable, Mapping, Optional

Clock = Callable[[], float]
# (MaxConnections or None, Rate or None) of one app.
Limits = tuple[Optional[int], Optional[float]]

# Idle entries kept, every app together, at about 200 bytes each: ~13 MB at
# most.  At r >= 1 an entry is idle for at most 1 s, so this is exact rate
# limiting for up to 65,536 distinct clients a second.
MAX_IDLE_CLIENTS = 65536


class IdleBudget:
    """The idle entries every app's table may keep, together: one cap for the
    process, not one per app (a thousand apps must not mean 1000 x 13 MB)."""

    __slots__ = ("limit", "used")

    def __init__(self, limit: int = MAX_IDLE_CLIENTS) -> None:
        self.limit = limit
        self.used = 0


def client_key(addr: object) -> str:
    """The address a client is counted under (see the module docstring)."""
    if not isinstance(addr, tuple) or not addr:
        return str(addr)
    host = str(addr[0]).split("%", 1)[0]  # an IPv6 scope (fe80::1%eth0) is no part of it
    if ":" not in host:
        return host  # IPv4, as the kernel wrote it: canonical already
    try:
        ip = ipaddress.IPv6Address(host)
    except ValueError:
        return host
    if ip.ipv4_mapped is not None:
        return str(ip.ipv4_mapped)
    return str(ipaddress.IPv6Network((int(ip) >> 64 << 64, 64)))


class _Client:
    __slots__ = ("open", "tokens", "stamp")

    def __init__(self, tokens: float, stamp: float) -> None:
        self.open = 0
        self.tokens = tokens  # as of ``stamp``
        self.stamp = stamp


class ClientTable:
    """One app's clients under ``PerClient`` (see the module docstring)."""

    def __init__(self, max_connections: Optional[int], rate: Optional[float],
                 clock: Clock, max_idle: int = MAX_IDLE_CLIENTS,
                 budget: Optional[IdleBudget] = None) -> None:
        self._clock = clock
        self._budget = budget if budget is not None else IdleBudget(max_idle)
        self._clients: dict[str, _Client] = {}
        # Clients with no open connection: key -> when it closed its last, oldest first.
        self._idle: collections.OrderedDict[str, float] = collections.OrderedDict()
        self.max_connections: Optional[int] = None
        self.rate: Optional[float] = None
        self._burst = 1.0
        self._refill_s = 0.0
        self.configure(max_connections, rate)

    def configure(self, max_connections: Optional[int], rate: Optional[float]) -> None:
        """New limits (a reload); open connections stay counted."""
        self.max_connections = max_connections
        self.rate = rate
        # A burst below one token would refuse every connection.
        self._burst = max(rate, 1.0) if rate is not None else 1.0
        self._refill_s = self._burst / rate if rate is not None else 0.0
        for client in self._clients.values():
            client.tokens = min(client.tokens, self._burst)
        if rate is None:
            for key in self._idle:
                del self._clients[key]
            self._budget.used -= len(self._idle)
            self._idle.clear()

    def retire(self) -> None:
        """The app went (a reload): give back its idle entries, and keep
        none from now on (its open connections are still released here)."""
        self.configure(self.max_connections, None)

    def __len__(self) -> int:
        """Clients remembered: with open connections, or idle and not yet expired."""
        return len(self._clients)

    def open_count(self, key: str) -> int:
        client = self._clients.get(key)
        return client.open if client is not None else 0

    def admit(self, key: str) -> str:
        """Count a new connection of ``key``: "" if admitted, else why not."""
        now = self._clock()
        self._expire(now)
        client = self._clients.get(key)
        if client is None:
            client = self._clients[key] = _Client(self._burst, now)
        elif self.max_connections is not None and client.open >= self.max_connections:
            return f"{key} over PerClient MaxConnections {self.max_connections}"
        if self.rate is not None:
            tokens = min(self._burst, client.tokens + (now - client.stamp) * self.rate)
            client.stamp = now
            if tokens < 1.0:
                client.tokens = tokens
                return f"{key} over PerClient Rate {self.rate:g}/s"
            client.tokens = tokens - 1.0
        client.open += 1
        if client.open == 1 and self._idle.pop(key, None) is not None:
            self._budget.used -= 1
        return ""

    def release(self, key: str) -> None:
        """One connection of ``key`` (admitted here) closed."""
        client = self._clients.get(key)
        if client is None or client.open <= 0:
            return
        client.open -= 1
        if client.open:
            return
        if self.rate is None:
            del self._clients[key]  # nothing to remember
            return
        self._idle[key] = self._clock()
        budget = self._budget
        budget.used += 1
        if budget.used > budget.limit:
            oldest, _ = self._idle.popitem(last=False)
            del self._clients[oldest]
            budget.used -= 1

    def _expire(self, now: float) -> None:
        # A client idle for _refill_s has a full bucket (its stamp is no
        # later than its last close): a fresh entry would say the same.
        idle = self._idle
        while idle:
            key, since = next(iter(idle.items()))
            if now - since < self._refill_s:
                return
            del idle[key]
            del self._clients[key]
            self._budget.used -= 1


class PerClientLimits:
    """Every app's :class:`ClientTable`, and where each admitted connection counts."""

    def __init__(self, clock: Clock, max_idle: int = MAX_IDLE_CLIENTS) -> None:
        self._clock = clock
        self.idle_budget = IdleBudget(max_idle)  # shared by every app's table
        self.tables: dict[str, ClientTable] = {}
        self._held: dict[Hashable, tuple[ClientTable, str]] = {}

    def configure(self, limits: Mapping[str, Limits]) -> None:
        """``limits``: app name -> its PerClient; apps not in it have none.

        A table that stays keeps its counts; connections counted in a
        table that goes are still released there."""
        tables: dict[str, ClientTable] = {}
        for app, (max_connections, rate) in limits.items():
            table = self.tables.get(app)
            if table is None:
                table = ClientTable(max_connections, rate, self._clock,
                                    budget=self.idle_budget)
            else:
                table.configure(max_connections, rate)
            tables[app] = table
        for app, table in self.tables.items():
            if app not in tables:
                table.retire()
        self.tables = tables

    def admit(self, app: str, addr: object, holder: Hashable) -> str:
        """"" if ``addr`` may connect to ``app`` now (counted for ``holder``
        until :meth:`release`), else why not."""
        table = self.tables.get(app)
        if table is None:
            return ""
        key = client_key(addr)
        why = table.admit(key)
        if not why:
            self._held[holder] = (table, key)
        return why

    def release(self, holder: Hashable) -> None:
        held = self._held.pop(holder, None)
        if held is not None:
            held[0].release(held[1])

    def held(self) -> int:
        """Connections counted now, in every table."""
        return len(self._held)


class LogThrottle:
    """At most one line per ``interval_s``; lines held back are counted."""

    __slots__ = ("interval_s", "held", "_next")

    def __init__(self, interval_s: float = 1.0) -> None:
        self.interval_s = interval_s
        self.held = 0
        self._next = -math.inf

    def allow(self, now: float) -> bool:
        """True: log this one (a window opens); False: counted in ``held``."""
        if now >= self._next and not self.held:
            self._next = now + self.interval_s
            return True
        self.held += 1
        return False

    def window_left(self, now: float) -> float:
        return max(0.0, self._next - now)

    def take_held(self) -> int:
        """The count held back, reset; the next line is allowed once due."""
        held, self.held = self.held, 0
        return held
