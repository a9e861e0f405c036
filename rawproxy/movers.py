"""How a session moves bytes: the two subclasses of :class:`~rawproxy.session.Session`.

:class:`CopySession` moves bytes with ``recv_into``/``send`` through a ring
buffer; :class:`SpliceSession` with ``splice(2)`` through a pooled pipe, so
they never enter Python (Linux, Python 3.10+).  Both run the same relay
rules (``session`` and ``relay``); only these four I/O methods differ.

The fast path.  In the steady state (each side read until its FIN,
nothing held: ``Session._steady``) a readable side costs one fused handler: it
borrows an empty pipe (or array) from the pool, reads into it, sends all
of it on, counts the bytes and hands the pipe back, with no call into the
flow, buffer or relay.  Anything unusual (a write or error event, no
spare in the pool, a FIN, a short or refused send, an error) hands the
state over to the general code (``adopt`` puts the leftovers into the
flow's buffer) exactly as the reference path would have left it, and that
code goes on.  ``tests/unit/test_movers.py`` checks both against each
other, outcome by outcome.
"""

from __future__ import annotations

import os
import socket
from typing import Optional

from . import netio, outcomes
from .loop import EVENT_READ, EVENT_WRITE
from .pipes import SPLICE_FLAGS, PipeBuffer
from .relay import Flow, Relay
from .ringbuf import RingBuffer
from .session import B, Session

_WOULD_BLOCK = netio.WOULD_BLOCK
# The fast path takes EVENT_READ, and EVENT_READ | EVENT_WRITE: in the
# steady state no side asks to write, so a write bit is a hang-up or an
# error with bytes (or a FIN) to read, and the reference's send step would
# find nothing to send (tests/unit/test_movers.py holds the two equal).
_ALSO_TAKEN = EVENT_WRITE
_TAKEN = EVENT_READ | _ALSO_TAKEN

__all__ = ["CopySession", "SpliceSession"]


class _Mover(Session[B]):
    """What both fast paths hand over to: the reference code's continuations."""

    __slots__ = ()

    def _reference_turn(self, flow: Flow[B]) -> None:
        """The general code's turn for a readable side (the fast path stood aside)."""
        relay = self.relay
        if relay is not None and flow is relay.upstream:
            Session._on_client_events(self, EVENT_READ)
        else:
            Session._on_target_events(self, EVENT_READ)

    def _end_by_reference(self, flow: Flow[B], dst: socket.socket) -> None:
        """The source's FIN, the general code's way."""
        try:
            flow.on_received(0)
            self.last_active = self._ctx.loop.now
            self._send(flow, dst)
        except Exception as exc:
            self._fail(exc)
            return
        self._settle()

    def _source_ended(self, flow: Flow[B], dst: socket.socket) -> None:
        """A fast path read the source's FIN, nothing held either way: the
        reference's ``on_received(0)``, ``_send``, ``_after_source_ended``
        and ``_settle``, fused.  The last direction to end closes the pair
        (its FIN is the close's); the first is shut down and the pair goes
        on half-open, still on the fast path for the other direction."""
        relay, stored = self.relay, flow.stored
        if relay is None or (stored is not None and stored.held):  # not the steady state's FIN
            self._end_by_reference(flow, dst)
            return
        flow.src_eof = True
        self.last_active = self._ctx.loop.now
        other = relay.downstream if flow is relay.upstream else relay.upstream
        if other.dst_shut:
            flow.dst_shut = True
            self.close(outcomes.DONE, reset=False)
            return
        try:
            netio.shutdown_write(dst)
        except Exception as exc:
            self._fail(exc)
            return
        flow.dst_shut = True
        if self._idle_timer is None:  # half-open now (an IdleTimeout's timer runs already)
            self._ctx.half_open.arm(self)
        # What _update_interest would find: the ended side unread, the other
        # still read, nothing to write, and the pair still steady.
        ended_fd = self._client_fd if flow is relay.upstream else self._target_fd
        self._ctx.loop.set_interest(ended_fd, 0)


class CopySession(_Mover[RingBuffer]):
    """Bytes pass through Python: ``recv_into`` a ring, ``send`` from it."""

    __slots__ = ()

    def _new_relay(self) -> Relay[RingBuffer]:
        return Relay(self._ctx.pool)

    def _on_client_events(self, events: int) -> None:
        relay = self.relay
        if events | _ALSO_TAKEN == _TAKEN and self._steady and relay is not None:
            self._copy_through(relay.upstream, self.client, self._target_sock)
        else:
            Session._on_client_events(self, events)

    def _on_target_events(self, events: int) -> None:
        relay = self.relay
        target = self._target_sock
        if (events | _ALSO_TAKEN == _TAKEN and self._steady and relay is not None
                and target is not None):
            self._copy_through(relay.downstream, target, self.client)
        else:
            Session._on_target_events(self, events)

    def _copy_through(self, flow: Flow[RingBuffer], src: socket.socket,
                      dst: Optional[socket.socket]) -> None:
        """The steady state's turn, fused: ``recv_into`` a spare array, ``send`` it all."""
        spares = self._ctx.pool.spares
        if not spares or dst is None:
            self._reference_turn(flow)
            return
        storage = spares.pop()
        try:
            nbytes = src.recv_into(storage)
        except _WOULD_BLOCK:
            spares.append(storage)
            return
        except OSError as exc:
            spares.append(storage)
            self._fail(exc)
            return
        if not nbytes:
            spares.append(storage)
            self._source_ended(flow, dst)
            return
        try:
            sent = dst.send(memoryview(storage)[:nbytes])
        except _WOULD_BLOCK:
            sent = 0
        except OSError as exc:
            flow.buffer.adopt(storage, 0, nbytes)
            self._fail(exc)
            return
        flow.bytes_sent += sent
        self.last_active = self._ctx.loop.now
        if sent == nbytes:
            spares.append(storage)
            return
        flow.buffer.adopt(storage, sent, nbytes - sent)
        self._settle()

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
        ring = flow.stored  # none made: nothing to send (a FIN makes none)
        while ring is not None and ring.held:
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


class SpliceSession(_Mover[PipeBuffer]):
    """Zero-copy: ``splice`` socket -> pipe -> socket, bytes never enter Python."""

    __slots__ = ()

    def _new_relay(self) -> Relay[PipeBuffer]:
        pipes = self._ctx.pipes
        assert pipes is not None
        return Relay(pipes)

    def _on_client_events(self, events: int) -> None:
        relay = self.relay
        if events | _ALSO_TAKEN == _TAKEN and self._steady and relay is not None:
            self._splice_through(relay.upstream, self._client_fd, self._target_fd,
                                 self._target_sock)
        else:
            Session._on_client_events(self, events)

    def _on_target_events(self, events: int) -> None:
        relay = self.relay
        if events | _ALSO_TAKEN == _TAKEN and self._steady and relay is not None:
            self._splice_through(relay.downstream, self._target_fd, self._client_fd,
                                 self.client)
        else:
            Session._on_target_events(self, events)

    def _splice_through(self, flow: Flow[PipeBuffer], src_fd: int, dst_fd: int,
                        dst: Optional[socket.socket]) -> None:
        """The steady state's turn, fused: splice into a spare pipe, and all of it out."""
        pipes = self._ctx.pipes
        if pipes is None or not pipes.spares or dst is None:
            self._reference_turn(flow)
            return
        spares = pipes.spares
        pipe = spares.pop()
        try:
            nbytes = os.splice(  # novermin: only used where splice_available()
                src_fd, pipe[1], pipes.capacity, flags=SPLICE_FLAGS)
        except _WOULD_BLOCK:
            spares.append(pipe)
            return
        except OSError as exc:
            spares.append(pipe)
            self._fail(exc)
            return
        if not nbytes:
            spares.append(pipe)
            self._source_ended(flow, dst)
            return
        try:
            sent = os.splice(  # novermin: only used where splice_available()
                pipe[0], dst_fd, nbytes, flags=SPLICE_FLAGS)
        except _WOULD_BLOCK:
            sent = 0
        except OSError as exc:
            flow.buffer.adopt(pipe, nbytes)  # closed with the session: never pooled
            self._fail(exc)
            return
        flow.bytes_sent += sent
        self.last_active = self._ctx.loop.now
        if sent == nbytes:
            spares.append(pipe)
            return
        flow.buffer.adopt(pipe, nbytes - sent)
        self._settle()

    def _receive(self, flow: Flow[PipeBuffer], src: socket.socket, dst: socket.socket) -> None:
        pipe = flow.buffer
        # No descriptors for a pipe (EMFILE): _fail closes this connection
        # and the server pauses accepting; the proxy goes on.
        _, write_end = pipe.pipe()
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
        pipe = flow.stored  # none made: nothing to send (a FIN makes none)
        while pipe is not None and pipe.held:
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
