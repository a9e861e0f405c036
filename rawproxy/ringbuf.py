"""A fixed-capacity byte ring filled by ``recv_into`` and drained by ``send``.

Contract (the tornado ``iostream`` shape, sans-IO):

* ``writable()`` hands out a ``memoryview`` of the largest contiguous free
  region; the caller fills a prefix of it (``recv_into``) and reports how
  many bytes arrived with ``commit(n)``.
* ``readable()`` hands out a ``memoryview`` of the oldest contiguous bytes;
  the caller sends a prefix and reports how many went with ``advance(n)``.
* ``len(ring)`` is the number of bytes held, never more than ``capacity``.

Storage is borrowed from a :class:`BufferPool` only while the ring holds
bytes (or a caller is about to fill it), and handed back the moment it is
empty again.  An idle connection therefore costs no buffer memory, and a
connection whose bytes pass straight through (received, then sent at once)
reuses the same few pooled arrays instead of allocating per event.
"""

from __future__ import annotations

from typing import Optional


class BufferPool:
    """Free list of equally sized ``bytearray`` objects.

    One pool per server, never module-global.  At most ``max_free`` arrays
    are kept; surplus ones are dropped for the garbage collector, so a burst
    of backpressure does not pin its peak memory for ever.
    """

    __slots__ = ("buffer_bytes", "max_free", "spares")

    def __init__(self, buffer_bytes: int, max_free: int = 64) -> None:
        if buffer_bytes <= 0:
            raise ValueError("buffer_bytes must be positive")
        self.buffer_bytes = buffer_bytes
        self.max_free = max_free
        # Free arrays.  The fast path (movers) pops one and appends it back
        # within one event, so it never outgrows max_free.
        self.spares: list[bytearray] = []

    def take(self) -> bytearray:
        if self.spares:
            return self.spares.pop()
        return bytearray(self.buffer_bytes)

    def give_back(self, storage: bytearray) -> None:
        if len(self.spares) < self.max_free:
            self.spares.append(storage)

    @property
    def free_count(self) -> int:
        return len(self.spares)

    def new_buffer(self) -> RingBuffer:
        return RingBuffer(self)


class HeldBytes:
    """Byte accounting shared by RingBuffer and pipes.PipeBuffer.

    ``held`` is a plain attribute, read on the hot path; only the buffer
    itself writes it.  The subclasses set both in their ``__init__`` (two
    per connection: no call up to a base ``__init__``).
    """

    __slots__ = ("capacity", "held")
    capacity: int
    held: int

    def __len__(self) -> int:
        return self.held

    @property
    def free(self) -> int:
        return self.capacity - self.held

    def is_empty(self) -> bool:
        return self.held == 0

    # The callers test the range inline (a call per byte count would cost
    # the hot path) and call these only to raise.
    def _bad_commit(self, nbytes: int) -> ValueError:
        return ValueError(f"commit({nbytes}) with {self.free} bytes free")

    def _bad_advance(self, nbytes: int) -> ValueError:
        return ValueError(f"advance({nbytes}) with {self.held} bytes held")

    def _check_append(self, data: bytes) -> None:
        if len(data) > self.free:
            raise ValueError(f"append of {len(data)} bytes with {self.free} free")


class RingBuffer(HeldBytes):
    """Bytes in flight in one direction of one connection.

    ``_start`` is the offset of the oldest byte, ``held`` the number held
    (a plain attribute, read on the hot path; only this class writes it);
    the free region begins at ``(_start + held) % capacity``.  When the ring
    empties, both reset to zero so the next ``writable()`` offers the whole
    capacity as one contiguous region (one ``recv_into`` call, not two).
    """

    __slots__ = ("_pool", "_storage", "_view", "_start")

    def __init__(self, pool: BufferPool) -> None:
        self.capacity = pool.buffer_bytes
        self.held = 0
        self._pool = pool
        self._storage: Optional[bytearray] = None
        self._view: Optional[memoryview] = None
        self._start = 0

    def is_full(self) -> bool:
        return self.held == self.capacity

    @property
    def holds_storage(self) -> bool:
        return self._storage is not None

    def writable(self) -> memoryview:
        """The largest contiguous free region (empty view when full)."""
        view = self._view
        if view is None:
            storage = self._pool.take()
            self._storage = storage
            view = self._view = memoryview(storage)
        capacity = self.capacity
        end = self._start + self.held
        if end >= capacity:
            # Data wraps: free space lies between the wrapped tail and start.
            return view[end - capacity:self._start]
        return view[end:]

    def commit(self, nbytes: int) -> None:
        """Record that ``nbytes`` were written into the last ``writable()``."""
        if nbytes < 0 or nbytes > self.capacity - self.held:
            raise self._bad_commit(nbytes)
        self.held += nbytes
        if self.held == 0:
            # recv_into wrote nothing (EOF or error): do not pin the storage.
            self._release()

    def adopt(self, storage: bytearray, start: int, held: int) -> None:
        """Hold ``storage`` whose bytes ``[start, start + held)`` are unsent:
        the fast path's leftovers (it borrowed the array from the pool
        itself), so that the general code goes on from where the reference
        would be."""
        if (self._storage is not None or self.held or len(storage) != self.capacity
                or held <= 0 or start < 0 or start + held > self.capacity):
            raise ValueError(f"adopt({start}, {held}) into a ring holding {self.held}")
        self._storage = storage
        self._view = memoryview(storage)
        self._start = start
        self.held = held

    def readable(self) -> memoryview:
        """The oldest contiguous held bytes (empty view when empty)."""
        view = self._view
        if view is None:
            return memoryview(b"")
        end = self._start + self.held
        if end > self.capacity:
            return view[self._start:]
        return view[self._start:end]

    def advance(self, nbytes: int) -> None:
        """Record that ``nbytes`` from the last ``readable()`` were consumed."""
        if nbytes < 0 or nbytes > self.held:
            raise self._bad_advance(nbytes)
        self.held -= nbytes
        if self.held == 0:
            self._release()
        else:
            self._start = (self._start + nbytes) % self.capacity

    def append(self, data: bytes) -> None:
        """Copy ``data`` in (for headers the proxy writes itself)."""
        self._check_append(data)
        offset = 0
        while offset < len(data):
            region = self.writable()
            chunk = min(len(region), len(data) - offset)
            region[:chunk] = data[offset:offset + chunk]
            self.commit(chunk)
            offset += chunk

    def _release(self) -> None:
        self._start = 0
        self.held = 0
        storage = self._storage
        if storage is not None:
            self._view = None
            self._storage = None
            self._pool.give_back(storage)

    def close(self) -> None:
        """Drop held bytes and hand storage back; the ring stays usable."""
        self._release()
