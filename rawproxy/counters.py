"""Open connections per app and per target, one count for the whole process.

``MaxConnections`` and ``Concurrency`` (SPEC 2, 9) limit what is open in
the whole proxy, all ``--workers`` together, so the counts live in one
place every worker reads and updates: an anonymous shared memory block
(``mmap.mmap(-1, n)``: ``MAP_SHARED | MAP_ANONYMOUS``) that
:class:`SharedCounters` makes before the first fork, and that every worker
inherits.  Its int64 cells::

    header   magic, capacity, workers, slots used
    keys     [capacity]            a slot's name: 64-bit hash of (app, address), 0 = free
    waiting  [workers]             1 while that worker has clients waiting for a slot
    counts   [capacity * workers]  counts[slot * workers + worker]

* **One writer per cell.**  Worker ``w`` changes only ``counts[*, w]``, its
  own column, so no update is ever lost, and a total is the sum of a slot's
  row.  When a worker dies, the supervisor zeroes its column
  (:meth:`SharedCounters.clear_worker`): the kernel has closed every socket
  it held, so nothing it counted is open any more, and nothing leaks.
* **Check and take, atomically.**  A limit holds only if "is there room?"
  and "take it" happen as one step across processes: callers do both under
  :meth:`Counters.lock`, a POSIX record lock (``fcntl.lockf``) on an
  unlinked temporary file.  The kernel drops such a lock when its holder
  dies, so a worker killed mid-update cannot wedge the others (a process-
  shared semaphore would stay taken).  Unlimited slots are counted without
  it: one writer per cell needs no lock.
* **No polling between workers.**  A worker that leaves a client waiting
  for a slot (a queued session, or a listener paused at ``MaxConnections``)
  sets its ``waiting`` cell under the lock; whoever frees a limited slot
  reads the cells under the same lock and writes a byte to each waiting
  worker's wake pipe (:meth:`Counters.wake_waiters`), whose loop watches
  the read end (:attr:`Counters.wake_fd`).  Lock on both sides: neither a
  free nor a mark can slip between the other's check and its update.
* **Slots** are found by name, the same in every worker whatever config
  generation it serves: (app, target address) for a target, (app, "") for
  the app itself.  A slot is taken for good the first time a name is seen,
  so a block holds at most ``capacity`` (:data:`DEFAULT_CAPACITY`) distinct
  names from start to exit; past that, :class:`CountersFull` (a reload that
  needs more is rejected, the old config keeps serving).

One process (no ``--workers``): the same block, one column, no lock file
and no pipes; the lock is a no-op.
"""

from __future__ import annotations

import fcntl
import hashlib
import logging
import mmap
import os
import tempfile
from types import TracebackType
from typing import Optional

__all__ = ["DEFAULT_CAPACITY", "Counters", "CountersFull", "SharedCounters"]

# Apps plus targets (each app is one name, each of its targets one more):
# 16,384 slots of 8 bytes a worker, touched only where used.
DEFAULT_CAPACITY = 16384
_MAGIC = 0x72617770726F7879  # "rawproxy"
_HEADER = 4
_USED = 3  # header cell: slots taken
# A warning when this share of the slots is taken: a restart is due soon.
_WARN_FRACTION = 0.9

log = logging.getLogger("rawproxy.counters")


class CountersFull(Exception):
    """More distinct apps and targets than the block has slots."""


class _FileLock:
    """A POSIX record lock across processes (released by the kernel on death)."""

    __slots__ = ("_fd",)

    def __init__(self, fd: int) -> None:
        self._fd = fd

    def __enter__(self) -> None:
        fcntl.lockf(self._fd, fcntl.LOCK_EX)

    def __exit__(self, kind: Optional[type[BaseException]], value: Optional[BaseException],
                 traceback: Optional[TracebackType]) -> None:
        fcntl.lockf(self._fd, fcntl.LOCK_UN)


class _NoLock:
    """One process: nothing to exclude."""

    __slots__ = ()

    def __enter__(self) -> None:
        return None

    def __exit__(self, kind: Optional[type[BaseException]], value: Optional[BaseException],
                 traceback: Optional[TracebackType]) -> None:
        return None


def slot_key(app: str, address: str) -> int:
    """The non-zero 64-bit name of (app, address) in the keys table."""
    text = f"{app}\0{address}".encode("utf-8", "surrogatepass")
    key = int.from_bytes(hashlib.blake2b(text, digest_size=8).digest(), "little", signed=True)
    return key or 1


class SharedCounters:
    """The block (see the module docstring); make it before forking workers."""

    def __init__(self, workers: int = 1, capacity: int = DEFAULT_CAPACITY) -> None:
        if workers < 1 or capacity < 1:
            raise ValueError("workers and capacity must be >= 1")
        self.workers = workers
        self.capacity = capacity
        self._keys = _HEADER
        self._waiting = self._keys + capacity
        self._counts = self._waiting + workers
        self._map = mmap.mmap(-1, 8 * (self._counts + capacity * workers))
        self.cells = memoryview(self._map).cast("q")
        self.cells[0], self.cells[1], self.cells[2] = _MAGIC, capacity, workers
        self._lock_file = tempfile.TemporaryFile() if workers > 1 else None
        self.lock = (_NoLock() if self._lock_file is None
                     else _FileLock(self._lock_file.fileno()))
        # One wake pipe per worker: (read end, write end), non-blocking.
        self.pipes: list[tuple[int, int]] = []
        if workers > 1:
            for _ in range(workers):
                read_fd, write_fd = os.pipe()
                os.set_blocking(read_fd, False)
                os.set_blocking(write_fd, False)
                self.pipes.append((read_fd, write_fd))

    def worker(self, index: int) -> Counters:
        """The handle worker ``index`` counts with."""
        if not 0 <= index < self.workers:
            raise ValueError(f"no worker {index}")
        return Counters(self, index)

    def find_slot(self, app: str, address: str) -> int:
        """The slot of (app, address), taken now if new; under the lock."""
        key = slot_key(app, address)
        cells, base, capacity = self.cells, self._keys, self.capacity
        with self.lock:
            start = key % capacity
            for step in range(capacity):
                index = (start + step) % capacity
                found = cells[base + index]
                if found == key:
                    return index
                if found == 0:
                    cells[base + index] = key
                    cells[_USED] += 1
                    if cells[_USED] == max(1, int(capacity * _WARN_FRACTION)):
                        log.warning("%d of %d shared counter slots taken (one per app and "
                                    "target name ever seen; never freed): restart rawproxy "
                                    "before reloads are rejected", cells[_USED], capacity)
                    return index
        raise CountersFull(f"more than {capacity} distinct apps and targets since start: "
                           "the shared connection counters are full (a restart resets them)")

    @property
    def slots_used(self) -> int:
        return self.cells[_USED]

    def count_cell(self, slot: int, worker: int) -> int:
        return self._counts + slot * self.workers + worker

    def waiting_cell(self, worker: int) -> int:
        return self._waiting + worker

    def clear_worker(self, index: int) -> None:
        """Worker ``index`` is gone (reaped): forget every count it held,
        and wake the workers waiting for a slot, which may now have one."""
        cells = self.cells
        first = self.count_cell(0, index)
        with self.lock:
            cells[first:first + self.capacity * self.workers:self.workers] = (
                memoryview(bytearray(8 * self.capacity)).cast("q"))
            cells[self.waiting_cell(index)] = 0
            sleepers = self._sleepers(exclude=index)
        self.wake(sleepers)

    def _sleepers(self, exclude: int) -> list[int]:
        """Workers marked waiting (read under the lock)."""
        cells, base = self.cells, self._waiting
        return [w for w in range(self.workers) if w != exclude and cells[base + w]]

    def wake(self, workers: list[int]) -> None:
        for worker in workers:
            try:
                os.write(self.pipes[worker][1], b"\0")
            except (BlockingIOError, InterruptedError):
                pass  # the pipe holds bytes already: that worker will wake

    def close(self) -> None:
        for read_fd, write_fd in self.pipes:
            os.close(read_fd)
            os.close(write_fd)
        self.pipes = []
        if self._lock_file is not None:
            self._lock_file.close()
        self.cells.release()
        self._map.close()


class Counters:
    """One worker's view of the block: reads every column, writes its own."""

    __slots__ = ("shared", "index", "lock", "_cells", "_workers", "_counts", "_slots")

    def __init__(self, shared: SharedCounters, index: int) -> None:
        self.shared = shared
        self.index = index
        self.lock = shared.lock
        self._cells = shared.cells
        self._workers = shared.workers
        self._counts = shared.count_cell(0, index)
        self._slots: dict[tuple[str, str], int] = {}

    @property
    def wake_fd(self) -> Optional[int]:
        """The read end of this worker's wake pipe (None in one process)."""
        return self.shared.pipes[self.index][0] if self.shared.pipes else None

    def slot(self, app: str, address: str = "") -> int:
        """The slot of a target (or of the app itself, ``address`` empty)."""
        key = (app, address)
        slot = self._slots.get(key)
        if slot is None:
            slot = self._slots[key] = self.shared.find_slot(app, address)
        return slot

    def total(self, slot: int) -> int:
        """Open in the whole process (every worker's column)."""
        workers = self._workers
        if workers == 1:
            return self._cells[self._counts + slot]
        first = self._counts - self.index + slot * workers
        return sum(self._cells[first:first + workers])

    def own(self, slot: int) -> int:
        """Open in this worker."""
        return self._cells[self._counts + slot * self._workers]

    def add(self, slot: int, delta: int) -> None:
        self._cells[self._counts + slot * self._workers] += delta

    def take(self, slot: int, limit: int) -> bool:
        """One more in ``slot`` if fewer than ``limit`` are open; else mark
        this worker waiting (to be woken when one is freed).  Locks."""
        with self.lock:
            if self.total(slot) < limit:
                self.add(slot, 1)
                return True
            self.mark_waiting()
            return False

    def give_back(self, slot: int) -> None:
        """One fewer in a limited slot; wakes the workers waiting for one."""
        with self.lock:
            self.add(slot, -1)
            sleepers = self.shared._sleepers(exclude=self.index) if self.shared.pipes else []
        if sleepers:
            self.shared.wake(sleepers)

    def has_room(self, slot: int, limit: int) -> bool:
        """Whether ``slot`` is below ``limit``; if not, this worker is marked
        waiting, under the lock, so the next free wakes it."""
        if self.total(slot) < limit:
            return True
        with self.lock:
            self.mark_waiting()
            return self.total(slot) < limit

    def claim(self, slot: int, now_ms: int, until_ms: int) -> bool:
        """Elect one worker for a task named by ``slot`` (a machine's start
        or stop, SPEC 10): True, with this worker's cell set to ``until_ms``,
        unless another worker's claim is still live (its cell > ``now_ms``,
        monotonic milliseconds, one clock for every process).  Locks."""
        with self.lock:
            first = self._counts - self.index + slot * self._workers
            for worker in range(self._workers):
                if worker != self.index and self._cells[first + worker] > now_ms:
                    return False
            self._cells[self._counts + slot * self._workers] = until_ms
            return True

    def mark_waiting(self) -> None:
        """Call under the lock, after finding no room."""
        self._cells[self.shared.waiting_cell(self.index)] = 1

    def clear_waiting(self) -> None:
        """Nothing of this worker waits any more (no lock needed: a wake it
        then misses was for nobody)."""
        self._cells[self.shared.waiting_cell(self.index)] = 0

    def drain_wake(self) -> None:
        """Empty this worker's wake pipe (its loop saw it readable)."""
        fd = self.wake_fd
        if fd is None:
            return
        try:
            while os.read(fd, 4096):
                pass
        except (BlockingIOError, InterruptedError):
            pass
