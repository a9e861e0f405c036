"""The relay's decisions, with no sockets: two flows and what each side wants.

A :class:`Flow` is one direction (``src -> buffer -> dst``); its buffer is a
:class:`~rawproxy.ringbuf.RingBuffer` (bytes copied through Python) or a
:class:`~rawproxy.pipes.PipeBuffer` (a kernel pipe for ``splice``), whichever
the pool it is given makes.  Its lifecycle::

    OPEN --(src sends FIN: on_received(0))--> DRAINING
    DRAINING --(buffer empty: should_shutdown_write)--> on_shutdown_write --> DONE

Backpressure is the single rule in ``wants_read``: a flow stops asking to
read from its source while its buffer is full, and asks again as soon as
``on_sent`` makes room.  Memory per direction is therefore bounded by the
buffer's capacity, whatever the peers do.

A :class:`Relay` pairs ``upstream`` (client -> target) with ``downstream``
(target -> client) and turns their wishes into an event mask per socket.
The I/O shell (``session``) feeds byte counts in and applies the masks.
"""

from __future__ import annotations

from typing import Generic, Optional, Protocol, TypeVar


class FlowBuffer(Protocol):
    """What a flow needs of its buffer (RingBuffer and PipeBuffer have it)."""

    capacity: int
    held: int  # bytes in the buffer now (read-only outside the buffer)

    def __len__(self) -> int: ...
    def is_full(self) -> bool: ...
    def is_empty(self) -> bool: ...
    def commit(self, nbytes: int) -> None: ...
    def advance(self, nbytes: int) -> None: ...
    def append(self, data: bytes) -> None: ...
    def close(self) -> None: ...


B = TypeVar("B", bound=FlowBuffer)
B_co = TypeVar("B_co", bound=FlowBuffer, covariant=True)


class BufferMaker(Protocol[B_co]):
    def new_buffer(self) -> B_co: ...


# The same bit values as selectors.EVENT_READ / EVENT_WRITE (checked in the
# tests), defined here so this module stays free of any I/O import.
WANT_READ = 1
WANT_WRITE = 2


class Flow(Generic[B]):
    """One direction of a proxied connection.

    Its buffer is made on first use (``buffer``): in the steady state every
    byte passes straight through (:mod:`rawproxy.movers`' fast path), so most
    connections never hold one, and an idle one costs no buffer object.
    ``stored`` is the buffer if one was made, for the checks that must not
    make one.
    """

    __slots__ = ("stored", "_pool", "src_eof", "dst_shut", "bytes_sent")

    def __init__(self, pool: BufferMaker[B]) -> None:
        self.stored: Optional[B] = None
        self._pool = pool
        self.src_eof = False
        self.dst_shut = False
        self.bytes_sent = 0

    @property
    def buffer(self) -> B:
        buffer = self.stored
        if buffer is None:
            buffer = self.stored = self._pool.new_buffer()
        return buffer

    @property
    def held(self) -> int:
        """Bytes in the buffer now (0 with none made)."""
        buffer = self.stored
        return 0 if buffer is None else buffer.held

    def wants_read(self) -> bool:
        buffer = self.stored
        return not self.src_eof and (buffer is None or not buffer.is_full())

    def wants_write(self) -> bool:
        buffer = self.stored
        return buffer is not None and buffer.held > 0

    def should_shutdown_write(self) -> bool:
        """True once: the source ended and everything it sent was delivered."""
        buffer = self.stored
        return self.src_eof and not self.dst_shut and (buffer is None or buffer.held == 0)

    def is_done(self) -> bool:
        return self.dst_shut

    def on_received(self, nbytes: int) -> None:
        """``nbytes`` arrived in the buffer; 0 means the source's FIN."""
        if nbytes == 0:
            self.src_eof = True
            if self.stored is None:
                return  # no buffer to settle, and none needed for a FIN
        self.buffer.commit(nbytes)

    def on_sent(self, nbytes: int) -> None:
        self.buffer.advance(nbytes)
        self.bytes_sent += nbytes

    def on_shutdown_write(self) -> None:
        self.dst_shut = True


class Relay(Generic[B]):
    """Both flows of one client/target pair."""

    __slots__ = ("upstream", "downstream")

    def __init__(self, pool: BufferMaker[B]) -> None:
        self.upstream: Flow[B] = Flow(pool)    # client -> target
        self.downstream: Flow[B] = Flow(pool)  # target -> client

    def client_mask(self) -> int:
        return ((WANT_READ if self.upstream.wants_read() else 0)
                | (WANT_WRITE if self.downstream.wants_write() else 0))

    def target_mask(self) -> int:
        return ((WANT_READ if self.downstream.wants_read() else 0)
                | (WANT_WRITE if self.upstream.wants_write() else 0))

    def masks(self) -> tuple[int, int]:
        """``(client_mask(), target_mask())`` in one call, the session's form:
        the same rules, inlined (the tests hold the two forms equal)."""
        up, down = self.upstream, self.downstream
        up_buffer, down_buffer = up.stored, down.stored
        up_held = up_buffer.held if up_buffer is not None else 0
        down_held = down_buffer.held if down_buffer is not None else 0
        up_read = WANT_READ if not up.src_eof and (
            up_buffer is None or not up_buffer.is_full()) else 0
        down_read = WANT_READ if not down.src_eof and (
            down_buffer is None or not down_buffer.is_full()) else 0
        return (up_read | (WANT_WRITE if down_held else 0),
                down_read | (WANT_WRITE if up_held else 0))

    def is_done(self) -> bool:
        """Both directions ended: FIN seen and propagated each way."""
        return self.upstream.dst_shut and self.downstream.dst_shut

    def is_last_to_end(self, flow: Flow[B]) -> bool:
        """``flow`` is about to end and the other direction has ended: the
        pair is then done, and closing both sockets sends the FIN that a
        ``shutdown`` would (one call per direction, not two for the last)."""
        other = self.downstream if flow is self.upstream else self.upstream
        return other.dst_shut

    def bytes_buffered(self) -> int:
        return self.upstream.held + self.downstream.held

    def close(self) -> None:
        up, down = self.upstream.stored, self.downstream.stored
        if up is not None:
            up.close()
        if down is not None:
            down.close()
