"""The relay's decisions, with no sockets: two flows and what each side wants.

A :class:`Flow` is one direction (``src -> ring -> dst``).  Its lifecycle::

    OPEN --(src sends FIN: on_received(0))--> DRAINING
    DRAINING --(ring empty: should_shutdown_write)--> on_shutdown_write --> DONE

Backpressure is the single rule in ``wants_read``: a flow stops asking to
read from its source while its ring is full, and asks again as soon as
``on_sent`` makes room.  Memory per direction is therefore bounded by the
ring's capacity, whatever the peers do.

A :class:`Relay` pairs ``upstream`` (client -> target) with ``downstream``
(target -> client) and turns their wishes into an event mask per socket.
The I/O shell (``session``) feeds byte counts in and applies the masks.
"""

from __future__ import annotations

from .ringbuf import BufferPool, RingBuffer

# The same bit values as selectors.EVENT_READ / EVENT_WRITE (checked in the
# tests), defined here so this module stays free of any I/O import.
WANT_READ = 1
WANT_WRITE = 2


class Flow:
    """One direction of a proxied connection."""

    __slots__ = ("ring", "src_eof", "dst_shut", "bytes_sent")

    def __init__(self, pool: BufferPool) -> None:
        self.ring = RingBuffer(pool)
        self.src_eof = False
        self.dst_shut = False
        self.bytes_sent = 0

    def wants_read(self) -> bool:
        return not self.src_eof and not self.ring.is_full()

    def wants_write(self) -> bool:
        return len(self.ring) > 0

    def should_shutdown_write(self) -> bool:
        """True once: the source ended and everything it sent was delivered."""
        return self.src_eof and not self.dst_shut and self.ring.is_empty()

    def is_done(self) -> bool:
        return self.dst_shut

    def on_received(self, nbytes: int) -> None:
        """``nbytes`` arrived in ``ring.writable()``; 0 means the source's FIN."""
        if nbytes == 0:
            self.src_eof = True
        self.ring.commit(nbytes)

    def on_sent(self, nbytes: int) -> None:
        self.ring.advance(nbytes)
        self.bytes_sent += nbytes

    def on_shutdown_write(self) -> None:
        self.dst_shut = True

    def close(self) -> None:
        self.ring.close()


class Relay:
    """Both flows of one client/target pair."""

    __slots__ = ("upstream", "downstream")

    def __init__(self, pool: BufferPool) -> None:
        self.upstream = Flow(pool)    # client -> target
        self.downstream = Flow(pool)  # target -> client

    def client_mask(self) -> int:
        return ((WANT_READ if self.upstream.wants_read() else 0)
                | (WANT_WRITE if self.downstream.wants_write() else 0))

    def target_mask(self) -> int:
        return ((WANT_READ if self.downstream.wants_read() else 0)
                | (WANT_WRITE if self.upstream.wants_write() else 0))

    def is_done(self) -> bool:
        """Both directions ended: FIN seen and propagated each way."""
        return self.upstream.dst_shut and self.downstream.dst_shut

    def bytes_buffered(self) -> int:
        return len(self.upstream.ring) + len(self.downstream.ring)

    def close(self) -> None:
        self.upstream.close()
        self.downstream.close()
