"""What the reactor polls: one epoll on Linux, ``selectors`` elsewhere.

Both pollers take the loop's interest masks (``EVENT_READ`` |
``EVENT_WRITE``, or 0) and report ``(fd, bits)`` pairs in epoll's bit
layout (:data:`IN`, :data:`OUT`, :data:`ERR`, :data:`HUP`), which the loop
turns back into its events with :func:`decode`.  An fd whose mask is empty
is watched for errors and hang-ups only, where the platform can:

* :class:`EpollPoller` (Linux, the default): a single epoll set.  An empty
  mask is an epoll registration with no events, which epoll still reports
  errors and hang-ups for, so going quiet, or back to reading, is one
  ``EPOLL_CTL_MOD``.  An fd about to be closed is not deregistered
  (``forget(fd, closing=True)``): the kernel drops it from the set when its
  last descriptor closes, which saves a system call per socket.
* :class:`SelectorPoller`: any ``selectors`` selector (a caller's, or the
  platform's where there is no epoll).  ``selectors`` refuses an empty
  mask, so on Linux such an fd moves to a second, error-only epoll that is
  itself polled through the selector (two system calls per change); without
  epoll, an fd with an empty mask is simply not polled.
"""

from __future__ import annotations

import select
import selectors
from typing import Optional

# epoll's bits (the same numbers on every Linux; defined here so that this
# module imports where select.epoll does not exist).
IN = 0x001
OUT = 0x004
ERR = 0x008
HUP = 0x010

EVENT_READ = selectors.EVENT_READ
EVENT_WRITE = selectors.EVENT_WRITE

# The loop's mask -> epoll's bits.
_TO_EPOLL = (0, IN, OUT, IN | OUT)

Ready = list[tuple[int, int]]


def _selectors_semantics(bits: int) -> int:
    """What ``selectors`` makes of epoll's bits: anything but IN counts as
    writable, anything but OUT as readable (so an error wakes both sides)."""
    events = 0
    if bits & ~IN:
        events |= EVENT_WRITE
    if bits & ~OUT:
        events |= EVENT_READ
    return events


# bits -> events for the usual values; an error or hang-up alone (no IN or
# OUT) decodes to 0 here, and the loop then asks the fd's mask (see decode).
DECODE = tuple(_selectors_semantics(bits) if bits & (IN | OUT) else 0 for bits in range(32))


def decode(bits: int, mask: int, error_event: int) -> int:
    """The loop's events for ``bits`` on an fd whose mask is ``mask``: an
    error or hang-up alone is ``error_event`` when the mask is empty (the
    fd was watched for errors only), both sides' events otherwise."""
    events = DECODE[bits] if bits < 32 else _selectors_semantics(bits)
    if events:
        return events
    return error_event if mask == 0 else EVENT_READ | EVENT_WRITE


class EpollPoller:
    """One epoll set; an empty mask watches errors and hang-ups only."""

    __slots__ = ("_epoll", "_registered", "poll")

    exact_write_events = True  # OUT alone: writable, no error, no hang-up

    def __init__(self) -> None:
        self._epoll = select.epoll()
        self._registered: set[int] = set()
        self.poll = self._epoll.poll  # (timeout_s, maxevents=-1) -> Ready

    def watch_errors(self, fd: int) -> None:
        self._epoll.register(fd, 0)
        self._registered.add(fd)

    def change(self, fd: int, old: int, mask: int) -> None:
        if fd in self._registered:
            self._epoll.modify(fd, _TO_EPOLL[mask])
        elif mask:
            self._epoll.register(fd, _TO_EPOLL[mask])
            self._registered.add(fd)

    def mute(self, fd: int) -> None:
        if fd in self._registered:
            self._registered.discard(fd)
            self._epoll.unregister(fd)

    def forget(self, fd: int, mask: int, closing: bool) -> None:
        if fd in self._registered:
            self._registered.discard(fd)
            if not closing:
                self._epoll.unregister(fd)

    def drop_stray(self, fd: int) -> None:
        """An event for an fd nobody watches: take it out of the set."""
        self._registered.discard(fd)
        try:
            self._epoll.unregister(fd)
        except OSError:
            pass  # closed meanwhile: the kernel dropped it already

    def close(self) -> None:
        self._registered.clear()
        self._epoll.close()  # closing the set deregisters nothing: fork-safe


class SelectorPoller:
    """A ``selectors`` selector, plus an error-only epoll where there is one."""

    exact_write_events = False

    def __init__(self, selector: Optional[selectors.BaseSelector] = None) -> None:
        self._selector = selector if selector is not None else selectors.DefaultSelector()
        self.exact_write_events = isinstance(self._selector, getattr(
            selectors, "EpollSelector", ()))
        self._error_watched: set[int] = set()
        self._error_watch: Optional[select.epoll] = (
            select.epoll() if hasattr(select, "epoll") else None)
        if self._error_watch is not None:
            self._selector.register(self._error_watch.fileno(), EVENT_READ)

    def watch_errors(self, fd: int) -> None:
        if self._error_watch is not None:
            self._error_watch.register(fd, 0)  # errors and hang-ups only
            self._error_watched.add(fd)

    def change(self, fd: int, old: int, mask: int) -> None:
        if old == 0:
            self.mute(fd)
            self._selector.register(fd, mask)
        elif mask == 0:
            self._selector.unregister(fd)
            self.watch_errors(fd)
        else:
            self._selector.modify(fd, mask)

    def mute(self, fd: int) -> None:
        if fd in self._error_watched:
            self._error_watched.discard(fd)
            assert self._error_watch is not None
            self._error_watch.unregister(fd)

    def forget(self, fd: int, mask: int, closing: bool) -> None:
        self.mute(fd)
        if mask:
            self._selector.unregister(fd)

    def drop_stray(self, fd: int) -> None:
        """Nothing to do: the selector holds only what the loop registered."""

    def poll(self, timeout: Optional[float]) -> Ready:
        ready: Ready = []
        error_fd = self._error_watch.fileno() if self._error_watch is not None else -1
        for key, events in self._selector.select(timeout):
            if key.fd == error_fd:
                assert self._error_watch is not None
                ready.extend((fd, ERR) for fd, _ in self._error_watch.poll(0)
                             if fd in self._error_watched)
            else:
                ready.append((key.fd, _TO_EPOLL[events]))
        return ready

    def close(self) -> None:
        if self._error_watch is not None:
            self._error_watch.close()
        self._error_watched.clear()
        self._selector.close()  # closes the selector's epoll; nothing unregistered
