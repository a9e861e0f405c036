"""Listeners and the wiring from an accepted client to a session.

One non-blocking listening socket per configured port.  A readable listener
is accepted from in a bounded batch (so one flooded port cannot monopolise
the loop), each client is checked against the app's ``AllowFrom``, given
``TCP_NODELAY`` and handed to a new :class:`~rawproxy.session.Session`.

A listener is paused (its read interest dropped; clients wait in the
kernel's backlog, they are not refused) while any of these holds:

* its app has ``MaxConnections`` sessions open;
* accept failed for lack of descriptors or memory (retried after a short
  pause, so the loop neither spins nor crashes);

Draining (SIGTERM) closes every listener at once, lets open sessions finish
for up to the drain timeout, then closes the rest.
"""

from __future__ import annotations

import ipaddress
import logging
import random
import socket
from typing import Callable, Optional

from . import netio
from .config import App, Config
from .loop import EVENT_READ, EventLoop, Timer
from .resolver import Resolver
from .ringbuf import BufferPool
from .router import Route, Router
from .session import Session, SessionContext

log = logging.getLogger("rawproxy.server")
access_log = logging.getLogger("rawproxy.access")

DEFAULT_BUFFER_BYTES = 64 * 1024
# How long accepting pauses after EMFILE/ENFILE/ENOBUFS/ENOMEM: long enough
# not to spin on a listener that stays readable, short enough that clients
# in the backlog barely notice once descriptors are free again.
ACCEPT_PAUSE_S = 0.1


class BindError(Exception):
    def __init__(self, address: str, port: int, app: str, reason: str) -> None:
        super().__init__(f'cannot listen on {address} (app "{app}", port {port}): {reason}')
        self.port = port
        self.app = app


class Listener:
    __slots__ = ("sock", "fd", "port", "route", "_server")

    def __init__(self, sock: socket.socket, port: int, route: Route, server: Server) -> None:
        self.sock = sock
        self.fd = sock.fileno()
        self.port = port
        self.route = route
        self._server = server

    def on_events(self, events: int) -> None:
        self._server._accept_from(self)


class Server:
    def __init__(self, config: Config, loop: EventLoop, resolver: Resolver, *,
                 listen_host: str = "0.0.0.0", rng: Optional[random.Random] = None,
                 buffer_bytes: int = DEFAULT_BUFFER_BYTES, backlog: int = 1024,
                 accept_batch: int = 64) -> None:
        self.config = config
        self.loop = loop
        self.listen_host = listen_host
        self.router = Router(config, rng or random.Random())
        self._backlog = backlog
        self._accept_batch = accept_batch
        self._ctx = SessionContext(loop, resolver, BufferPool(buffer_bytes),
                                   self._on_session_closed)
        self.listeners: dict[int, Listener] = {}
        self.sessions: set[Session] = set()
        self.active_by_app: dict[str, int] = {app.name: 0 for app in config.apps}
        self.refused_by_app: dict[str, int] = {app.name: 0 for app in config.apps}
        self._accept_paused = False
        self._draining = False
        self._drain_timer: Optional[Timer] = None
        self.on_drained: Callable[[], None] = loop.stop

    # -- listening ------------------------------------------------------------

    def start(self) -> None:
        """Bind every port; on any failure close what was bound and raise BindError."""
        try:
            for port, route in sorted(self.router.ports.items()):
                self._listen(port, route)
        except BindError:
            self.close_listeners()
            raise
        for app in self.config.apps:
            unimplemented = [key for key, value in (("ProxyProtocol", app.proxy_protocol),
                                                    ("HealthCheck", app.health_check)) if value]
            if unimplemented:
                log.warning("app %s: %s not implemented yet, ignored", app.name,
                            " and ".join(unimplemented))
        log.info("ready: %d ports for %d apps on %s", len(self.listeners),
                 len(self.config.apps), self.listen_host)

    def _listen(self, port: int, route: Route) -> None:
        address = netio.format_sockaddr((self.listen_host, port))
        try:
            sock = netio.open_listener(self.listen_host, port, self._backlog)
        except (OSError, UnicodeError) as exc:
            reason = getattr(exc, "strerror", None) or str(exc)
            raise BindError(address, port, route.app.name, reason) from exc
        listener = Listener(sock, port, route, self)
        self.listeners[port] = listener
        self.loop.watch(listener.fd, listener.on_events)
        self.loop.set_interest(listener.fd, EVENT_READ)
        log.info("listening on %s for app %s", address, route.app.name)

    def _wants_accept(self, listener: Listener) -> bool:
        if self._accept_paused or self._draining:
            return False
        limit = listener.route.app.max_connections
        return limit is None or self.active_by_app[listener.route.app.name] < limit

    def _refresh_listeners(self, app: Optional[App] = None) -> None:
        for listener in self.listeners.values():
            if app is None or listener.route.app is app:
                mask = EVENT_READ if self._wants_accept(listener) else 0
                self.loop.set_interest(listener.fd, mask)

    def close_listeners(self) -> None:
        for listener in self.listeners.values():
            self.loop.unwatch(listener.fd)
            netio.close(listener.sock)
        self.listeners.clear()

    # -- accepting ------------------------------------------------------------

    def _accept_from(self, listener: Listener) -> None:
        for _ in range(self._accept_batch):
            if not self._wants_accept(listener):
                return
            try:
                client, addr = listener.sock.accept()
            except netio.WOULD_BLOCK:
                return
            except OSError as exc:
                if exc.errno in netio.ACCEPT_TRANSIENT_ERRNOS:
                    continue
                if exc.errno in netio.ACCEPT_RESOURCE_ERRNOS:
                    self._pause_accepting(exc)
                    return
                raise
            self._on_client(listener, client, addr)

    def _pause_accepting(self, exc: OSError) -> None:
        log.warning("accept paused for %.1fs: %s", ACCEPT_PAUSE_S, exc.strerror or exc)
        self._accept_paused = True
        self._refresh_listeners()
        self.loop.call_later(ACCEPT_PAUSE_S, self._resume_accepting)

    def _resume_accepting(self) -> None:
        self._accept_paused = False
        self._refresh_listeners()

    def _on_client(self, listener: Listener, client: socket.socket, addr: object) -> None:
        route = listener.route
        app = route.app
        client_addr = netio.format_sockaddr(addr)
        if app.allow_from and not _is_allowed(addr, app):
            self.refused_by_app[app.name] += 1
            access_log.info("app=%s port=%d client=%s end=%s", app.name, listener.port,
                            client_addr, "denied by AllowFrom")
            netio.abort(client)
            return
        client.setblocking(False)
        netio.set_nodelay(client)
        session = Session(self._ctx, route, client, client_addr, listener.port)
        self.sessions.add(session)
        self.active_by_app[app.name] += 1
        if app.max_connections is not None and self.active_by_app[app.name] >= app.max_connections:
            self._refresh_listeners(app)
        session.start()

    def _on_session_closed(self, session: Session) -> None:
        self.sessions.discard(session)
        app = session.route.app
        self.active_by_app[app.name] -= 1
        if app.max_connections is not None and self.active_by_app[app.name] == app.max_connections - 1:
            self._refresh_listeners(app)
        target = session.target.address if session.target is not None else "-"
        access_log.info(
            "app=%s port=%d client=%s target=%s bytes_in=%d bytes_out=%d duration_ms=%d end=%s",
            app.name, session.listen_port, session.client_addr, target,
            session.bytes_from_client, session.bytes_from_target,
            int((self.loop.now - session.started_at) * 1000), session.end_reason)
        if self._draining and not self.sessions:
            self._finish_drain()

    # -- stopping -------------------------------------------------------------

    @property
    def draining(self) -> bool:
        return self._draining

    def drain(self, timeout_s: float) -> None:
        """Stop accepting now; call ``on_drained`` when sessions end or time runs out."""
        if self._draining:
            return
        self._draining = True
        self.close_listeners()
        log.info("draining %d connections for up to %gs", len(self.sessions), timeout_s)
        if not self.sessions:
            self._finish_drain()
            return
        self._drain_timer = self.loop.call_later(timeout_s, self._drain_timed_out)

    def _drain_timed_out(self) -> None:
        self._drain_timer = None
        log.warning("drain timeout: closing %d connections", len(self.sessions))
        self.close_sessions("drain timeout")

    def _finish_drain(self) -> None:
        if self._drain_timer is not None:
            self._drain_timer.cancel()
            self._drain_timer = None
        self.on_drained()

    def close_sessions(self, reason: str) -> None:
        for session in list(self.sessions):
            session.close(reason, reset=True)

    def close(self) -> None:
        self._draining = True
        self.close_listeners()
        self.close_sessions("shutdown")


def _is_allowed(addr: object, app: App) -> bool:
    if not isinstance(addr, tuple):
        return False
    try:
        ip = ipaddress.ip_address(str(addr[0]).split("%", 1)[0])
    except ValueError:
        return False
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    return any(ip in network for network in app.allow_from)
