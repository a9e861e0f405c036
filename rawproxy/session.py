"""One proxied connection: a client, the target chosen for it, the relay.

Lifecycle::

    accept -> CONNECTING [-> WAITING -> CONNECTING]* [-> failover]* -> RELAYING -> CLOSED
                        \\-> CLOSED (every target failed, queue timeout, client left)

CONNECTING is one :class:`~rawproxy.connect.Connector` per target tried
(``ConnectTimeout`` each); a failure is charged to the target and the next
untried one is chosen, but a shortage of our own closes the session with
no verdict.  Nothing is read from the client meanwhile (the kernel holds
its early bytes, in order); only its reset is watched for, so it costs no
backend connect.  WAITING (still CONNECTING): every eligible target is at
its ``HardLimit``; the session waits in the app's queue
(:mod:`rawproxy.waitqueue`) until a slot frees (``resume``: failover goes
on) or ``QueueTimeout`` passes.  Every target failed on an app with
``Machines``: it waits likewise for a machine to start
(:mod:`rawproxy.autostart`).  The connection counted to a target
(:meth:`~rawproxy.router.Balancer.acquire`) is given back when its connect
fails or the session closes, and the queue is told.

RELAYING moves bytes with the sans-IO :class:`~rawproxy.relay.Relay`: a
readable side is read into its flow's buffer and sent on at once, so write
interest is registered only for leftovers (the steady state, nothing held:
:mod:`rawproxy.movers`' fast path).  FIN becomes ``shutdown(SHUT_WR)``
toward the other side; reset or error on either side aborts both (RST where
the OS allows), including a side that is neither read nor written
(``EVENT_ERROR`` from the loop's error watch).  A timeout that would drop
buffered bytes resets rather than FINs (a cut stream never passes for a
whole one).  A failure to allocate closes the session cleanly.  Every socket
is closed once, in :meth:`Session.close`.

:class:`Session` holds the logic; its subclasses in :mod:`rawproxy.movers`
move the bytes (``recv_into``/``send`` through a ring, or ``splice(2)``).
"""

from __future__ import annotations

import enum
import logging
import socket
from typing import Generic, Optional, TypeVar

from . import netio, outcomes, proxyproto
from .balance import Verdict
from .config import Target
from .connect import Connector
from .loop import EVENT_ERROR, EVENT_READ, EVENT_WRITE, Timer
from .relay import Flow, FlowBuffer, Relay
from .router import Route
from .sessionctx import SessionContext

log = logging.getLogger("rawproxy.session")

B = TypeVar("B", bound=FlowBuffer)


class State(enum.Enum):
    CONNECTING = "connecting"
    RELAYING = "relaying"
    CLOSED = "closed"


class Session(Generic[B]):
    """The connection logic; subclasses move the bytes (copy or splice)."""

    __slots__ = (
        "_ctx", "route", "client", "client_addr", "listen_port", "state",
        "target", "_target_sock", "_tried", "_last_error", "_connector",
        "_idle_timer", "relay", "started_at", "last_active",
        "end", "end_detail", "_client_fd", "_target_fd", "_steady", "_counted",
        "_machine_waited", "_queued",
    )

    def __init__(self, ctx: SessionContext, route: Route, client: socket.socket,
                 client_addr: str, listen_port: int) -> None:
        self._ctx = ctx
        self.route = route
        self.client = client
        self._client_fd = client.fileno()
        self.client_addr = client_addr
        self.listen_port = listen_port
        self.state = State.CONNECTING
        self.target: Optional[Target] = None
        self._target_sock: Optional[socket.socket] = None
        self._target_fd = -1
        self._tried: list[Target] = []
        self._counted: Optional[Target] = None  # acquire() counted it: give it back
        self._machine_waited = False  # waited for a machine start once already
        self._queued = False  # was in the app's queue: close makes it leave
        self._last_error = ""
        self._connector: Optional[Connector] = None
        self._idle_timer: Optional[Timer] = None
        self.relay: Optional[Relay[B]] = None
        self.started_at = ctx.loop.now
        self.last_active = ctx.loop.now
        self._steady = False
        self.end = ""          # short code: done, reset, idle-timeout, connect-failed, ...
        self.end_detail = ""   # why, for the access log

    # -- connecting and failover -------------------------------------------

    def start(self) -> None:
        queues = self._ctx.queues
        if queues.waiting and queues.length(self.route.app.name):
            self._wait()  # others wait already: first come, first served
        else:
            self._try_next_target()  # a loopback target may be relaying already
        if self.state is State.CONNECTING:
            # Errors only, while a target is tried: a client's reset must not cost
            # a backend connect; its FIN is no reason to give up (it wants its answer).
            self._ctx.loop.watch(self._client_fd, self._on_client_events, errors_only=True)

    def _try_next_target(self) -> None:
        target = self.route.balancer.acquire(self._ctx.loop.now, self._tried)
        if target is None:
            if not self._wait_for_machine():
                self.close(outcomes.CONNECT_FAILED, reset=False, detail=self._last_error)
            return
        if target is Verdict.WAIT:
            self._wait()
            return
        self._counted = target
        self._tried.append(target)
        self.target = target
        self.route.stats.target(target.address).attempts += 1
        budget_s = self.route.app.connect_timeout_s
        self._connector = Connector(self._ctx.loop, self._ctx.resolver, target.host,
                                    target.port, budget_s, self._on_connected,
                                    self._on_connect_failed, keep_watched=True,
                                    timeouts=self._ctx.connect_timeouts.for_budget(budget_s),
                                    at_once=True)
        self._connector.start()

    def _wait(self) -> None:
        self._queued = True
        self._ctx.queues.wait(self, self.route.app.name, self.route.app.queue_timeout_s)

    @property
    def has_tried(self) -> bool:
        return bool(self._tried)

    def resume(self) -> None:
        """Waiting in the queue, and a slot may be free: try again."""
        if self.state is State.CONNECTING and self._connector is None:
            self._try_next_target()

    def _wait_for_machine(self) -> bool:
        """Every target failed: on an app with Machines, wait (once) for one
        to start, the client still unread (SPEC 10; rawproxy.autostart)."""
        machines = self._ctx.machines
        if machines is None or self.route.machines is None or self._machine_waited:
            return False
        self._machine_waited = True
        return machines.wait(self.route, self)

    def machine_ready(self) -> None:
        """A machine of the app accepts now: try the targets again."""
        if self.state is State.CONNECTING and self._connector is None:
            self._tried.clear()
            self._try_next_target()

    def queue_timed_out(self, waited_s: float) -> None:
        self.close(outcomes.QUEUE_TIMEOUT, reset=False,
                   detail=f"no free slot in {waited_s:.3g}s: every target at its HardLimit")

    def _give_back(self) -> None:
        """The target's count is freed: tell the balancer, and the queue."""
        target, self._counted = self._counted, None
        if target is not None:
            self.route.balancer.release(target)
            if self._ctx.queues.waiting:
                self._ctx.queues.freed(self.route.app.name)

    def _on_connect_failed(self, reason: str, detail: str) -> None:
        self._connector = None  # reason: a label for metrics; detail: more, for logs
        self._give_back()
        if reason == outcomes.NO_RESOURCES:
            self._no_resources(detail)  # ours, not the target's: no failover either
            return
        self._last_error = detail
        target = self.target
        assert target is not None
        self.route.balancer.record_failure(target, self._ctx.loop.time(), reason)
        self.route.stats.target(target.address).failed(reason)
        if reason == outcomes.REFUSED and self._ctx.machines is not None:
            self._ctx.machines.note_refused(self.route, target.address)
        log.warning("app %s: target %s: connect failed: %s (client %s)",
                    self.route.app.name, target.address, detail, self.client_addr)
        self._try_next_target()

    def _on_connected(self, sock: socket.socket) -> None:
        connector, self._connector = self._connector, None
        assert connector is not None and self.target is not None
        self._target_sock = sock
        self._target_fd = fd = sock.fileno()
        loop = self._ctx.loop
        if loop.is_watched(fd):
            loop.replace_handler(fd, self._on_target_events)  # kept watched by the connector
        else:  # connected at once (loopback): one registration each, with their masks
            loop.watch(fd, self._on_target_events)
            if not loop.is_watched(self._client_fd):  # in start(), before its watch
                loop.watch(self._client_fd, self._on_client_events)
        self.route.balancer.record_success(self.target)
        target_stats = self.route.stats.target(self.target.address)
        target_stats.connected += 1
        target_stats.latency.observe(loop.clock() - connector.started_at)
        try:
            self._start_relaying(sock)
        except Exception as exc:  # no pipe or buffer, or the client vanished:
            self._fail(exc)          # closed cleanly, never left half set up
            return
        # Most clients speak first, and their bytes are waiting by now: read
        # them at once, not one wake-up later (HAProxy does the same).
        self._on_client_events(EVENT_READ)

    def _start_relaying(self, target_sock: socket.socket) -> None:
        netio.set_nodelay(target_sock)
        self.relay, app = self._new_relay(), self.route.app
        self.state = State.RELAYING
        self.last_active = self._ctx.loop.now
        if app.idle_timeout_s is not None:  # else no limit until a FIN
            self._arm_inactivity_timer()
        if app.proxy_protocol is None:  # nothing held: both sides read, steady
            loop = self._ctx.loop
            loop.set_interest(self._client_fd, EVENT_READ)
            loop.set_interest(self._target_fd, EVENT_READ)
            self._steady = True
            return
        # Before any client byte: the target reads the real client first.
        header = proxyproto.header(app.proxy_protocol, self.client.getpeername(),
                                   self.client.getsockname())
        self.relay.upstream.buffer.append(header)
        self._update_interest()

    def _fail(self, exc: Exception) -> None:
        """Close for ``exc`` (called in its ``except``), by whose doing it was."""
        detail = getattr(exc, "strerror", None) or str(exc) or type(exc).__name__
        if isinstance(exc, netio.PeerGone) or (isinstance(exc, OSError)
                                               and netio.is_peer_gone(exc)):
            self.close(outcomes.RESET, reset=True, detail=detail)
        elif netio.is_local_shortage(exc):
            self._no_resources(detail)
        else:
            # A bug costs this connection, not the loop (left open, it would fail every turn).
            log.exception("app %s: internal error in a session", self.route.app.name)
            self.close(outcomes.ERROR, reset=True, detail=repr(exc))

    def _no_resources(self, detail: str) -> None:
        self.close(outcomes.NO_RESOURCES, reset=True, detail=detail)
        self._ctx.on_no_resources(detail)

    # -- relaying -------------------------------------------------------------

    def _new_relay(self) -> Relay[B]:
        raise NotImplementedError

    def _on_client_events(self, events: int) -> None:
        relay = self.relay
        target = self._target_sock
        if relay is None or target is None:
            if self.state is State.CONNECTING and events & EVENT_ERROR:
                self.close(outcomes.CLIENT_GONE, reset=True,
                           detail=netio.pending_error(self.client) or "hung up")
            return
        self._pump(events, self.client, target, relay.upstream, relay.downstream)

    def _on_target_events(self, events: int) -> None:
        relay = self.relay
        target = self._target_sock
        if relay is None or target is None:
            return
        self._pump(events, target, self.client, relay.downstream, relay.upstream)

    def _pump(self, events: int, sock: socket.socket, other: socket.socket,
              inbound: Flow[B], outbound: Flow[B]) -> None:
        """``sock`` is ready: send ``outbound`` to it and/or read ``inbound`` from it."""
        if events & EVENT_ERROR:
            self._on_quiet_socket_event(sock)
            return
        try:
            if events & EVENT_WRITE:
                self._send(outbound, sock)
            if events & EVENT_READ and inbound.wants_read():
                self._receive(inbound, sock, other)
        except Exception as exc:
            self._fail(exc)
            return
        self._settle()

    def _settle(self) -> None:
        """After a turn's I/O: close when both directions ended, else apply
        the masks the flows now want (skipped in the steady state)."""
        relay = self.relay
        assert relay is not None
        up, down = relay.upstream, relay.downstream
        if (self._steady and not (up.held or down.held)
                and not (up.src_eof or down.src_eof)):
            return  # the usual turn: all passed straight through, interest unchanged
        if relay.is_done():
            self.close(outcomes.DONE, reset=False)
        else:
            self._update_interest()

    def _on_quiet_socket_event(self, sock: socket.socket) -> None:
        """An error or hang-up on a side we are neither reading nor writing
        (it sent FIN, or its sender is paused): a reset closes the pair now;
        a plain hang-up (both directions shut) just stops the reports."""
        detail = netio.pending_error(sock)
        if detail:
            self.close(outcomes.RESET, reset=True, detail=detail)
        else:
            self._ctx.loop.mute(sock.fileno())

    def _receive(self, flow: Flow[B], src: socket.socket, dst: socket.socket) -> None:
        raise NotImplementedError

    def _send(self, flow: Flow[B], dst: socket.socket) -> None:
        raise NotImplementedError

    def _after_source_ended(self, flow: Flow[B], dst: socket.socket) -> None:
        if flow.should_shutdown_write():
            relay = self.relay
            assert relay is not None
            if relay.is_last_to_end(flow):
                flow.on_shutdown_write()  # _pump closes the pair next: close's FIN
                return
            netio.shutdown_write(dst)
            flow.on_shutdown_write()
            if self._idle_timer is None:  # half-open now (an IdleTimeout's timer runs already)
                self._ctx.half_open.arm(self)

    def _update_interest(self) -> None:
        relay = self.relay
        assert relay is not None
        loop = self._ctx.loop
        client_mask, target_mask = relay.masks()
        # Steady: nothing held, each side read until its FIN (half-open too).
        up_eof, down_eof = relay.upstream.src_eof, relay.downstream.src_eof
        steady = not (up_eof and down_eof) and (client_mask == (0 if up_eof else EVENT_READ)
                                                and target_mask == (0 if down_eof else EVENT_READ))
        loop.set_interest(self._client_fd, client_mask)
        loop.set_interest(self._target_fd, target_mask)
        self._steady = steady  # with no FIN yet, _settle skips this call while true

    def _inactivity_limit(self) -> tuple[Optional[float], str]:
        """How long the connection may sit with no bytes moving, and the end code."""
        limit = self.route.app.idle_timeout_s
        if limit is not None:
            return limit, outcomes.IDLE_TIMEOUT  # the app's own setting wins, longer or shorter
        relay = self.relay
        if relay is not None and (relay.upstream.dst_shut or relay.downstream.dst_shut):
            return self._ctx.half_open.delay_s, outcomes.HALF_OPEN_TIMEOUT
        return None, outcomes.IDLE_TIMEOUT

    def _arm_inactivity_timer(self) -> None:
        if self._idle_timer is not None:
            return  # it re-reads the limit when it fires, and re-arms itself
        limit, _ = self._inactivity_limit()
        if limit is not None:
            remaining = limit - (self._ctx.loop.now - self.last_active)
            self._idle_timer = self._ctx.loop.call_later(max(0.0, remaining),
                                                         self.check_idle)

    def check_idle(self) -> None:
        """Its inactivity timer (or the half-open table) says time may be up."""
        self._idle_timer = None
        limit, end = self._inactivity_limit()
        if self.state is not State.RELAYING or limit is None:
            return
        if self._ctx.loop.time() - self.last_active >= limit:
            # Bytes still held would be dropped: a FIN would pass the cut
            # stream off as complete, so the peers get a reset instead.
            self.close(end, reset=self.relay is not None and self.relay.bytes_buffered() > 0)
        else:
            # Activity stamps are cheap; the timer is re-armed lazily for the
            # remainder instead of being rescheduled on every byte.
            self._arm_inactivity_timer()

    # -- closing ------------------------------------------------------------

    @property
    def bytes_from_client(self) -> int:
        return self.relay.upstream.bytes_sent if self.relay else 0

    @property
    def bytes_from_target(self) -> int:
        return self.relay.downstream.bytes_sent if self.relay else 0

    def close(self, end: str, reset: bool, detail: str = "") -> None:
        """Free everything this session holds; idempotent.

        ``end`` is a short code (metrics label, access log ``end=``),
        ``detail`` the human reason, if any.
        """
        if self.state is State.CLOSED:
            return
        self.state = State.CLOSED
        self._steady = False  # no fast path (movers) on a closed pair
        self.end = end
        self.end_detail = detail
        if self._connector is not None:
            self._connector.cancel()
            self._connector = None
        if self._queued:
            self._ctx.queues.leave(self)
        self._give_back()
        if self._idle_timer is not None:
            self._idle_timer.cancel()
            self._idle_timer = None
        relay = self.relay
        if relay is not None and (relay.upstream.dst_shut or relay.downstream.dst_shut):
            self._ctx.half_open.disarm(self)  # armed when the first direction ended
        loop = self._ctx.loop
        # Both closed below, and only this session holds them: the kernel
        # drops a closed socket from the epoll set, no call needed.
        loop.unwatch(self._client_fd, closing=True)
        if self._target_sock is not None:
            loop.unwatch(self._target_fd, closing=True)
            (netio.abort if reset else netio.close)(self._target_sock)
            self._target_sock = None
        (netio.abort if reset else netio.close)(self.client)
        if relay is not None:
            relay.close()
        self._ctx.on_closed(self)
