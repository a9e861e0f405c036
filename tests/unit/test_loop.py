"""Unit tests for rawproxy.loop: timers on a fake clock, fds on a socketpair.

The sockets are ``socket.socketpair()``s, plus one TCP pair on 127.0.0.1 for
the error watch (a reset needs TCP).  Nothing sleeps:
``run_once(max_wait_s=0)`` polls, and waits that must block are bounded by a
``max_wait_s`` and checked against a deadline.
"""

from __future__ import annotations

import functools
import logging
import os
import select
import selectors
import signal
import socket
import struct
import threading
import time
import weakref
from typing import Any, Callable, Iterator, Optional

import pytest

from rawproxy.loop import (_COMPACT_MIN_CANCELLED, EVENT_ERROR, EVENT_READ, EVENT_WRITE,
                           MAX_SELECT_WAIT_S, EventLoop)

WAIT_S = 10.0


class FakeClock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


class RecordingSelector(selectors.DefaultSelector):
    """The real selector, counting the calls the loop makes on it."""

    def __init__(self) -> None:
        super().__init__()
        self.changes: list[tuple[str, int, int]] = []
        self.entered_select = threading.Event()

    def register(self, fileobj: Any, events: int, data: Any = None) -> selectors.SelectorKey:
        self.changes.append(("register", fileobj, events))
        return super().register(fileobj, events, data)

    def modify(self, fileobj: Any, events: int, data: Any = None) -> selectors.SelectorKey:
        self.changes.append(("modify", fileobj, events))
        return super().modify(fileobj, events, data)

    def unregister(self, fileobj: Any) -> selectors.SelectorKey:
        self.changes.append(("unregister", fileobj, 0))
        return super().unregister(fileobj)

    def select(self, timeout: Optional[float] = None) -> list[tuple[selectors.SelectorKey, int]]:
        self.entered_select.set()
        return super().select(timeout)


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def loop(clock: FakeClock) -> Iterator[EventLoop]:
    loop = EventLoop(clock=clock)
    yield loop
    loop.close()


@pytest.fixture
def pair() -> Iterator[tuple[socket.socket, socket.socket]]:
    left, right = socket.socketpair()
    left.setblocking(False)
    right.settimeout(WAIT_S)
    yield left, right
    left.close()
    right.close()


# -- timers ---------------------------------------------------------------------------

def test_timers_fire_in_time_order_then_schedule_order(loop: EventLoop,
                                                       clock: FakeClock) -> None:
    fired: list[str] = []
    loop.call_later(3.0, lambda: fired.append("c"))
    loop.call_later(1.0, lambda: fired.append("a"))
    loop.call_later(2.0, lambda: fired.append("b1"))
    loop.call_later(2.0, lambda: fired.append("b2"))
    loop.run_once(max_wait_s=0)
    assert fired == [], "nothing is due yet"
    clock.now += 1.0
    loop.run_once(max_wait_s=0)
    assert fired == ["a"]
    clock.now += 5.0
    loop.run_once(max_wait_s=0)
    assert fired == ["a", "b1", "b2", "c"]
    assert loop.now == clock.now


def test_timer_when_uses_the_clock(loop: EventLoop, clock: FakeClock) -> None:
    timer = loop.call_later(2.5, lambda: None)
    assert timer.when == clock.now + 2.5
    assert loop.time() == clock.now


def test_cancelled_timer_does_not_fire(loop: EventLoop, clock: FakeClock) -> None:
    fired: list[str] = []
    keep = loop.call_later(1.0, lambda: fired.append("keep"))
    drop = loop.call_later(1.0, lambda: fired.append("drop"))
    drop.cancel()
    drop.cancel()  # idempotent
    clock.now += 2.0
    loop.run_once(max_wait_s=0)
    assert fired == ["keep"]
    keep.cancel()  # after firing: a no-op
    assert loop._cancelled_timers == 0


def test_timer_cancelled_by_an_earlier_callback_of_the_same_turn(
        loop: EventLoop, clock: FakeClock) -> None:
    fired: list[str] = []
    holder: list[Any] = []

    def first() -> None:
        fired.append("first")
        holder[0].cancel()

    loop.call_later(1.0, first)
    holder.append(loop.call_later(1.0, lambda: fired.append("second")))
    clock.now += 1.0
    loop.run_once(max_wait_s=0)
    assert fired == ["first"]
    assert loop._cancelled_timers == 0, "a timer out of the heap is not counted"


def test_due_timer_bounds_the_wait(loop: EventLoop, clock: FakeClock) -> None:
    fired: list[bool] = []
    loop.call_later(0.0, lambda: fired.append(True))
    started = time.monotonic()
    loop.run_once(max_wait_s=WAIT_S)
    assert fired == [True]
    assert time.monotonic() - started < WAIT_S / 2


def test_callback_scheduled_by_a_callback_runs_next_turn(loop: EventLoop) -> None:
    order: list[int] = []

    def first() -> None:
        order.append(1)
        loop.call_soon(lambda: order.append(2))

    loop.call_soon(first)
    loop.run_once(max_wait_s=0)
    assert order == [1]
    loop.run_once(max_wait_s=0)
    assert order == [1, 2]


def test_cancelled_timers_are_compacted(loop: EventLoop, clock: FakeClock) -> None:
    fired: list[int] = []
    for index in range(3):
        loop.call_later(1000.0 + index, functools.partial(fired.append, index))
    largest = 0
    for _ in range(5_000):
        loop.call_later(10.0, lambda: fired.append(-1)).cancel()
        largest = max(largest, len(loop._timers))
    assert largest <= _COMPACT_MIN_CANCELLED + 3
    assert len(loop._timers) < 5_000 // 2
    clock.now += 2000.0
    loop.run_once(max_wait_s=0)
    assert fired == [0, 1, 2], "live timers survive compaction, in order"


def test_a_cancelled_timer_lets_go_of_its_callback_at_once(
        loop: EventLoop, clock: FakeClock) -> None:
    class Owner:
        def on_time(self) -> None:
            raise AssertionError("a cancelled timer ran")

    owner = Owner()
    gone = weakref.ref(owner)
    timer = loop.call_later(60.0, owner.on_time)
    loop.call_later(1.0, lambda: None)  # keeps the cancelled one inside the heap
    del owner
    assert gone() is not None, "held by the armed timer"
    timer.cancel()
    assert timer in [entry[2] for entry in loop._timers], "still in the heap"
    assert gone() is None, "a closed connection's objects must not wait for the heap"
    clock.now += 100.0
    loop.run_once(max_wait_s=0)


def test_compaction_when_cancelled_in_bulk(loop: EventLoop, clock: FakeClock) -> None:
    fired: list[int] = []
    timers = [loop.call_later(10.0, lambda: fired.append(1)) for _ in range(5_000)]
    survivor = loop.call_later(11.0, lambda: fired.append(2))
    for timer in timers:
        timer.cancel()
    assert len(loop._timers) < _COMPACT_MIN_CANCELLED
    assert survivor in [entry[2] for entry in loop._timers]
    clock.now += 20.0
    loop.run_once(max_wait_s=0)
    assert fired == [2]
    assert loop._timers == [] and loop._cancelled_timers == 0


# -- file descriptors ---------------------------------------------------------------

def test_readable_socket_triggers_its_handler(
        loop: EventLoop, pair: tuple[socket.socket, socket.socket]) -> None:
    left, right = pair
    events: list[int] = []
    loop.watch(left.fileno(), events.append)
    loop.set_interest(left.fileno(), EVENT_READ)
    assert loop.interest(left.fileno()) == EVENT_READ
    loop.run_once(max_wait_s=0)
    assert events == []
    right.sendall(b"x")
    loop.run_once(max_wait_s=WAIT_S)
    assert events == [EVENT_READ]


def test_writable_socket_triggers_its_handler(
        loop: EventLoop, pair: tuple[socket.socket, socket.socket]) -> None:
    left, _ = pair
    events: list[int] = []
    loop.watch(left.fileno(), events.append)
    loop.set_interest(left.fileno(), EVENT_READ | EVENT_WRITE)
    loop.run_once(max_wait_s=WAIT_S)
    assert events == [EVENT_WRITE]


def test_watched_without_interest_gets_no_events(
        loop: EventLoop, pair: tuple[socket.socket, socket.socket]) -> None:
    left, right = pair
    events: list[int] = []
    loop.watch(left.fileno(), events.append)
    right.sendall(b"x")
    loop.run_once(max_wait_s=0)
    assert events == []
    assert loop.is_watched(left.fileno())


def test_interest_changes_touch_the_selector_only_on_change(
        clock: FakeClock, pair: tuple[socket.socket, socket.socket]) -> None:
    selector = RecordingSelector()
    loop = EventLoop(clock=clock, selector=selector)
    try:
        left, right = pair
        fd = left.fileno()
        events: list[int] = []
        loop.watch(fd, events.append)
        selector.changes.clear()
        loop.set_interest(fd, EVENT_READ)
        loop.set_interest(fd, EVENT_READ)
        loop.set_interest(fd, EVENT_READ | EVENT_WRITE)
        loop.set_interest(fd, EVENT_READ)
        loop.set_interest(fd, 0)
        loop.set_interest(fd, 0)
        assert selector.changes == [
            ("register", fd, EVENT_READ),
            ("modify", fd, EVENT_READ | EVENT_WRITE),
            ("modify", fd, EVENT_READ),
            ("unregister", fd, 0),
        ]
        assert fd not in selector.get_map()
        right.sendall(b"x")
        loop.run_once(max_wait_s=0)
        assert events == [], "an empty mask is out of the selector"
        loop.set_interest(fd, EVENT_READ)
        loop.run_once(max_wait_s=0)
        assert events == [EVENT_READ]
    finally:
        loop.close()


class NonBlockingSelector(selectors.DefaultSelector):
    """Records the timeout the loop asks for and polls without waiting."""

    def __init__(self) -> None:
        super().__init__()
        self.timeouts: list[Optional[float]] = []

    def select(self, timeout: Optional[float] = None) -> list[tuple[selectors.SelectorKey, int]]:
        self.timeouts.append(timeout)
        return super().select(0)


def test_a_timer_weeks_away_does_not_overflow_the_select_timeout(clock: FakeClock) -> None:
    # Issue #18: epoll takes an int of milliseconds; 1e9 s overflowed it.
    selector = NonBlockingSelector()
    loop = EventLoop(clock=clock, selector=selector)
    try:
        fired: list[int] = []
        loop.call_later(1e9, lambda: fired.append(1))
        loop.run_once()
        assert selector.timeouts == [MAX_SELECT_WAIT_S]
        assert MAX_SELECT_WAIT_S * 1000 < 2 ** 31 - 1
        clock.now += MAX_SELECT_WAIT_S
        loop.run_once()
        assert fired == [], "a spare wake-up, not an early timer"
        clock.now += 1e9
        loop.run_once()
        assert fired == [1]
    finally:
        loop.close()


def test_unwatch_forgets_the_fd(clock: FakeClock,
                                pair: tuple[socket.socket, socket.socket]) -> None:
    selector = RecordingSelector()
    loop = EventLoop(clock=clock, selector=selector)
    try:
        left, right = pair
        fd = left.fileno()
        events: list[int] = []
        count = loop.watched_count
        loop.watch(fd, events.append)
        loop.set_interest(fd, EVENT_READ)
        assert loop.watched_count == count + 1
        loop.unwatch(fd)
        assert not loop.is_watched(fd)
        assert loop.watched_count == count
        assert fd not in selector.get_map()
        assert loop.interest(fd) == 0
        right.sendall(b"x")
        loop.run_once(max_wait_s=0)
        assert events == []
        loop.unwatch(fd)  # twice: harmless
        loop.watch(fd, events.append)  # and it may be watched again
    finally:
        loop.close()


def test_watching_an_fd_twice_is_an_error(
        loop: EventLoop, pair: tuple[socket.socket, socket.socket]) -> None:
    left, _ = pair
    loop.watch(left.fileno(), lambda events: None)
    with pytest.raises(ValueError):
        loop.watch(left.fileno(), lambda events: None)


def test_a_failing_handler_is_logged_and_the_loop_goes_on(
        loop: EventLoop, pair: tuple[socket.socket, socket.socket],
        caplog: pytest.LogCaptureFixture) -> None:
    left, right = pair
    other_left, other_right = socket.socketpair()
    try:
        calls: list[str] = []

        def broken(events: int) -> None:
            calls.append("broken")
            raise RuntimeError("handler boom")

        def fine(events: int) -> None:
            calls.append("fine")

        loop.watch(left.fileno(), broken)
        loop.set_interest(left.fileno(), EVENT_READ)
        loop.watch(other_left.fileno(), fine)
        loop.set_interest(other_left.fileno(), EVENT_READ)
        right.sendall(b"x")
        other_right.sendall(b"y")
        loop.call_soon(lambda: calls.append("callback"))
        with caplog.at_level(logging.ERROR, logger="rawproxy.loop"):
            loop.run_once(max_wait_s=WAIT_S)
        assert sorted(calls) == ["broken", "callback", "fine"]
        records = [r for r in caplog.records if r.name == "rawproxy.loop"]
        assert len(records) == 1
        assert f"fd {left.fileno()}" in records[0].getMessage()
        assert records[0].exc_info is not None
        assert "handler boom" in caplog.text
        loop.run_once(max_wait_s=0)  # still running
        assert calls.count("broken") == 2
    finally:
        loop.unwatch(other_left.fileno())
        other_left.close()
        other_right.close()


def test_a_failing_callback_is_logged_and_the_loop_goes_on(
        loop: EventLoop, clock: FakeClock, caplog: pytest.LogCaptureFixture) -> None:
    calls: list[str] = []

    def broken() -> None:
        raise RuntimeError("callback boom")

    loop.call_soon(broken)
    loop.call_later(0.0, broken)
    loop.call_soon(lambda: calls.append("after"))
    with caplog.at_level(logging.ERROR, logger="rawproxy.loop"):
        loop.run_once(max_wait_s=0)
    assert calls == ["after"]
    records = [r for r in caplog.records if r.name == "rawproxy.loop"]
    assert len(records) == 2
    assert all(r.exc_info and "callback boom" in str(r.exc_info[1]) for r in records)


def test_handler_unwatched_by_an_earlier_handler_is_skipped(
        loop: EventLoop, pair: tuple[socket.socket, socket.socket]) -> None:
    left, right = pair
    other_left, other_right = socket.socketpair()
    try:
        calls: list[int] = []
        fds = [left.fileno(), other_left.fileno()]

        def handler(events: int, own: int = 0) -> None:
            calls.append(own)
            for fd in fds:
                if fd != own and loop.is_watched(fd):
                    loop.unwatch(fd)

        for fd in fds:
            loop.watch(fd, functools.partial(handler, own=fd))
            loop.set_interest(fd, EVENT_READ)
        right.sendall(b"x")
        other_right.sendall(b"y")
        loop.run_once(max_wait_s=WAIT_S)
        assert len(calls) == 1, "the second handler was unwatched by the first"
    finally:
        for fd in (left.fileno(), other_left.fileno()):
            if loop.is_watched(fd):
                loop.unwatch(fd)
        other_left.close()
        other_right.close()


# -- other threads and signals --------------------------------------------------------

def test_call_soon_threadsafe_wakes_a_blocked_select(clock: FakeClock) -> None:
    selector = RecordingSelector()
    loop = EventLoop(clock=clock, selector=selector)
    try:
        ran = threading.Event()

        def from_other_thread() -> None:
            # Only once the loop is inside select() with a long timeout.
            if selector.entered_select.wait(WAIT_S):
                loop.call_soon_threadsafe(ran.set)

        thread = threading.Thread(target=from_other_thread)
        selector.entered_select.clear()
        thread.start()
        started = time.monotonic()
        loop.run_once(max_wait_s=60.0)
        elapsed = time.monotonic() - started
        thread.join(WAIT_S)
        assert ran.is_set()
        assert elapsed < WAIT_S
    finally:
        loop.close()


def test_signal_runs_its_callback_on_the_loop(clock: FakeClock) -> None:
    previous = signal.getsignal(signal.SIGUSR1)
    loop = EventLoop(clock=clock)
    try:
        got: list[str] = []
        loop.add_signal_handler(signal.SIGUSR1, lambda: got.append("usr1"))
        assert signal.getsignal(signal.SIGUSR1) is not previous
        os.kill(os.getpid(), signal.SIGUSR1)
        assert got == [], "the callback runs on the loop, not in the signal handler"
        deadline = time.monotonic() + WAIT_S
        while not got and time.monotonic() < deadline:
            loop.run_once(max_wait_s=1.0)
        assert got == ["usr1"]
    finally:
        loop.close()
    assert signal.getsignal(signal.SIGUSR1) == previous
    assert signal.set_wakeup_fd(-1) == -1, "close() released the wakeup fd"


def test_close_closes_everything(clock: FakeClock,
                                 pair: tuple[socket.socket, socket.socket]) -> None:
    selector = RecordingSelector()
    loop = EventLoop(clock=clock, selector=selector)
    left, _ = pair
    loop.watch(left.fileno(), lambda events: None)
    loop.set_interest(left.fileno(), EVENT_READ)
    loop.call_later(5.0, lambda: None)
    loop.call_soon(lambda: None)
    wake_recv, wake_send = loop._wake_recv, loop._wake_send
    loop.close()
    assert wake_recv.fileno() == -1 and wake_send.fileno() == -1
    assert selector.get_map() is None, "the selector is closed"
    assert loop.watched_count == 0
    assert loop._timers == [] and len(loop._ready) == 0
    loop.call_soon_threadsafe(lambda: None)  # a late post from a worker: ignored
    loop.close()  # idempotent
    assert left.fileno() != -1, "the loop does not close sockets it did not open"


def test_stop_ends_run(loop: EventLoop) -> None:
    turns: list[int] = []

    def tick() -> None:
        turns.append(1)
        if len(turns) == 3:
            loop.stop()
        else:
            loop.call_soon(tick)

    loop.call_soon(tick)
    loop.run()
    assert len(turns) == 3


def test_a_stale_event_never_reaches_a_socket_that_reused_the_fd() -> None:
    # Two readable sockets in one batch; whichever handler runs first closes
    # the other and opens a new socket, which the kernel gives the same fd
    # number.  The closed socket's collected event must not reach it.
    loop = EventLoop()
    pairs = [socket.socketpair() for _ in range(2)]
    replacement_events: list[int] = []
    replacements: list[socket.socket] = []
    closed: list[int] = []

    def make_handler(index: int) -> Callable[[int], None]:
        def handler(events: int) -> None:
            other = pairs[1 - index][0]
            if closed:
                return
            fd = other.fileno()
            loop.unwatch(fd)
            other.close()
            closed.append(fd)
            fresh = socket.socket()
            replacements.append(fresh)
            assert fresh.fileno() == fd, "the kernel reuses the lowest free fd"
            loop.watch(fd, replacement_events.append)
            loop.set_interest(fd, EVENT_READ | EVENT_WRITE)
        return handler

    try:
        for index, (reader, writer) in enumerate(pairs):
            loop.watch(reader.fileno(), make_handler(index))
            loop.set_interest(reader.fileno(), EVENT_READ)
            writer.send(b"x")
        loop.run_once(max_wait_s=1.0)
        assert closed, "no handler ran"
        assert replacement_events == [], "the stale event was delivered to the new socket"
    finally:
        for sock in replacements:
            loop.unwatch(sock.fileno())
            sock.close()
        for reader, writer in pairs:
            if reader.fileno() >= 0:
                loop.unwatch(reader.fileno())
                reader.close()
            writer.close()
        loop.close()


@pytest.mark.skipif(not hasattr(select, "epoll"), reason="the error watch is Linux's")
def test_a_reset_on_an_fd_with_an_empty_mask_is_reported_once_muted() -> None:
    loop = EventLoop()
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(1)
    client = socket.create_connection(listener.getsockname(), timeout=5)
    server, _ = listener.accept()
    seen: list[int] = []
    try:
        loop.watch(server.fileno(), seen.append)
        loop.set_interest(server.fileno(), EVENT_READ)
        loop.set_interest(server.fileno(), 0)  # not reading: only the error watch
        client.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        client.close()
        deadline = time.monotonic() + 5
        while not seen and time.monotonic() < deadline:
            loop.run_once(max_wait_s=0.1)
        assert seen and seen[0] & EVENT_ERROR
        loop.mute(server.fileno())
        count = len(seen)
        for _ in range(3):
            loop.run_once(max_wait_s=0.01)
        assert len(seen) == count, "a muted fd kept reporting"
    finally:
        loop.unwatch(server.fileno())
        server.close()
        listener.close()
        loop.close()
