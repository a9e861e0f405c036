"""Unit tests for rawproxy.timeouts: a table of equal-length timeouts on a
real EventLoop driven by a fake clock (no waiting, no sockets)."""

from __future__ import annotations

import logging

import pytest

from rawproxy.loop import EventLoop
from rawproxy.timeouts import Timeouts
from tests.unit.test_loop import FakeClock, clock, loop  # noqa: F401  (fixtures)


def advance(loop: EventLoop, clock: FakeClock, seconds: float) -> None:
    clock.now += seconds
    loop.run_once(max_wait_s=0)
    loop.run_once(max_wait_s=0)  # a timer's callback runs from the ready queue


def recording(loop: EventLoop, delay_s: float) -> tuple[Timeouts[str], list[str]]:
    """A table whose callback notes each key that fell due, in order."""
    due: list[str] = []
    return Timeouts(loop, delay_s, due.append), due


def test_keys_fall_due_after_the_delay_in_arming_order(loop: EventLoop,
                                                       clock: FakeClock) -> None:
    table, due = recording(loop, 10.0)
    table.arm("a")
    clock.now += 4.0
    table.arm("b")
    table.arm("c")
    advance(loop, clock, 5.9)
    assert due == [] and len(table) == 3
    advance(loop, clock, 0.2)
    assert due == ["a"] and "a" not in table
    advance(loop, clock, 4.0)
    assert due == ["a", "b", "c"] and len(table) == 0


def test_however_many_are_armed_the_loop_holds_one_timer(loop: EventLoop,
                                                         clock: FakeClock) -> None:
    table: Timeouts[int] = Timeouts(loop, 5.0, lambda key: None)
    before = len(loop._timers)
    for key in range(1000):
        table.arm(key)
        if key % 2:
            table.disarm(key)
    assert len(table) == 500
    assert len(loop._timers) == before + 1


def test_a_disarmed_key_never_falls_due(loop: EventLoop, clock: FakeClock) -> None:
    table, due = recording(loop, 1.0)
    table.arm("gone")
    table.arm("kept")
    table.disarm("gone")
    table.disarm("never armed")  # nothing happens
    advance(loop, clock, 1.5)
    assert due == ["kept"]


def test_arming_again_starts_the_time_over(loop: EventLoop, clock: FakeClock) -> None:
    table, due = recording(loop, 2.0)
    table.arm("a")
    table.arm("b")
    clock.now += 1.5
    table.arm("a")  # to the end, due 2 s from now
    advance(loop, clock, 0.6)
    assert due == ["b"]
    advance(loop, clock, 1.0)
    assert due == ["b"]
    advance(loop, clock, 0.5)
    assert due == ["b", "a"]


def test_the_loop_timer_follows_the_oldest_key_left(loop: EventLoop,
                                                    clock: FakeClock) -> None:
    table, due = recording(loop, 10.0)
    table.arm("first")
    clock.now += 3.0
    table.arm("second")
    table.disarm("first")
    advance(loop, clock, 7.5)  # first's time: the loop timer finds second not due
    assert due == [] and len(loop._timers) == 1  # re-armed for second
    advance(loop, clock, 3.0)
    assert due == ["second"]


def test_a_callback_may_arm_again_and_a_failing_one_strands_nothing(
        loop: EventLoop, clock: FakeClock, caplog: pytest.LogCaptureFixture) -> None:
    due: list[str] = []

    def on_due(key: str) -> None:
        due.append(key)
        if key == "bad":
            raise RuntimeError("boom")
        if key == "again" and due.count("again") == 1:
            table.arm("again")

    table = Timeouts(loop, 1.0, on_due)
    for key in ("bad", "again", "after"):
        table.arm(key)
    with caplog.at_level(logging.ERROR, logger="rawproxy.timeouts"):
        advance(loop, clock, 1.5)
    assert due == ["bad", "again", "after"]
    assert "boom" in caplog.text
    assert len(loop._timers) == 1, "the one loop timer, for the key armed again"
    advance(loop, clock, 1.5)
    assert due == ["bad", "again", "after", "again"]


def test_keys_armed_by_callbacks_keep_one_loop_timer(loop: EventLoop,
                                                     clock: FakeClock) -> None:
    # A connect that times out fails over, and the next connect is armed in
    # the same table from inside the callback: the table must still hold
    # one loop timer, not one more per failover.
    armed_next = iter(range(1, 1000))

    def fail_over(key: int) -> None:
        table.arm(next(armed_next))

    table: Timeouts[int] = Timeouts(loop, 5.0, fail_over)
    table.arm(0)
    for _ in range(50):
        clock.now += 0.5
        table.arm(next(armed_next))  # new clients meanwhile
        advance(loop, clock, 0.0)
    advance(loop, clock, 10.0)
    live = [entry for entry in loop._timers if not entry[2].cancelled]
    assert len(live) == 1
    assert len(table) >= 1


def test_close_forgets_every_key_and_the_loop_timer(loop: EventLoop,
                                                    clock: FakeClock) -> None:
    table, due = recording(loop, 1.0)
    table.arm("a")
    table.close()
    advance(loop, clock, 2.0)
    assert due == [] and len(table) == 0
