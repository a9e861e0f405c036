"""The reactor: one thread, one selector, a timer heap, signals as events.

It knows nothing of proxying.  Contract:

* ``watch(fd, callback)`` puts ``callback(events)`` in the fd -> handler
  table; ``set_interest(fd, mask)`` says which events (``EVENT_READ`` |
  ``EVENT_WRITE``) the handler wants.  The poller is touched only when a
  mask really changes.  ``unwatch(fd)`` forgets it and must come before the
  socket is closed; ``unwatch(fd, closing=True)`` says the caller closes
  it at once (and holds its only descriptor), so the kernel's own clean-up
  on close replaces a deregistration.  ``replace_handler(fd, callback)``
  hands a watched fd to a new handler, its mask and registration kept.
* An fd with an empty mask is, on Linux, still watched for errors and
  hang-ups (:mod:`~rawproxy.pollers`): its handler then gets
  ``EVENT_ERROR``, so a reset on a socket the proxy is not reading or
  writing (a half-closed side, a paused sender) is seen at once.  It
  enters that watch when its mask drops to empty, or at once with
  ``watch(fd, callback, errors_only=True)``.  ``mute(fd)`` takes it out
  (a hang-up that is no error, say) until its mask changes.
* ``exact_write_events``: true where ``EVENT_WRITE`` alone means writable
  with no error or hang-up pending (epoll), so a connect's first event
  settles it without asking the socket.
* ``call_later(delay_s, callback)`` returns a :class:`Timer` that can be
  cancelled; ``call_soon_threadsafe(callback)`` is the only entry point for
  other threads (the DNS workers) and wakes the loop through a socketpair.
* ``add_signal_handler(signum, callback)`` runs ``callback()`` on the loop
  thread: the C-level handler writes the signal number into the same
  socketpair via ``signal.set_wakeup_fd``.
* ``now`` is the monotonic time read once per loop turn, so hot paths can
  stamp activity without a clock call per event.

An exception escaping a callback is logged with its traceback and the loop
goes on: a fault in one connection must never stop the others.
"""

from __future__ import annotations

import collections
import heapq
import logging
import select
import selectors
import signal
import socket
import time
from types import FrameType
from typing import Callable, Deque, Optional, Union

from .pollers import DECODE, EpollPoller, SelectorPoller, decode

EVENT_READ = selectors.EVENT_READ
EVENT_WRITE = selectors.EVENT_WRITE
EVENT_ERROR = 4  # error or hang-up on an fd with an empty mask (Linux)

Handler = Callable[[int], None]
Callback = Callable[[], None]
Clock = Callable[[], float]

log = logging.getLogger("rawproxy.loop")

# Cancelled timers stay in the heap until they surface; rebuild the heap once
# they are both numerous and the majority, so a connect timer cancelled per
# successful connection cannot grow memory without bound.
_COMPACT_MIN_CANCELLED = 1024
# epoll takes its timeout as an int of milliseconds: past ~24.8 days select()
# raises OverflowError (issue #18).  A timer further out costs one spare
# wake-up a day instead.
MAX_SELECT_WAIT_S = 24 * 3600.0


class Timer:
    """A scheduled callback; ``cancel()`` is idempotent and O(1)."""

    __slots__ = ("when", "_seq", "callback", "cancelled", "_loop")

    def __init__(self, when: float, seq: int, callback: Callback, loop: EventLoop) -> None:
        self.when = when
        self._seq = seq
        self.callback = callback
        self.cancelled = False
        self._loop: Optional[EventLoop] = loop  # None once out of the heap

    def cancel(self) -> None:
        if not self.cancelled:
            self.cancelled = True
            # It may sit in the heap until its time comes: it must not keep
            # a closed connection's objects alive meanwhile (nor have the
            # garbage collector walk them), so the callback goes now.
            self.callback = _cancelled
            loop = self._loop
            if loop is not None:
                loop._cancelled_timers += 1
                if loop._cancelled_timers >= _COMPACT_MIN_CANCELLED:
                    loop._timer_cancelled()

    def _fire(self) -> None:
        # Checked when it runs, not when it fell due: an earlier callback of
        # the same turn may have cancelled it.
        if not self.cancelled:
            self.cancelled = True  # fired timers cancel as no-ops
            self.callback()


class EventLoop:
    def __init__(self, clock: Clock = time.monotonic,
                 selector: Optional[selectors.BaseSelector] = None) -> None:
        self._clock = clock
        # One epoll unless a selector is given (tests) or there is no epoll.
        self._poller: Union[EpollPoller, SelectorPoller] = (
            EpollPoller() if selector is None and hasattr(select, "epoll")
            else SelectorPoller(selector))
        self.exact_write_events = self._poller.exact_write_events
        self._handlers: dict[int, Handler] = {}
        self._masks: dict[int, int] = {}
        self._unwatched_in_batch: set[int] = set()
        # (when, seq, timer): tuples compare in C, far cheaper than a
        # Python __lt__ on every heap step; seq keeps equal deadlines FIFO.
        self._timers: list[tuple[float, int, Timer]] = []
        self._timer_seq = 0
        self._cancelled_timers = 0
        self._ready: Deque[Callback] = collections.deque()
        self._signal_handlers: dict[int, Callback] = {}
        self._previous_signal_handlers: dict[int, object] = {}
        self._stopping = False
        self._closed = False
        self.now = clock()
        # The clock itself, for a caller that needs the time now and not
        # the turn's (``now``): one C call, no Python frame of time().
        self.clock = clock
        self._wake_recv, self._wake_send = socket.socketpair()
        self._wake_recv.setblocking(False)
        self._wake_send.setblocking(False)
        self.watch(self._wake_recv.fileno(), self._on_wakeup)
        self.set_interest(self._wake_recv.fileno(), EVENT_READ)

    # -- file descriptors -------------------------------------------------

    def watch(self, fd: int, handler: Handler, errors_only: bool = False,
              mask: int = 0) -> None:
        """Handle ``fd``'s events, those of ``mask`` from now on (as
        ``set_interest`` would); with ``errors_only`` and no mask, its errors
        and hang-ups at once (``EVENT_ERROR``), as if its mask had dropped
        to empty."""
        if fd in self._handlers:
            raise ValueError(f"fd {fd} is already watched")
        if errors_only and not mask:
            self._poller.watch_errors(fd)
        self._handlers[fd] = handler
        self._masks[fd] = mask
        if mask:
            self._poller.change(fd, 0, mask)

    def replace_handler(self, fd: int, handler: Handler) -> None:
        """Give a watched fd to another handler; its mask stays as it is."""
        if fd not in self._handlers:
            raise ValueError(f"fd {fd} is not watched")
        self._handlers[fd] = handler

    def set_interest(self, fd: int, mask: int) -> None:
        old = self._masks[fd]
        if mask != old:
            self._masks[fd] = mask
            self._poller.change(fd, old, mask)

    def mute(self, fd: int) -> None:
        """Stop error reports for an fd with an empty mask, until it changes."""
        self._poller.mute(fd)

    def interest(self, fd: int) -> int:
        return self._masks.get(fd, 0)

    def unwatch(self, fd: int, closing: bool = False) -> None:
        """Forget ``fd``; ``closing``: the caller closes it right after."""
        mask = self._masks.pop(fd, 0)
        if self._handlers.pop(fd, None) is not None:
            # Events already collected for this fd belong to the socket being
            # closed; a new socket may get the same number within this batch.
            self._unwatched_in_batch.add(fd)
            self._poller.forget(fd, mask, closing)

    def is_watched(self, fd: int) -> bool:
        return fd in self._handlers

    @property
    def watched_count(self) -> int:
        return len(self._handlers)

    # -- timers and callbacks ----------------------------------------------

    def time(self) -> float:
        return self._clock()

    def call_later(self, delay_s: float, callback: Callback) -> Timer:
        self._timer_seq += 1
        timer = Timer(self._clock() + delay_s, self._timer_seq, callback, self)
        heapq.heappush(self._timers, (timer.when, self._timer_seq, timer))
        return timer

    def _timer_cancelled(self) -> None:
        """Many timers cancelled (``Timer.cancel`` counted them): compact
        the heap when they are also the majority."""
        if self._cancelled_timers * 2 > len(self._timers):
            self._timers = [entry for entry in self._timers if not entry[2].cancelled]
            heapq.heapify(self._timers)
            self._cancelled_timers = 0

    def call_soon(self, callback: Callback) -> None:
        self._ready.append(callback)

    def call_soon_threadsafe(self, callback: Callback) -> None:
        self._ready.append(callback)  # deque.append is atomic under the GIL
        try:
            self._wake_send.send(b"\0")
        except (BlockingIOError, InterruptedError):
            pass  # the pipe is full, so the loop is going to wake anyway
        except OSError:
            pass  # the loop is closed; the callback will never run

    # -- signals ------------------------------------------------------------

    def add_signal_handler(self, signum: int, callback: Callback) -> None:
        if not self._signal_handlers:
            signal.set_wakeup_fd(self._wake_send.fileno(), warn_on_full_buffer=False)
        self._signal_handlers[signum] = callback
        previous = signal.signal(signum, _ignore_signal_in_python)
        self._previous_signal_handlers.setdefault(signum, previous)

    def _restore_signals(self) -> None:
        for signum, previous in self._previous_signal_handlers.items():
            signal.signal(signum, previous)  # type: ignore[arg-type]
        if self._signal_handlers:
            signal.set_wakeup_fd(-1)
        self._signal_handlers.clear()
        self._previous_signal_handlers.clear()

    def _on_wakeup(self, events: int) -> None:
        while True:
            try:
                data = self._wake_recv.recv(4096)
            except (BlockingIOError, InterruptedError):
                return
            if not data:
                return
            for signum in data:
                handler = self._signal_handlers.get(signum)
                if handler is not None:
                    self._ready.append(handler)

    # -- running ------------------------------------------------------------

    def stop(self) -> None:
        """Make ``run()`` return after the current turn."""
        self._stopping = True

    def run(self) -> None:
        self._stopping = False
        while not self._stopping:
            self.run_once()

    def run_once(self, max_wait_s: Optional[float] = None) -> None:
        # With no timer and nothing ready, the wait is max_wait_s (the
        # usual turn under load skips a call, as it skips the two below).
        timeout = (self._select_timeout(max_wait_s) if self._timers or self._ready
                   or self._stopping or (max_wait_s or 0.0) > MAX_SELECT_WAIT_S
                   else max_wait_s)
        ready = self._poller.poll(timeout)
        self.now = self._clock()
        handlers = self._handlers
        stale = self._unwatched_in_batch
        stale.clear()
        for fd, bits in ready:
            if stale and fd in stale:
                continue  # its socket was closed by an earlier handler of this batch
            handler = handlers.get(fd)
            if handler is None:
                self._poller.drop_stray(fd)
                continue
            events = DECODE[bits] if bits < 32 else 0
            if not events:
                events = decode(bits, self._masks[fd], EVENT_ERROR)
            try:
                handler(events)
            except Exception:
                log.exception("unhandled error in handler for fd %d", fd)
        stale.clear()
        timers = self._timers
        if timers and timers[0][0] <= self.now:
            self._run_due_timers()
        if self._ready:
            self._run_ready()

    def _select_timeout(self, max_wait_s: Optional[float]) -> Optional[float]:
        if self._ready or self._stopping:
            return 0
        timeout = max_wait_s
        timers = self._timers
        while timers and timers[0][2].cancelled:
            heapq.heappop(timers)
            self._cancelled_timers -= 1
        if timers:
            until_next = max(0.0, timers[0][0] - self._clock())
            timeout = until_next if timeout is None else min(timeout, until_next)
        return timeout if timeout is None else min(timeout, MAX_SELECT_WAIT_S)

    def _run_due_timers(self) -> None:
        timers = self._timers
        now = self.now
        while timers and timers[0][0] <= now:
            timer = heapq.heappop(timers)[2]
            if timer.cancelled:
                self._cancelled_timers -= 1
                continue
            timer._loop = None  # out of the heap: a cancel no longer counts
            self._ready.append(timer._fire)

    def _run_ready(self) -> None:
        # Only what was ready at the start of this turn: a callback that
        # schedules another must not starve the selector.
        for _ in range(len(self._ready)):
            callback = self._ready.popleft()
            try:
                callback()
            except Exception:
                log.exception("unhandled error in callback %r", callback)

    def close_after_fork(self) -> None:
        """In a forked child: let go of this (the parent's) loop.

        The epoll instance is shared with the parent across fork, so nothing
        may be unregistered from it here -- that would silence the parent.
        Only this process's descriptors are closed.
        """
        self._closed = True
        self._restore_signals()
        self._wake_recv.close()
        self._wake_send.close()
        self._poller.close()  # closes our epoll fd; no epoll_ctl on the shared set

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        self._restore_signals()
        self.unwatch(self._wake_recv.fileno())
        self._wake_recv.close()
        self._wake_send.close()
        self._poller.close()
        self._handlers.clear()
        self._masks.clear()
        self._timers.clear()
        self._ready.clear()


def _cancelled() -> None:
    """What a cancelled timer holds instead of its callback (never run)."""


def _ignore_signal_in_python(signum: int, frame: Optional[FrameType]) -> None:
    """The real work happens on the loop: set_wakeup_fd already woke it."""
