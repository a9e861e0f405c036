"""One proxied connection: a client, the target chosen for it, the relay.

Lifecycle::

    accept -> CONNECTING [-> failover]* -> RELAYING -> CLOSED
                        \\-> CLOSED (every target failed, or the client left)

CONNECTING covers resolving the target's name and trying each of its
addresses in turn, all within the app's ``ConnectTimeout`` per target.  Any
failure (refused, unreachable, timeout, unresolvable name) records a failure
with the balancer and moves to the next untried target.  Nothing is read
from the client until a target is connected: the kernel holds the client's
early bytes, in order, and the relay delivers them first.

RELAYING moves bytes with the sans-IO :class:`~rawproxy.relay.Relay`: a
readable side is read into its flow's buffer and the buffer is sent on at
once, so write interest is registered only for leftovers, and in the steady
state (nothing held, no FIN) the interest is not even recomputed.  FIN
becomes ``shutdown(SHUT_WR)`` toward the other side; reset or error on
either side aborts both (RST where the OS allows), including a side that is
neither read nor written (``EVENT_ERROR`` from the loop's error watch).
Every socket is closed exactly once, in :meth:`Session.close`.

:class:`Session` holds the logic; :class:`CopySession` moves bytes with
``recv_into``/``send`` through a ring, :class:`SpliceSession` with
``splice(2)`` through a pipe.
"""

from __future__ import annotations

import enum
import logging
import os
import socket
from typing import Any, Callable, Generic, Optional, TypeVar

from . import netio, proxyproto
from .config import Target
from .loop import EVENT_ERROR, EVENT_READ, EVENT_WRITE, EventLoop, Timer
from .pipes import SPLICE_FLAGS, PipeBuffer, PipePool
from .relay import Flow, FlowBuffer, Relay
from .resolver import Address, Resolution, Resolver
from .ringbuf import BufferPool, RingBuffer
from .router import Route

log = logging.getLogger("rawproxy.session")

B = TypeVar("B", bound=FlowBuffer)


class State(enum.Enum):
    CONNECTING = "connecting"
    RELAYING = "relaying"
    CLOSED = "closed"


class SessionContext:
    """What every session of a server shares (one object, not globals)."""

    __slots__ = ("loop", "resolver", "pool", "pipes", "on_closed", "half_open_timeout_s",
                 "on_no_resources")

    def __init__(self, loop: EventLoop, resolver: Resolver, pool: BufferPool,
                 on_closed: Callable[[Session[Any]], None],
                 half_open_timeout_s: float = 60.0,
                 pipes: Optional[PipePool] = None,
                 on_no_resources: Callable[[str], None] = lambda reason: None) -> None:
        self.on_no_resources = on_no_resources  # the server pauses accepting
        self.loop = loop
        self.resolver = resolver
        self.pool = pool
        self.pipes = pipes  # set when relaying with splice
        self.on_closed = on_closed
        # HAProxy's client-fin/server-fin: once one direction has ended, a
        # connection with no bytes moving is closed after this long, so a
        # lost final FIN cannot pin it (and its descriptors) for ever.
        self.half_open_timeout_s = half_open_timeout_s


class Session(Generic[B]):
    """The connection logic; subclasses move the bytes (copy or splice)."""

    __slots__ = (
        "_ctx", "route", "client", "client_addr", "listen_port", "state",
        "target", "_target_sock", "_tried", "_addresses", "_last_error",
        "_connect_timer", "_idle_timer", "relay", "started_at", "last_active",
        "end", "end_detail", "_client_fd", "_target_fd", "_attempt_started", "_steady",
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
        self._addresses: list[Address] = []
        self._last_error = ""
        self._connect_timer: Optional[Timer] = None
        self._idle_timer: Optional[Timer] = None
        self.relay: Optional[Relay[B]] = None
        self.started_at = ctx.loop.now
        self.last_active = ctx.loop.now
        self._attempt_started = 0.0
        self._steady = False
        self.end = ""          # short code: done, reset, idle-timeout, connect-failed, ...
        self.end_detail = ""   # why, for the access log

    # -- connecting and failover -------------------------------------------

    def start(self) -> None:
        self._try_next_target()

    def _try_next_target(self) -> None:
        balancer = self.route.balancer
        target = balancer.choose(self._ctx.loop.time(), self._tried)
        if target is None:
            self.close("connect-failed", reset=False, detail=self._last_error)
            return
        self._tried.append(target)
        self.target = target
        self.route.stats.target(target.address).attempts += 1
        self._attempt_started = self._ctx.loop.time()
        self._connect_timer = self._ctx.loop.call_later(
            self.route.app.connect_timeout_s, self._on_connect_timeout)
        resolution = self._ctx.resolver.resolve(
            target.host, target.port, lambda later: self._on_resolved(target, later))
        if resolution is not None:
            self._on_resolved(target, resolution)

    def _on_resolved(self, target: Target, resolution: Resolution) -> None:
        # A late answer may concern an attempt that already timed out, or a
        # session that already closed: only the current attempt may use it.
        if (self.state is not State.CONNECTING or target is not self.target
                or self._target_sock is not None):
            return
        if resolution.error:
            self._target_failed("dns", resolution.error)
            return
        self._addresses = list(resolution.addresses)
        self._connect_next_address()

    def _connect_next_address(self) -> None:
        try:
            sock, reason = netio.connect_next(self._addresses, self._last_error or "no address")
        except netio.LocalResourceError as exc:
            self.close("no-resources", reset=True, detail=str(exc))
            self._ctx.on_no_resources(str(exc))
            return
        if sock is None:
            self._target_failed(reason)
            return
        self._target_sock = sock
        self._target_fd = sock.fileno()
        loop = self._ctx.loop
        loop.watch(self._target_fd, self._on_target_events)
        loop.set_interest(self._target_fd, EVENT_WRITE)

    def _drop_target_socket(self) -> None:
        sock = self._target_sock
        if sock is not None:
            self._ctx.loop.unwatch(self._target_fd)
            netio.close(sock)
            self._target_sock = None
            self._target_fd = -1

    def _on_connect_timeout(self) -> None:
        self._connect_timer = None
        self._addresses = []
        self._drop_target_socket()
        self._target_failed("timeout")

    def _target_failed(self, reason: str, detail: str = "") -> None:
        """``reason`` is a short label for metrics; ``detail`` says more in logs."""
        if self._connect_timer is not None:
            self._connect_timer.cancel()
            self._connect_timer = None
        self._last_error = detail or reason
        target = self.target
        assert target is not None
        self.route.balancer.record_failure(target, self._ctx.loop.time(), reason)
        self.route.stats.target(target.address).failed(reason)
        log.warning("app %s: target %s: connect failed: %s (client %s)",
                    self.route.app.name, target.address, detail or reason, self.client_addr)
        self._try_next_target()

    def _on_connect_ready(self) -> None:
        sock = self._target_sock
        assert sock is not None
        try:
            if not netio.finish_connect(sock):
                return  # a stale wake-up: the connect is still under way
        except netio.ConnectFailed as exc:
            self._last_error = exc.reason
            self._drop_target_socket()
            if self._addresses:
                self._connect_next_address()
            else:
                self._target_failed(exc.reason)
            return
        self._start_relaying(sock)

    def _start_relaying(self, target_sock: socket.socket) -> None:
        if self._connect_timer is not None:
            self._connect_timer.cancel()
            self._connect_timer = None
        assert self.target is not None
        loop = self._ctx.loop
        self.route.balancer.record_success(self.target)
        target_stats = self.route.stats.target(self.target.address)
        target_stats.connected += 1
        target_stats.latency.observe(loop.time() - self._attempt_started)
        netio.set_nodelay(target_sock)
        self.state = State.RELAYING
        self.relay = relay = self._new_relay()
        version = self.route.app.proxy_protocol
        if version is not None:
            # Before any client byte: the target reads the real client first.
            try:
                peer, local = self.client.getpeername(), self.client.getsockname()
            except OSError as exc:
                self.close("reset", reset=True, detail=exc.strerror or str(exc))
                return
            relay.upstream.buffer.append(proxyproto.header(version, peer, local))
        loop.watch(self._client_fd, self._on_client_events)
        self.last_active = loop.now
        self._arm_inactivity_timer()
        self._update_interest()

    # -- relaying -------------------------------------------------------------

    def _new_relay(self) -> Relay[B]:
        raise NotImplementedError

    def _on_client_events(self, events: int) -> None:
        relay = self.relay
        target = self._target_sock
        if relay is None or target is None:
            return
        self._pump(events, self.client, target, relay.upstream, relay.downstream)

    def _on_target_events(self, events: int) -> None:
        relay = self.relay
        target = self._target_sock
        if relay is None or target is None:
            if self.state is State.CONNECTING:
                self._on_connect_ready()
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
        except netio.PeerGone as exc:
            self.close("reset", reset=True, detail=str(exc))
            return
        except netio.LocalResourceError as exc:
            self.close("no-resources", reset=True, detail=str(exc))
            self._ctx.on_no_resources(str(exc))
            return
        except OSError as exc:
            if netio.is_peer_gone(exc):
                self.close("reset", reset=True, detail=exc.strerror or str(exc))
                return
            log.exception("app %s: unexpected socket error", self.route.app.name)
            self.close("error", reset=True, detail=str(exc))
            return
        except Exception as exc:
            # A bug must cost this one connection, not the loop: left open,
            # a broken session would fire (and fail) on every turn.
            log.exception("app %s: internal error in a session", self.route.app.name)
            self.close("error", reset=True, detail=repr(exc))
            return
        relay = self.relay
        assert relay is not None
        up, down = relay.upstream, relay.downstream
        if (self._steady and not (up.buffer.held or down.buffer.held)
                and not (up.src_eof or down.src_eof)):
            return  # the usual turn: all passed straight through, interest unchanged
        if relay.is_done():
            self.close("done", reset=False)
        else:
            self._update_interest()

    def _on_quiet_socket_event(self, sock: socket.socket) -> None:
        """An error or hang-up on a side we are neither reading nor writing
        (it sent FIN, or its sender is paused): a reset closes the pair now;
        a plain hang-up (both directions shut) just stops the reports."""
        err = sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
        if err:
            self.close("reset", reset=True, detail=os.strerror(err))
        else:
            self._ctx.loop.mute(sock.fileno())

    def _receive(self, flow: Flow[B], src: socket.socket, dst: socket.socket) -> None:
        raise NotImplementedError

    def _send(self, flow: Flow[B], dst: socket.socket) -> None:
        raise NotImplementedError

    def _after_source_ended(self, flow: Flow[B], dst: socket.socket) -> None:
        if flow.should_shutdown_write():
            netio.shutdown_write(dst)
            flow.on_shutdown_write()
            self._arm_inactivity_timer()  # half-open now: a shorter limit may apply

    def _update_interest(self) -> None:
        relay = self.relay
        assert relay is not None
        loop = self._ctx.loop
        client_mask, target_mask = relay.client_mask(), relay.target_mask()
        loop.set_interest(self._client_fd, client_mask)
        loop.set_interest(self._target_fd, target_mask)
        # Steady: both sides read, nothing held, no FIN; _pump may skip this
        # call while that stays true (it is re-checked on every turn).
        self._steady = client_mask == target_mask == EVENT_READ

    def _inactivity_limit(self) -> tuple[Optional[float], str]:
        """How long the connection may sit with no bytes moving, and the end code."""
        limit = self.route.app.idle_timeout_s
        if limit is not None:
            return limit, "idle-timeout"  # the app's own setting wins, longer or shorter
        relay = self.relay
        if relay is not None and (relay.upstream.dst_shut or relay.downstream.dst_shut):
            return self._ctx.half_open_timeout_s, "half-open-timeout"
        return None, "idle-timeout"

    def _arm_inactivity_timer(self) -> None:
        if self._idle_timer is not None:
            return  # it re-reads the limit when it fires, and re-arms itself
        limit, _ = self._inactivity_limit()
        if limit is not None:
            remaining = limit - (self._ctx.loop.time() - self.last_active)
            self._idle_timer = self._ctx.loop.call_later(max(0.0, remaining),
                                                         self._on_idle_check)

    def _on_idle_check(self) -> None:
        self._idle_timer = None
        limit, end = self._inactivity_limit()
        if self.state is not State.RELAYING or limit is None:
            return
        if self._ctx.loop.time() - self.last_active >= limit:
            self.close(end, reset=False)
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
        self.end = end
        self.end_detail = detail
        for timer in (self._connect_timer, self._idle_timer):
            if timer is not None:
                timer.cancel()
        self._connect_timer = self._idle_timer = None
        loop = self._ctx.loop
        loop.unwatch(self._client_fd)
        if self._target_sock is not None:
            loop.unwatch(self._target_fd)
            (netio.abort if reset else netio.close)(self._target_sock)
            self._target_sock = None
        (netio.abort if reset else netio.close)(self.client)
        if self.relay is not None:
            self.relay.close()
        self._ctx.on_closed(self)


class CopySession(Session[RingBuffer]):
    """Bytes pass through Python: ``recv_into`` a ring, ``send`` from it."""

    __slots__ = ()

    def _new_relay(self) -> Relay[RingBuffer]:
        return Relay(self._ctx.pool)

    def _receive(self, flow: Flow[RingBuffer], src: socket.socket, dst: socket.socket) -> None:
        ring = flow.buffer
        try:
            nbytes = src.recv_into(ring.writable())
        except netio.WOULD_BLOCK:
            ring.commit(0)
            return
        except OSError:
            ring.commit(0)
            raise
        flow.on_received(nbytes)
        self.last_active = self._ctx.loop.now
        self._send(flow, dst)

    def _send(self, flow: Flow[RingBuffer], dst: socket.socket) -> None:
        ring = flow.buffer
        while ring.held:
            view = ring.readable()
            try:
                sent = dst.send(view)
            except netio.WOULD_BLOCK:
                break
            flow.on_sent(sent)
            self.last_active = self._ctx.loop.now
            if sent < len(view):
                break
        if flow.src_eof:
            self._after_source_ended(flow, dst)


class SpliceSession(Session[PipeBuffer]):
    """Zero-copy: ``splice`` socket -> pipe -> socket, bytes never enter Python."""

    __slots__ = ()

    def _new_relay(self) -> Relay[PipeBuffer]:
        pipes = self._ctx.pipes
        assert pipes is not None
        return Relay(pipes)

    def _receive(self, flow: Flow[PipeBuffer], src: socket.socket, dst: socket.socket) -> None:
        pipe = flow.buffer
        try:
            _, write_end = pipe.pipe()
        except OSError as exc:
            # No descriptors for a pipe: this connection cannot go on, the
            # proxy can (accept pauses on the same shortage).
            raise netio.LocalResourceError(f"no pipe: {exc.strerror or exc}") from exc
        try:
            nbytes = os.splice(  # novermin: only used where splice_available()
                src.fileno(), write_end, pipe.free, flags=SPLICE_FLAGS)
        except netio.WOULD_BLOCK:
            if pipe.held:
                pipe.mark_full()  # the pipe's slots are full, not the socket empty
            else:
                pipe.commit(0)
            return
        except OSError:
            pipe.commit(0)
            raise
        flow.on_received(nbytes)
        self.last_active = self._ctx.loop.now
        self._send(flow, dst)

    def _send(self, flow: Flow[PipeBuffer], dst: socket.socket) -> None:
        pipe = flow.buffer
        while pipe.held:
            held = pipe.held
            try:
                sent = os.splice(  # novermin: only used where splice_available()
                    pipe.pipe()[0], dst.fileno(), held, flags=SPLICE_FLAGS)
            except netio.WOULD_BLOCK:
                break
            flow.on_sent(sent)
            self.last_active = self._ctx.loop.now
            if sent < held:
                break
        if flow.src_eof:
            self._after_source_ended(flow, dst)
