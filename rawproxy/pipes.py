"""Zero-copy buffers: a kernel pipe in place of a ring, for ``os.splice``.

On Linux with Python 3.10+, bytes can move socket -> pipe -> socket with
``splice(2)`` and never be copied into Python objects.  A
:class:`PipeBuffer` has the same face as :class:`~rawproxy.ringbuf.RingBuffer`
toward :class:`~rawproxy.relay.Flow` (``len``, ``is_full``, ``commit``,
``advance``), so the relay's rules -- backpressure at ``capacity`` bytes,
half-close once drained -- are the same code on both paths; only the I/O
calls in ``session`` differ.

* A pipe is borrowed from a :class:`PipePool` only while it holds bytes and
  handed back as soon as it is empty, so idle connections hold no pipe (and
  no descriptors).  A pipe closed while holding bytes is destroyed, never
  pooled, so stale bytes cannot leak into another connection.
* The pipe is sized with ``F_SETPIPE_SZ`` to the relay's buffer size.  A
  pipe counts pages, not bytes: small socket segments can fill its slots
  before ``capacity`` bytes are in it, and splice then answers EAGAIN.  The
  session calls :meth:`PipeBuffer.mark_full` then, so the flow stops asking
  to read (instead of waking on a readable socket it cannot drain) until
  the pipe has been drained a little.
"""

from __future__ import annotations

import errno
import fcntl
import os
import sys
from typing import Optional

from .ringbuf import HeldBytes

# fcntl.F_SETPIPE_SZ is 3.10+; the Linux value has been 1031 since 2.6.35.
_F_SETPIPE_SZ = getattr(fcntl, "F_SETPIPE_SZ", 1031)
SPLICE_FLAGS = getattr(os, "SPLICE_F_MOVE", 1) | getattr(os, "SPLICE_F_NONBLOCK", 2)


def splice_available() -> bool:
    return sys.platform.startswith("linux") and hasattr(os, "splice")


Pipe = tuple[int, int]  # (read end, write end)


class PipePool:
    __slots__ = ("capacity", "max_free", "spares")

    def __init__(self, capacity: int, max_free: int = 32) -> None:
        self.capacity = capacity
        self.max_free = max_free
        # Empty pipes ready for use.  The fast path (movers) pops one and
        # appends it back within one event, so it never outgrows max_free.
        self.spares: list[Pipe] = []

    def take(self) -> Pipe:
        """A non-blocking pipe (raises OSError, e.g. EMFILE)."""
        if self.spares:
            return self.spares.pop()
        read_end, write_end = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        try:
            fcntl.fcntl(write_end, _F_SETPIPE_SZ, self.capacity)
        except OSError as exc:
            # EPERM above /proc/sys/fs/pipe-max-size or the per-user quota:
            # the default size (64 KiB) still works, only less per splice.
            if exc.errno not in (errno.EPERM, errno.EINVAL, errno.EBUSY):
                raise
        return read_end, write_end

    def give_back(self, pipe: Pipe) -> None:
        if len(self.spares) < self.max_free:
            self.spares.append(pipe)
        else:
            close_pipe(pipe)

    def close(self) -> None:
        for pipe in self.spares:
            close_pipe(pipe)
        self.spares.clear()

    @property
    def free_count(self) -> int:
        return len(self.spares)

    def new_buffer(self) -> PipeBuffer:
        return PipeBuffer(self)


def close_pipe(pipe: Pipe) -> None:
    for fd in pipe:
        try:
            os.close(fd)
        except OSError:
            pass


class PipeBuffer(HeldBytes):
    """Bytes in flight in one direction, held by the kernel in a pipe."""

    __slots__ = ("_pool", "_pipe", "_full")

    def __init__(self, pool: PipePool) -> None:
        self.capacity = pool.capacity
        self.held = 0
        self._pool = pool
        self._pipe: Optional[Pipe] = None
        self._full = False

    def is_full(self) -> bool:
        return self._full or self.held >= self.capacity

    @property
    def holds_storage(self) -> bool:
        return self._pipe is not None

    def pipe(self) -> Pipe:
        pipe = self._pipe
        if pipe is None:
            pipe = self._pipe = self._pool.take()
        return pipe

    def adopt(self, pipe: Pipe, held: int) -> None:
        """Hold ``pipe`` with ``held`` bytes in it: the fast path's leftovers
        (it borrowed the pipe from the pool itself), so that the general
        code goes on from exactly where the reference would be."""
        if self._pipe is not None or self.held or not 0 < held <= self.capacity:
            raise ValueError(f"adopt({held}) into a buffer holding {self.held}")
        self._pipe = pipe
        self.held = held

    def mark_full(self) -> None:
        """splice into the pipe said EAGAIN although bytes fit by count."""
        self._full = True

    def commit(self, nbytes: int) -> None:
        if nbytes < 0 or nbytes > self.capacity - self.held:
            raise self._bad_commit(nbytes)
        self.held += nbytes
        if self.held == 0:
            self._release()

    def advance(self, nbytes: int) -> None:
        if nbytes < 0 or nbytes > self.held:
            raise self._bad_advance(nbytes)
        self.held -= nbytes
        if nbytes:
            self._full = False
        if self.held == 0:
            self._release()

    def append(self, data: bytes) -> None:
        """Write bytes the proxy makes itself (a PROXY header) into the pipe."""
        self._check_append(data)
        _, write_end = self.pipe()
        view = memoryview(data)
        while view:
            written = os.write(write_end, view)  # an empty pipe takes a header whole
            self.held += written
            view = view[written:]

    def _release(self) -> None:
        self.held = 0
        self._full = False
        if self._pipe is not None:
            self._pool.give_back(self._pipe)
            self._pipe = None

    def close(self) -> None:
        if self._pipe is not None:
            if self.held:
                close_pipe(self._pipe)  # stale bytes: never pool this one
            else:
                self._pool.give_back(self._pipe)
            self._pipe = None
        self.held = 0
        self._full = False
