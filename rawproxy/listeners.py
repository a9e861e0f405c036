"""The listening sockets of a server: one per configured port.

* :meth:`ListenerSet.bind` opens a non-blocking listening socket for each
  port asked for, all or none: if one cannot be bound, those already opened
  are closed and :class:`BindError` names the port, its app and the OS
  reason (a reload is then rejected whole; at start the proxy exits 1).
* :meth:`ListenerSet.add` puts a bound listener on the loop.  Its read
  interest is what ``wants_accept(listener)`` answers; :meth:`refresh` asks
  again when the answer may have changed (an app at or below its
  ``MaxConnections``, accepting paused or resumed, draining).  A paused
  listener leaves clients in the kernel's backlog: they wait, they are not
  refused.
* A readable listener is accepted from in a bounded batch (so one flooded
  port cannot monopolise the loop), each client handed to
  ``on_client(listener, sock, addr)``; an error reported for a paused
  listener is muted, as there is nothing to act on.  Before each accept,
  ``admit(listener)`` is asked (default: ``wants_accept``): it may reserve
  the room the client will take (a slot of a limit shared between
  processes), and ``unadmit(listener)`` gives it back when no client came.
* When accept fails for lack of descriptors or memory, one waiting client
  is shed (libuv's trick: a reserve descriptor is spent to accept and reset
  it, so it hears at once instead of hanging in the backlog), then
  ``on_exhausted(listener, shed_addr or None, reason)`` lets the server
  count it and pause accepting.  :meth:`restore_reserve` takes a new
  reserve descriptor once accepting resumes.
* A port that stays across a reload keeps its socket even when it moves to
  another app (:meth:`retarget`), so it never refuses in between.
* A port with a socket in ``inherited`` (systemd's, or one an upgrade
  handed down) takes it instead of binding one.
"""

from __future__ import annotations

import logging
import os
import socket
from typing import Callable, Iterable, Mapping, Optional

from . import netio
from .inherited import InheritedSockets
from .loop import EVENT_ERROR, EVENT_READ, EventLoop
from .router import Route

# The listeners' lines ("listening on ...") are the server's, as before the split.
log = logging.getLogger("rawproxy.server")

OnClient = Callable[["Listener", socket.socket, object], None]
# (listener, the shed client's address or None, the OS reason)
OnExhausted = Callable[["Listener", Optional[object], str], None]


class BindError(Exception):
    def __init__(self, address: str, port: int, app: str, reason: str) -> None:
        super().__init__(f'cannot listen on {address} (app "{app}", port {port}): {reason}')
        self.port = port
        self.app = app


class Listener:
    __slots__ = ("sock", "fd", "port", "route", "_set", "nodelay_inherited", "family", "batch",
                 "_accept_later")

    def __init__(self, sock: socket.socket, port: int, route: Route,
                 listener_set: ListenerSet) -> None:
        self.sock = sock
        self.fd = sock.fileno()
        self.port = port
        self.route = route
        self._set = listener_set
        # True: the clients it accepts have TCP_NODELAY already (one
        # setsockopt per client saved); False: each needs its own.
        self.nodelay_inherited = netio.nodelay_for_accepted(sock)
        self.family = int(sock.family)
        # Clients accepted a turn: the set's batch, or 1 while the clients it
        # accepts are turned away (a flood): resets are the cheapest work of
        # all, and one a turn keeps every other connection's wait short.
        self.batch = listener_set.accept_batch
        self._accept_later = self._accept_batch  # bound once, not per event

    def on_events(self, events: int) -> None:
        if events & EVENT_ERROR:
            # Reported only while paused (empty mask); nothing to act on.
            self._set.loop.mute(self.fd)
            return
        # After this turn's other events: the connections already open (other
        # apps' among them) do not wait behind a batch of accepts, a flooded
        # listener's resets included.
        self._set.loop.call_soon(self._accept_later)

    def _accept_batch(self) -> None:
        if self._set.by_port.get(self.port) is self:  # not removed meanwhile (a reload)
            self._set.accept_from(self)


class ListenerSet:
    def __init__(self, loop: EventLoop, host: str, *, backlog: int, reuse_port: bool,
                 accept_batch: int, wants_accept: Callable[[Listener], bool],
                 on_client: OnClient, on_exhausted: OnExhausted,
                 admit: Optional[Callable[[Listener], bool]] = None,
                 unadmit: Callable[[Listener], None] = lambda listener: None) -> None:
        self.loop = loop
        self.host = host
        self._backlog = backlog
        self._reuse_port = reuse_port
        self.accept_batch = accept_batch
        self._wants_accept = wants_accept
        self._admit = admit or wants_accept
        self._unadmit = unadmit
        self._on_client = on_client
        self._on_exhausted = on_exhausted
        self._reserve_fd = -1
        self.by_port: dict[int, Listener] = {}
        # Sockets handed down by systemd or an upgrade: taken instead of binding.
        self.inherited: Optional[InheritedSockets] = None

    def __len__(self) -> int:
        return len(self.by_port)

    def bind(self, routes: Mapping[int, Route], ports: Iterable[int]) -> list[Listener]:
        """Listening sockets for ``ports``: all of them, or BindError and none."""
        bound: list[Listener] = []
        try:
            for port in ports:
                bound.append(self._bind(port, routes[port]))
        except BindError:
            for listener in bound:
                netio.close(listener.sock)
            raise
        return bound

    def _bind(self, port: int, route: Route) -> Listener:
        address = netio.format_sockaddr((self.host, port))
        inherited = self.inherited.take(self.host, port) if self.inherited is not None else None
        if inherited is not None:
            return Listener(inherited, port, route, self)
        try:
            sock = netio.open_listener(self.host, port, self._backlog, self._reuse_port)
        except (OSError, UnicodeError) as exc:
            reason = getattr(exc, "strerror", None) or str(exc)
            raise BindError(address, port, route.app.name, reason) from exc
        return Listener(sock, port, route, self)

    def add(self, listener: Listener) -> None:
        self.by_port[listener.port] = listener
        self.loop.watch(listener.fd, listener.on_events)
        self.loop.set_interest(listener.fd, EVENT_READ if self._wants_accept(listener) else 0)
        log.info("listening on %s for app %s",
                 netio.format_sockaddr((self.host, listener.port)), listener.route.app.name)

    def remove(self, port: int) -> None:
        listener = self.by_port.pop(port)
        self.loop.unwatch(listener.fd)
        netio.close(listener.sock)

    def retarget(self, routes: Mapping[int, Route]) -> None:
        """Give every listener its port's route in ``routes`` (after a reload)."""
        for port, listener in self.by_port.items():
            listener.route = routes[port]

    def refresh(self, app_name: Optional[str] = None) -> None:
        """Ask ``wants_accept`` again, for one app's listeners or for all."""
        for listener in self.by_port.values():
            if app_name is None or listener.route.app.name == app_name:
                self._set_accepting(listener)

    def _set_accepting(self, listener: Listener) -> None:
        mask = EVENT_READ if self._wants_accept(listener) else 0
        self.loop.set_interest(listener.fd, mask)

    def close(self) -> None:
        for port in list(self.by_port):
            self.remove(port)
        if self._reserve_fd >= 0:
            os.close(self._reserve_fd)
            self._reserve_fd = -1

    # -- accepting ------------------------------------------------------------

    def accept_from(self, listener: Listener) -> None:
        taken = 0
        while taken < listener.batch:  # re-read: a reset in this batch ends it
            taken += 1
            if not self._admit(listener):
                # No room: stop watching it (level-triggered, it would spin)
                # until a freed slot wakes this worker; asking again sets the
                # worker's waiting mark, under the lock, so that wake comes.
                self._set_accepting(listener)
                return
            try:
                # socket.accept() without its Python layer: that turns the
                # listener's family and type into enums on every call (nine
                # calls of the interpreter's own per connection).
                fd, addr = listener.sock._accept()  # type: ignore[attr-defined]
                try:
                    client = netio.StreamSocket(listener.family, socket.SOCK_STREAM, 0, fd)
                except BaseException:
                    os.close(fd)  # no socket object owns it: closed here
                    raise
            except netio.WOULD_BLOCK:
                self._unadmit(listener)
                return
            except OSError as exc:
                self._unadmit(listener)
                if exc.errno in netio.ACCEPT_TRANSIENT_ERRNOS:
                    continue
                if exc.errno in netio.ACCEPT_RESOURCE_ERRNOS:
                    self._on_exhausted(listener, self._shed_one(listener),
                                       exc.strerror or str(exc))
                    return
                raise
            self._on_client(listener, client, addr)

    def _shed_one(self, listener: Listener) -> Optional[object]:
        """Spend the reserve descriptor to accept and reset one waiting client."""
        if self._reserve_fd < 0:
            return None
        os.close(self._reserve_fd)
        self._reserve_fd = -1
        addr: Optional[object] = None
        try:
            client, addr = listener.sock.accept()
        except OSError:
            pass
        else:
            netio.abort(client)
        self.restore_reserve()
        return addr

    def restore_reserve(self) -> None:
        """Hold a spare descriptor for shedding, unless one is held already."""
        if self._reserve_fd < 0:
            try:
                self._reserve_fd = os.open(os.devnull, os.O_RDONLY | os.O_CLOEXEC)
            except OSError:
                pass  # out of descriptors already; retried when accepting resumes
