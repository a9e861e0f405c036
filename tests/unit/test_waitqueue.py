"""Unit tests for rawproxy.waitqueue: FIFO per app, walks, timeouts.

A fake loop (clock, timers, the next-turn list) drives the queue; the
waiters are fakes that take a slot from a shared pool when resumed.
"""

from __future__ import annotations

from typing import Callable, Optional

from rawproxy.waitqueue import WaitQueues


class FakeTimer:
    def __init__(self, when: float, callback: Callable[[], None]) -> None:
        self.when = when
        self.callback = callback
        self.cancelled = False

    def cancel(self) -> None:
        self.cancelled = True


class FakeLoop:
    def __init__(self) -> None:
        self.now = 0.0
        self.timers: list[FakeTimer] = []
        self.soon: list[Callable[[], None]] = []

    def time(self) -> float:
        return self.now

    def call_later(self, delay_s: float, callback: Callable[[], None]) -> FakeTimer:
        timer = FakeTimer(self.now + delay_s, callback)
        self.timers.append(timer)
        return timer

    def call_soon(self, callback: Callable[[], None]) -> None:
        self.soon.append(callback)

    def turn(self) -> None:
        soon, self.soon = self.soon, []
        for callback in soon:
            callback()

    def advance(self, seconds: float) -> None:
        until = self.now + seconds
        while True:
            due = [t for t in self.timers if t.when <= until and not t.cancelled]
            if not due:
                break
            timer = min(due, key=lambda t: t.when)
            self.now = max(self.now, timer.when)
            timer.cancelled = True
            timer.callback()
            self.turn()
        self.now = until


class Pool:
    """Free slots, as the balancer would see them."""

    def __init__(self, free: int = 0) -> None:
        self.free = free


class FakeWaiter:
    def __init__(self, name: str, queues: WaitQueues, pool: Pool, log: list[str],
                 tried: bool = False, usable: Optional[Callable[[], bool]] = None) -> None:
        self.name = name
        self.queues = queues
        self.pool = pool
        self.log = log
        self.tried = tried
        self.usable = usable  # whether a free slot is one it may use
        self.timed_out: Optional[float] = None

    @property
    def has_tried(self) -> bool:
        return self.tried

    def start(self, timeout_s: float = 5.0) -> None:
        self.queues.wait(self, "app", timeout_s)

    def resume(self) -> None:
        if self.pool.free and (self.usable is None or self.usable()):
            self.pool.free -= 1
            self.log.append(self.name)
        else:
            self.queues.wait(self, "app", 5.0)  # keeps its place

    def queue_timed_out(self, waited_s: float) -> None:
        self.timed_out = waited_s


def setup() -> tuple[FakeLoop, WaitQueues, Pool, list[str], list[tuple[str, float]]]:
    loop = FakeLoop()
    left: list[tuple[str, float]] = []
    queues = WaitQueues(loop.time, loop.call_later, loop.call_soon,
                        on_left=lambda app, waited_s: left.append((app, waited_s)))
    return loop, queues, Pool(), [], left


def test_freed_slots_go_to_the_head_in_order() -> None:
    loop, queues, pool, log, left = setup()
    waiters = [FakeWaiter(f"w{i}", queues, pool, log) for i in range(4)]
    for waiter in waiters:
        waiter.start()
        loop.turn()
    assert queues.length("app") == 4 and log == []
    pool.free = 1
    queues.freed("app")
    loop.turn()
    assert log == ["w0"] and queues.length("app") == 3
    loop.now = 0.25
    pool.free = 2
    queues.freed("app")
    queues.freed("app")  # coalesced: one walk
    assert len(loop.soon) == 1
    loop.turn()
    assert log == ["w0", "w1", "w2"] and queues.length("app") == 1
    assert left == [("app", 0.0), ("app", 0.25), ("app", 0.25)]


def test_a_walk_stops_at_the_first_fresh_waiter_that_must_wait() -> None:
    loop, queues, pool, log, _ = setup()
    resumed: list[str] = []
    waiters = [FakeWaiter(f"w{i}", queues, pool, log) for i in range(3)]
    for waiter in waiters:
        waiter.start()
        original = waiter.resume

        def spy(waiter: FakeWaiter = waiter, original: Callable[[], None] = original) -> None:
            resumed.append(waiter.name)
            original()
        waiter.resume = spy  # type: ignore[method-assign]
    loop.turn()  # the walks scheduled by joining behind others
    resumed.clear()
    queues.freed("app")
    loop.turn()
    assert resumed == ["w0"]  # no slot for w0: none for w1, w2 either
    assert queues.length("app") == 3


def test_a_waiter_that_failed_over_may_be_passed() -> None:
    loop, queues, pool, log, _ = setup()
    # w0 already tried the only free target: it cannot use the slot; w1 can.
    stuck = FakeWaiter("w0", queues, pool, log, tried=True, usable=lambda: False)
    fresh = FakeWaiter("w1", queues, pool, log)
    stuck.start()
    fresh.start()
    pool.free = 1
    queues.freed("app")
    loop.turn()
    assert log == ["w1"]
    assert queues.length("app") == 1
    pool.free = 1
    stuck.usable = None
    queues.freed("app")
    loop.turn()
    assert log == ["w1", "w0"] and len(queues) == 0


def test_a_newcomer_behind_others_gets_a_free_slot_the_head_cannot_use() -> None:
    loop, queues, pool, log, _ = setup()
    stuck = FakeWaiter("w0", queues, pool, log, tried=True, usable=lambda: False)
    stuck.start()
    pool.free = 1
    FakeWaiter("w1", queues, pool, log).start()  # joining schedules a walk
    loop.turn()
    assert log == ["w1"]


def test_queue_timeout_from_when_the_client_joined() -> None:
    loop, queues, pool, log, left = setup()
    first = FakeWaiter("w0", queues, pool, log)
    first.start(timeout_s=2.0)
    loop.advance(1.0)
    second = FakeWaiter("w1", queues, pool, log)
    second.start(timeout_s=2.0)
    queues.freed("app")
    loop.turn()  # resumed, no slot: keeps its place and its deadline
    loop.advance(1.0)
    assert [first.timed_out, second.timed_out] == [2.0, None]
    assert queues.length("app") == 1
    loop.advance(1.5)
    assert second.timed_out == 2.0
    assert len(queues) == 0 and left == [("app", 2.0), ("app", 2.0)]


def test_leaving_cancels_the_timer_and_forgets_the_waiter() -> None:
    loop, queues, pool, log, left = setup()
    waiters = [FakeWaiter(f"w{i}", queues, pool, log) for i in range(3)]
    for waiter in waiters:
        waiter.start()
    assert set(queues.waiting) == set(waiters)
    queues.leave(waiters[1])  # the client went away
    assert waiters[1] not in queues.waiting
    queues.leave(waiters[1])  # twice is harmless
    queues.leave(FakeWaiter("never", queues, pool, log))
    loop.advance(10.0)
    assert waiters[1].timed_out is None
    assert [w.timed_out for w in (waiters[0], waiters[2])] == [5.0, 5.0]
    assert len(left) == 3
    assert not queues.waiting  # sessions skip the queue's calls while it is empty


def test_many_gone_from_the_middle_are_compacted() -> None:
    loop, queues, pool, log, _ = setup()
    head = FakeWaiter("head", queues, pool, log)
    head.start()
    middle = [FakeWaiter(f"m{i}", queues, pool, log) for i in range(100)]
    for waiter in middle:
        waiter.start()
    for waiter in middle:
        queues.leave(waiter)
    assert len(queues._queues["app"]) < 40
    pool.free = 1
    queues.freed("app")
    loop.turn()
    assert log == ["head"]


def test_wake_all_walks_every_app_with_waiters() -> None:
    loop, queues, pool, log, _ = setup()
    FakeWaiter("a", queues, pool, log).start()
    other = FakeWaiter("b", queues, pool, log)
    queues.wait(other, "other", 5.0)
    pool.free = 2
    queues.wake_all()
    loop.turn()
    assert sorted(log) == ["a", "b"]
    assert queues.lengths() == {}


def test_a_waiter_closed_while_resumed_leaves() -> None:
    loop, queues, pool, log, _ = setup()
    waiter = FakeWaiter("w0", queues, pool, log)
    waiter.start()
    waiter.resume = lambda: queues.leave(waiter)  # type: ignore[method-assign]
    queues.freed("app")
    loop.turn()
    assert len(queues) == 0
