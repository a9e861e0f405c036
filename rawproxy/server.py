"""Listeners and the wiring from an accepted client to a session.

One non-blocking listening socket per configured port.  A readable listener
is accepted from in a bounded batch (so one flooded port cannot monopolise
the loop), each client is checked against the app's ``AllowFrom``, given
``TCP_NODELAY`` and handed to a new :class:`~rawproxy.session.Session`.

A listener is paused (its read interest dropped; clients wait in the
kernel's backlog, they are not refused) while any of these holds:

* its app has ``MaxConnections`` sessions open;
* accept, or a session's target socket or pipe, failed for lack of
  descriptors or memory (retried after a short pause, so the loop neither
  spins nor crashes);

Reload (SIGHUP) swaps in a new validated config: listeners for new ports
are opened first (if one cannot be bound, the reload is rejected whole and
the old config keeps serving), listeners of removed ports are closed, and a
port that stays -- even one that moves to another app -- keeps its socket,
so it never refuses in between.  Open sessions keep the route they started
with; targets that survive keep their health state.

Draining (SIGTERM) closes every listener at once, lets open sessions finish
for up to the drain timeout, then closes the rest.
"""

from __future__ import annotations

import ipaddress
import json
import logging
import os
import random
import socket
from typing import Any, Callable, Optional

from . import netio
from .config import App, Config
from .health import HealthChecks
from .loop import EVENT_ERROR, EVENT_READ, EventLoop, Timer
from .metrics import Snapshot, TargetView
from .resolver import Resolver
from .ringbuf import BufferPool
from .router import Route, Router
from .pipes import PipePool
from .session import CopySession, Session, SessionContext, SpliceSession
from .stats import Stats

log = logging.getLogger("rawproxy.server")
access_log = logging.getLogger("rawproxy.access")

DEFAULT_BUFFER_BYTES = 64 * 1024
# How long accepting pauses after EMFILE/ENFILE/ENOBUFS/ENOMEM: long enough
# not to spin on a listener that stays readable, short enough that clients
# in the backlog barely notice once descriptors are free again.
ACCEPT_PAUSE_S = 0.1
# Pooled pipes (splice path) are closed once no connection is open for this long.
PIPE_TRIM_AFTER_S = 1.0


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
        if events & EVENT_ERROR:
            # Reported only while paused (empty mask); nothing to act on.
            self._server.loop.mute(self.fd)
            return
        self._server._accept_from(self)


class Server:
    def __init__(self, config: Config, loop: EventLoop, resolver: Resolver, *,
                 listen_host: str = "0.0.0.0", rng: Optional[random.Random] = None,
                 buffer_bytes: int = DEFAULT_BUFFER_BYTES, backlog: int = 1024,
                 accept_batch: int = 64, stats: Optional[Stats] = None,
                 half_open_timeout_s: float = 60.0, splice: bool = False,
                 reuse_port: bool = False) -> None:
        self.config = config
        self.loop = loop
        self.listen_host = listen_host
        self.stats = stats or Stats()
        self._rng = rng or random.Random()
        self._resolver = resolver
        self._health = HealthChecks(loop, resolver)
        # Under --workers: told of each passive-health change (app, target
        # address, down until or 0.0) so the supervisor can share it.
        self.on_health_change: Optional[Callable[[str, str, float], None]] = None
        self.router = Router(config, self._rng, stats=self.stats,
                             on_change=self._health_changed)
        self._backlog = backlog
        self._reuse_port = reuse_port
        self._accept_batch = accept_batch
        self._ctx = SessionContext(loop, resolver, BufferPool(buffer_bytes),
                                   self._on_session_closed, half_open_timeout_s,
                                   PipePool(buffer_bytes) if splice else None,
                                   self._pause_accepting)
        self._session_class: type[Session[Any]] = SpliceSession if splice else CopySession
        self._reserve_fd = -1
        self._trim_timer: Optional[Timer] = None
        self.listeners: dict[int, Listener] = {}
        self.sessions: set[Session[Any]] = set()
        # Keyed by app name, and kept for apps a reload removed while
        # their sessions are still open.
        self.active_by_app: dict[str, int] = {app.name: 0 for app in config.apps}
        self._accept_paused = False
        self._draining = False
        self._drain_timer: Optional[Timer] = None
        self.on_drained: Callable[[], None] = loop.stop

    # -- listening ------------------------------------------------------------

    def start(self) -> None:
        """Bind every port; on any failure close what was bound and raise BindError."""
        for listener in self._bind_all(self.router, sorted(self.router.ports)):
            self._register(listener)
        self._reserve_fd = _open_reserve_fd()
        self._health.start(self.router)
        log.info("ready: %d ports for %d apps on %s", len(self.listeners),
                 len(self.config.apps), self.listen_host)

    def _bind_all(self, router: Router, ports: list[int]) -> list[Listener]:
        """Listening sockets for ``ports``: all of them, or BindError and none."""
        bound: list[Listener] = []
        try:
            for port in ports:
                bound.append(self._bind(port, router.ports[port]))
        except BindError:
            for listener in bound:
                netio.close(listener.sock)
            raise
        return bound

    def _bind(self, port: int, route: Route) -> Listener:
        address = netio.format_sockaddr((self.listen_host, port))
        try:
            sock = netio.open_listener(self.listen_host, port, self._backlog,
                                       self._reuse_port)
        except (OSError, UnicodeError) as exc:
            reason = getattr(exc, "strerror", None) or str(exc)
            raise BindError(address, port, route.app.name, reason) from exc
        return Listener(sock, port, route, self)

    def _register(self, listener: Listener) -> None:
        self.listeners[listener.port] = listener
        self.loop.watch(listener.fd, listener.on_events)
        self.loop.set_interest(listener.fd, EVENT_READ if self._wants_accept(listener) else 0)
        log.info("listening on %s for app %s",
                 netio.format_sockaddr((self.listen_host, listener.port)),
                 listener.route.app.name)

    def _close_listener(self, listener: Listener) -> None:
        self.loop.unwatch(listener.fd)
        netio.close(listener.sock)
        del self.listeners[listener.port]

    def _wants_accept(self, listener: Listener) -> bool:
        if self._accept_paused or self._draining:
            return False
        limit = listener.route.app.max_connections
        return limit is None or self.active_by_app.get(listener.route.app.name, 0) < limit

    def _refresh_listeners(self, app_name: Optional[str] = None) -> None:
        for listener in self.listeners.values():
            if app_name is None or listener.route.app.name == app_name:
                mask = EVENT_READ if self._wants_accept(listener) else 0
                self.loop.set_interest(listener.fd, mask)

    def close_listeners(self) -> None:
        for listener in list(self.listeners.values()):
            self._close_listener(listener)

    # -- reloading ------------------------------------------------------------

    def reload(self, config: Config) -> None:
        """Serve ``config`` from now on; BindError leaves the old one serving."""
        if self._draining:
            raise RuntimeError("draining: reload ignored")
        router = Router(config, self._rng, stats=self.stats, previous=self.router,
                        on_change=self._health_changed)
        added = sorted(set(router.ports) - set(self.listeners))
        removed = sorted(set(self.listeners) - set(router.ports))
        opened = self._bind_all(router, added)
        for port in removed:
            log.info("closing port %d (no longer in the config)", port)
            self._close_listener(self.listeners[port])
        for port, listener in self.listeners.items():
            listener.route = router.ports[port]  # a moved port keeps its socket
        self.router = router
        self.config = config
        for app in config.apps:
            self.active_by_app.setdefault(app.name, 0)
        for listener in opened:
            self._register(listener)
        self._resolver.forget()
        self._health.start(router)
        self._refresh_listeners()
        log.info("config reloaded: %d ports for %d apps (%d opened, %d closed)",
                 len(self.listeners), len(config.apps), len(added), len(removed))

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
                    self._shed_one(listener)
                    self._pause_accepting(exc.strerror or str(exc))
                    return
                raise
            self._on_client(listener, client, addr)

    def _shed_one(self, listener: Listener) -> None:
        """libuv's trick: spend the reserve descriptor to accept and close the
        waiting client, so it hears at once instead of hanging in the backlog."""
        if self._reserve_fd < 0:
            return
        os.close(self._reserve_fd)
        self._reserve_fd = -1
        try:
            client, addr = listener.sock.accept()
        except OSError:
            pass
        else:
            listener.route.stats.accepted += 1
            listener.route.stats.ended("shed")
            _log_access(listener.route.app.name, listener.port, netio.format_sockaddr(addr),
                        "-", 0, 0, 0, "shed", "out of file descriptors")
            netio.abort(client)
        self._reserve_fd = _open_reserve_fd()

    def _pause_accepting(self, reason: str) -> None:
        """Out of descriptors or memory (at accept, or for a target socket):
        stop taking clients that could not be served, for a short while."""
        if self._accept_paused:
            return
        log.warning("accept paused for %.1fs: %s", ACCEPT_PAUSE_S, reason)
        self._accept_paused = True
        self._refresh_listeners()
        self.loop.call_later(ACCEPT_PAUSE_S, self._resume_accepting)

    def _resume_accepting(self) -> None:
        self._accept_paused = False
        if self._reserve_fd < 0:
            self._reserve_fd = _open_reserve_fd()
        self._refresh_listeners()

    def _on_client(self, listener: Listener, client: socket.socket, addr: object) -> None:
        route = listener.route
        app = route.app
        client_addr = netio.format_sockaddr(addr)
        route.stats.accepted += 1
        if app.allow_from and not _is_allowed(addr, app):
            route.stats.denied += 1
            route.stats.ended("denied")
            _log_access(app.name, listener.port, client_addr, "-", 0, 0, 0, "denied",
                        "not in AllowFrom")
            netio.abort(client)
            return
        client.setblocking(False)
        netio.set_nodelay(client)
        session = self._session_class(self._ctx, route, client, client_addr, listener.port)
        self.sessions.add(session)
        self.active_by_app[app.name] = self.active_by_app.get(app.name, 0) + 1
        if app.max_connections is not None and self.active_by_app[app.name] >= app.max_connections:
            self._refresh_listeners(app.name)
        session.start()

    def _on_session_closed(self, session: Session[Any]) -> None:
        self.sessions.discard(session)
        app = session.route.app
        self.active_by_app[app.name] -= 1
        current = self.router.routes.get(app.name)
        if current is not None and current.app.max_connections is not None:
            self._refresh_listeners(app.name)
        stats = session.route.stats
        bytes_in, bytes_out = session.bytes_from_client, session.bytes_from_target
        stats.bytes_in += bytes_in
        stats.bytes_out += bytes_out
        stats.ended(session.end)
        _log_access(app.name, session.listen_port, session.client_addr,
                    session.target.address if session.target is not None else "-",
                    bytes_in, bytes_out, int((self.loop.now - session.started_at) * 1000),
                    session.end, session.end_detail)
        if not self.sessions and self._ctx.pipes is not None and self._trim_timer is None:
            self._trim_timer = self.loop.call_later(PIPE_TRIM_AFTER_S, self._trim_pipes)
        if self._draining and not self.sessions:
            self._finish_drain()

    def _trim_pipes(self) -> None:
        """Idle for a while: close pooled pipes, so an idle proxy holds only
        its listeners (and an operator's fd count means what it says)."""
        self._trim_timer = None
        if not self.sessions and self._ctx.pipes is not None:
            self._ctx.pipes.close()

    # -- health shared between workers -----------------------------------------

    def _health_changed(self, app: str, address: str, down_until: float) -> None:
        if self.on_health_change is not None:
            self.on_health_change(app, address, down_until)

    def apply_shared_health(self, app: str, address: str, down_until: float) -> None:
        """A sibling worker's passive verdict on a target (see Balancer.apply_shared)."""
        self.router.apply_shared(app, address, down_until)

    # -- views for the admin endpoint ------------------------------------------

    def metrics_snapshot(self) -> Snapshot:
        live_in: dict[str, int] = {}
        live_out: dict[str, int] = {}
        for session in self.sessions:
            name = session.route.app.name
            live_in[name] = live_in.get(name, 0) + session.bytes_from_client
            live_out[name] = live_out.get(name, 0) + session.bytes_from_target
        now = self.loop.time()
        targets = {
            name: [TargetView(h.target.address, not h.is_down(now), h.consecutive_failures)
                   for h in route.balancer.healths()]
            for name, route in self.router.routes.items()
        }
        return Snapshot(self.stats, dict(self.active_by_app), live_in, live_out, targets,
                        self._draining)

    def config_view(self) -> dict[str, object]:
        """The running config with live target health, for ``GET /config``."""
        now = self.loop.time()
        apps = []
        for route in self.router.routes.values():
            app = route.app
            apps.append({
                "Name": app.name,
                "Ports": list(app.ports),
                "Targets": [{
                    "Address": h.target.address,
                    "Weight": h.target.weight,
                    "Up": not h.is_down(now),
                    "ConsecutiveFailures": h.consecutive_failures,
                    "LastFailure": h.last_failure or None,
                    "HealthCheckFailing": h.check_failed,
                } for h in route.balancer.healths()],
                "ConnectTimeout": app.connect_timeout_s,
                "IdleTimeout": app.idle_timeout_s,
                "MaxConnections": app.max_connections,
                "ProxyProtocol": app.proxy_protocol,
                "HealthCheck": None if app.health_check is None else {
                    "Interval": app.health_check.interval_s,
                    "Timeout": app.health_check.timeout_s},
                "AllowFrom": [str(network) for network in app.allow_from],
                "ActiveConnections": self.active_by_app.get(app.name, 0),
            })
        return {"Source": self.config.source, "ListenHost": self.listen_host,
                "Draining": self._draining, "Apps": apps}

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
        self._health.stop()
        log.info("draining %d connections for up to %gs", len(self.sessions), timeout_s)
        if not self.sessions:
            self._finish_drain()
            return
        self._drain_timer = self.loop.call_later(timeout_s, self._drain_timed_out)

    def _drain_timed_out(self) -> None:
        self._drain_timer = None
        log.warning("drain timeout: closing %d connections", len(self.sessions))
        self.close_sessions("drain-timeout")

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
        self._health.stop()
        if self._reserve_fd >= 0:
            os.close(self._reserve_fd)
            self._reserve_fd = -1
        if self._ctx.pipes is not None:
            self._ctx.pipes.close()
        self.close_sessions("shutdown")


def _open_reserve_fd() -> int:
    try:
        return os.open(os.devnull, os.O_RDONLY | os.O_CLOEXEC)
    except OSError:
        return -1  # out of descriptors already; retried when accepting resumes


def _log_access(app: str, port: int, client: str, target: str, bytes_in: int,
                bytes_out: int, duration_ms: int, end: str, detail: str) -> None:
    if not access_log.isEnabledFor(logging.INFO):
        return
    fields = {"app": app, "port": port, "client": client, "target": target,
              "bytes_in": bytes_in, "bytes_out": bytes_out, "duration_ms": duration_ms,
              "end": end}
    if detail:
        fields["why"] = detail
    text = " ".join(f"{key}={_text_value(value)}" for key, value in fields.items())
    access_log.info(text, extra={"fields": fields})


def _text_value(value: object) -> str:
    if isinstance(value, str) and (not value or " " in value or '"' in value):
        return json.dumps(value)
    return str(value)


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
