"""A server: the listeners of a config and the wiring from a client to a session.

:class:`Server` owns the :class:`~rawproxy.listeners.ListenerSet` (one
listening socket per configured port), the :class:`~rawproxy.router.Router`
and the open sessions.  An accepted client is checked against its app's
``AllowFrom``, given ``TCP_NODELAY`` and handed to a new
:class:`~rawproxy.session.Session`; when the session closes, its bytes and
how it ended are counted and logged (``accesslog``).

A listener is paused (clients wait in the kernel's backlog, they are not
refused) while its app has ``MaxConnections`` sessions open, counted for
all ``--workers`` together (``admission``; a session waiting for a target's
``HardLimit`` waits in its app's queue, ``waitqueue``); every listener
while the process has ``--max-connections`` open (:meth:`Server.open_connections_total`),
and for a short while after accept, or a session's target socket or pipe,
failed for lack of descriptors or memory (so the loop neither spins nor
crashes).  A client over its app's ``PerClient`` limits is reset at accept
(``end=client-limit``, counted; logged at most once a second per app, with
one summary line for the rest: see ``limits``).

Reload (SIGHUP) swaps in a new validated config: listeners for new ports
are opened first (if one cannot be bound, the reload is rejected whole and
the old config keeps serving), listeners of removed ports are closed, and a
port that stays -- even one that moves to another app -- keeps its socket,
so it never refuses in between.  Open sessions keep the route they started
with; targets that survive keep their health state.

Draining (SIGTERM) closes every listener at once, lets open sessions finish
for up to the drain timeout, then closes the rest.  The admin views of a
server are in ``views``.
"""

from __future__ import annotations

import ipaddress
import logging
import random
import socket
from typing import Any, Callable, Optional

from . import netio, outcomes
from .accesslog import access_log, log_access
from .admission import Admission
from .config import App, Config
from .counters import Counters, SharedCounters
from .health import HealthChecks
from .limits import LogThrottle, PerClientLimits
from .listeners import Listener, ListenerSet
from .loop import EventLoop, Timer
from .movers import CopySession, SpliceSession
from .pipes import PipePool
from .resolver import Resolver
from .ringbuf import BufferPool
from .router import Router
from .autostart import Autostart
from .session import Session
from .sessionctx import SessionContext
from .stats import Stats
from .waitqueue import WaitQueues

log = logging.getLogger("rawproxy.server")

DEFAULT_BUFFER_BYTES = 64 * 1024
# How long accepting pauses after EMFILE/ENFILE/ENOBUFS/ENOMEM: long enough
# not to spin on a listener that stays readable, short enough that clients
# in the backlog barely notice once descriptors are free again.
ACCEPT_PAUSE_S = 0.1
# Clients one listener accepts per loop turn; 1 while the last one it
# accepted was turned away (PerClient, AllowFrom, no target: a flood).  A
# reset costs 16-28 us of CPU, so a flooded listener would hold the loop
# 60-110 us a turn at 4, and every other connection waits that; at 1
# everywhere, churn costs 10-27 % more CPU a connection (make
# bench-fairness; NOTES.md section 2).
ACCEPT_BATCH = 4
# Pooled pipes (splice path) are closed once no connection is open for this long.
PIPE_TRIM_AFTER_S = 1.0


class Server:
    def __init__(self, config: Config, loop: EventLoop, resolver: Resolver, *,
                 listen_host: str = "0.0.0.0", rng: Optional[random.Random] = None,
                 buffer_bytes: int = DEFAULT_BUFFER_BYTES, backlog: int = 1024,
                 accept_batch: int = ACCEPT_BATCH, stats: Optional[Stats] = None,
                 half_open_timeout_s: float = 60.0, splice: bool = False,
                 reuse_port: bool = False, max_connections: Optional[int] = None,
                 counters: Optional[Counters] = None) -> None:
        """``counters``: this worker's handle on the shared counts (default:
        a block of its own, for one process)."""
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
        counters = counters or SharedCounters().worker(0)
        self.router = Router(config, self._rng, stats=self.stats,
                             on_change=self._health_changed, counters=counters)
        # Sessions waiting for a slot under a target's HardLimit, by app.
        self.queues = WaitQueues(loop.time, loop.call_later, loop.call_soon, self._left_queue)
        self.admission = Admission(loop, counters, lambda: len(self.queues), max_connections)
        self.listeners = ListenerSet(loop, listen_host, backlog=backlog, reuse_port=reuse_port,
                                     accept_batch=accept_batch, wants_accept=self._wants_accept,
                                     on_client=self._on_accepted, on_exhausted=self._on_exhausted,
                                     admit=self._admit,
                                     unadmit=lambda listener: self.admission.unreserve())
        self._ctx = SessionContext(loop, resolver, BufferPool(buffer_bytes),
                                   self._on_session_closed, half_open_timeout_s,
                                   PipePool(buffer_bytes) if splice else None,
                                   self._pause_accepting, self.queues)
        self._ctx.machines = self.autostart = Autostart(  # Machines (SPEC 10)
            loop, resolver, lambda: self.router, counters)
        self._session_class: type[Session[Any]] = SpliceSession if splice else CopySession
        self._trim_timer: Optional[Timer] = None
        self.sessions: set[Session[Any]] = set()
        # Keyed by app name, and kept for apps a reload removed while
        # their sessions are still open.
        self.active_by_app: dict[str, int] = {app.name: 0 for app in config.apps}
        self.max_connections = max_connections  # --max-connections, all apps together
        self.per_client = PerClientLimits(loop.time)
        self.per_client.configure(_per_client_limits(config))
        self._reject_logs: dict[str, LogThrottle] = {}
        self._accept_paused = False
        self._draining = False
        self._drain_timer: Optional[Timer] = None
        self.on_drained: Callable[[], None] = loop.stop

    def start(self) -> None:
        """Bind every port; on any failure close what was bound and raise BindError."""
        for listener in self.listeners.bind(self.router.ports, sorted(self.router.ports)):
            self.listeners.add(listener)
        self.listeners.restore_reserve()
        self._health.start(self.router)
        self.autostart.start_ticking()
        self.admission.start(self._on_wake)
        log.info("ready: %d ports for %d apps on %s", len(self.listeners),
                 len(self.config.apps), self.listen_host)

    def reload(self, config: Config) -> None:
        """Serve ``config`` from now on; BindError leaves the old one serving."""
        if self._draining:
            raise RuntimeError("draining: reload ignored")
        router = Router(config, self._rng, stats=self.stats, previous=self.router,
                        on_change=self._health_changed)
        added = sorted(set(router.ports) - set(self.listeners.by_port))
        removed = sorted(set(self.listeners.by_port) - set(router.ports))
        opened = self.listeners.bind(router.ports, added)
        for port in removed:
            log.info("closing port %d (no longer in the config)", port)
            self.listeners.remove(port)
        self.listeners.retarget(router.ports)
        self.router = router
        self.config = config
        self.per_client.configure(_per_client_limits(config))
        for app in config.apps:
            self.active_by_app.setdefault(app.name, 0)
        for listener in opened:
            self.listeners.add(listener)
        self._resolver.forget()
        self._health.start(router)
        self.listeners.refresh()
        log.info("config reloaded: %d ports for %d apps (%d opened, %d closed)",
                 len(self.listeners), len(config.apps), len(added), len(removed))

    # -- accepting ------------------------------------------------------------

    def open_connections_total(self) -> int:
        """What ``--max-connections`` counts: open connections of every
        worker (with no limit set, this process's sessions)."""
        if self.max_connections is None:
            return len(self.sessions)
        return self.admission.open_total()

    def _at_total_limit(self) -> bool:
        return (self.max_connections is not None
                and self.open_connections_total() >= self.max_connections)

    def _wants_accept(self, listener: Listener) -> bool:
        if self._accept_paused or self._draining:
            return False
        return self.admission.has_room(listener.route)

    def _admit(self, listener: Listener) -> bool:
        """Before each accept: as ``_wants_accept``, and the app's slot is
        reserved for the client (``_on_accepted`` gives back an unused one)."""
        if self._accept_paused or self._draining:
            return False
        return self.admission.reserve(listener.route)

    def _on_accepted(self, listener: Listener, client: socket.socket, addr: object) -> None:
        try:
            self._on_client(listener, client, addr)
        finally:
            if self.admission.reserved is not None:  # refused at accept: free it again
                self.admission.unreserve()

    def _on_wake(self) -> None:
        """Another worker freed a slot: paused listeners and queues try again."""
        self.listeners.refresh()
        self.queues.wake_all()

    def _left_queue(self, app: str, waited_s: float) -> None:
        self.stats.app(app).queue_wait.observe(waited_s)
        self.admission.settle()

    def _on_exhausted(self, listener: Listener, shed: Optional[object], reason: str) -> None:
        """Accept failed for lack of descriptors or memory; ``shed`` is the
        address of the client reset to make room, if one was."""
        if shed is not None:
            listener.route.stats.accepted += 1
            listener.route.stats.ended(outcomes.SHED)
            log_access(listener.route.app.name, listener.port, netio.format_sockaddr(shed),
                       "-", 0, 0, 0, outcomes.SHED, "out of file descriptors")
        self._pause_accepting(reason)

    def _pause_accepting(self, reason: str) -> None:
        """Out of descriptors or memory (at accept, or for a target socket):
        stop taking clients that could not be served, for a short while."""
        if self._accept_paused:
            return
        log.warning("accept paused for %.1fs: %s", ACCEPT_PAUSE_S, reason)
        self._accept_paused = True
        self.listeners.refresh()
        self.loop.call_later(ACCEPT_PAUSE_S, self._resume_accepting)

    def _resume_accepting(self) -> None:
        self._accept_paused = False
        if not self._draining:
            self.listeners.restore_reserve()
            self.listeners.refresh()

    def _on_client(self, listener: Listener, client: socket.socket, addr: object) -> None:
        route = listener.route
        app = route.app
        # The text now, not the tuple kept for later: 64 bytes an idle
        # connection, not about 140.
        client_addr = netio.format_sockaddr(addr)
        route.stats.accepted += 1
        if app.allow_from and not _is_allowed(addr, app):
            listener.batch = 1
            route.stats.denied += 1
            route.stats.ended(outcomes.DENIED)
            log_access(app.name, listener.port, client_addr, "-", 0, 0, 0,
                       outcomes.DENIED, "not in AllowFrom")
            netio.abort(client)
            return
        if not app.targets:  # --etcd: the app's registered targets all left
            listener.batch = 1
            route.stats.ended(outcomes.NO_TARGET)
            log_access(app.name, listener.port, client_addr, "-", 0, 0, 0,
                       outcomes.NO_TARGET, "the app has no target")
            client.close()
            return
        if app.per_client is not None:
            why = self.per_client.admit(app.name, addr, client)
            if why:
                self._client_limited(listener, client, client_addr, why)
                return
        client.setblocking(False)
        if not listener.nodelay_inherited:
            netio.set_nodelay(client)
        listener.batch = self.listeners.accept_batch
        session = self._session_class(self._ctx, route, client, client_addr, listener.port)
        self.sessions.add(session)
        self.admission.consume()
        self.active_by_app[app.name] = self.active_by_app.get(app.name, 0) + 1
        if self.max_connections is not None and self._at_total_limit():
            self.listeners.refresh()
        elif (app.max_connections is not None
              and route.counters.total(route.slot) >= app.max_connections):
            self.listeners.refresh(app.name)
        session.start()

    def _client_limited(self, listener: Listener, client: socket.socket, client_addr: str,
                        why: str) -> None:
        """Reset a client over its app's PerClient; under a flood, one
        access-log line a second per app and a count of the rest."""
        netio.abort(client)
        listener.batch = 1
        app = listener.route.app.name
        listener.route.stats.client_limited += 1
        listener.route.stats.ended(outcomes.CLIENT_LIMIT)
        throttle = self._reject_logs.get(app)
        if throttle is None:
            throttle = self._reject_logs[app] = LogThrottle()
        now = self.loop.time()
        if throttle.allow(now):
            log_access(app, listener.port, client_addr, "-", 0, 0, 0, outcomes.CLIENT_LIMIT, why)
        elif throttle.held == 1:
            self.loop.call_later(throttle.window_left(now),
                                 lambda: self._log_held_rejections(app, throttle))

    def _log_held_rejections(self, app: str, throttle: LogThrottle) -> None:
        held = throttle.take_held()
        log.warning("app %s: %d more connections reset by PerClient in the last %gs "
                    "(access-log lines skipped; see rawproxy_connections_client_limited_total)",
                    app, held, throttle.interval_s)

    def _on_session_closed(self, session: Session[Any]) -> None:
        self.sessions.discard(session)
        app = session.route.app
        if app.per_client is not None:  # admitted by it at accept (the same app object)
            self.per_client.release(session.client)
        self.active_by_app[app.name] -= 1
        current = self.router.routes.get(app.name)
        self.admission.release(session.route, current)
        if self.admission.total_paused:  # at --max-connections: every listener may resume
            self.admission.total_paused = False
            self.listeners.refresh()
        elif current is not None and current.app.max_connections is not None:
            self.listeners.refresh(app.name)
        stats = session.route.stats
        relay = session.relay
        bytes_in = relay.upstream.bytes_sent if relay is not None else 0
        bytes_out = relay.downstream.bytes_sent if relay is not None else 0
        stats.bytes_in += bytes_in
        stats.bytes_out += bytes_out
        stats.ended(session.end)
        if access_log.isEnabledFor(logging.INFO):  # not even the client's text otherwise
            log_access(app.name, session.listen_port, session.client_addr,
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

    # -- stopping -------------------------------------------------------------

    @property
    def draining(self) -> bool:
        return self._draining

    def drain(self, timeout_s: float) -> None:
        """Stop accepting now; call ``on_drained`` when sessions end or time runs out."""
        if self._draining:
            return
        self._draining = True
        self.listeners.close()
        self._health.stop()
        log.info("draining %d connections for up to %gs", len(self.sessions), timeout_s)
        if not self.sessions:
            self._finish_drain()
            return
        self._drain_timer = self.loop.call_later(timeout_s, self._drain_timed_out)

    def _drain_timed_out(self) -> None:
        self._drain_timer = None
        log.warning("drain timeout: closing %d connections", len(self.sessions))
        self.close_sessions(outcomes.DRAIN_TIMEOUT)

    def _finish_drain(self) -> None:
        if self._drain_timer is not None:
            self._drain_timer.cancel()
            self._drain_timer = None
        self.on_drained()

    def close_sessions(self, end: str) -> None:
        for session in list(self.sessions):
            session.close(end, reset=True)

    def close(self) -> None:
        self._draining = True
        self.listeners.close()
        self.admission.close()
        self._health.stop()
        self.autostart.close()
        self.close_sessions(outcomes.SHUTDOWN)  # first: they give their pipes back
        if self._ctx.pipes is not None:
            self._ctx.pipes.close()


def _per_client_limits(config: Config) -> dict[str, tuple[Optional[int], Optional[float]]]:
    return {app.name: (app.per_client.max_connections, app.per_client.rate)
            for app in config.apps if app.per_client is not None}


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
