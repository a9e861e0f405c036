"""Unit tests for rawproxy.counters: the shared block of open connections.

No sockets.  The cross-process tests fork (as the supervisor does) and the
children leave with ``os._exit``; every child is waited for.
"""

from __future__ import annotations

import os
import select
from typing import Callable, Iterator

import pytest

from rawproxy.counters import CountersFull, SharedCounters, slot_key


@pytest.fixture
def shared() -> Iterator[Callable[..., SharedCounters]]:
    made: list[SharedCounters] = []

    def make(workers: int = 1, capacity: int = 64) -> SharedCounters:
        block = SharedCounters(workers, capacity)
        made.append(block)
        return block

    yield make
    for block in made:
        block.close()


def readable(fd: int) -> bool:
    return bool(select.select([fd], [], [], 0)[0])


def in_child(body: Callable[[], None]) -> None:
    """Run ``body`` in a forked child and wait for it to exit 0."""
    pid = os.fork()
    if pid == 0:
        code = 1
        try:
            body()
            code = 0
        finally:
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0


def test_slots_are_found_by_name_in_every_worker(shared: Callable[..., SharedCounters]) -> None:
    block = shared(workers=3)
    a, b = block.worker(0), block.worker(2)
    assert a.slot("web", "10.0.0.1:80") == b.slot("web", "10.0.0.1:80")
    names = {a.slot("web"), a.slot("web", "10.0.0.1:80"), a.slot("db", "10.0.0.1:80"),
             b.slot("web", "10.0.0.2:80")}
    assert len(names) == 4
    assert block.slots_used == 4
    assert slot_key("web", "") != 0


def test_totals_sum_the_workers_each_writes_its_own(
        shared: Callable[..., SharedCounters]) -> None:
    block = shared(workers=2)
    zero, one = block.worker(0), block.worker(1)
    slot = zero.slot("web", "t:1")
    zero.add(slot, 2)
    one.add(slot, 3)
    assert zero.total(slot) == one.total(slot) == 5
    assert (zero.own(slot), one.own(slot)) == (2, 3)
    other = zero.slot("web", "t:2")
    assert zero.total(other) == 0


def test_take_holds_the_limit_and_give_back_frees(shared: Callable[..., SharedCounters]) -> None:
    counters = shared().worker(0)
    slot = counters.slot("web", "t:1")
    assert [counters.take(slot, 2) for _ in range(3)] == [True, True, False]
    assert counters.total(slot) == 2
    counters.give_back(slot)
    assert counters.has_room(slot, 2)
    assert counters.take(slot, 2)
    assert not counters.has_room(slot, 2)


def test_a_free_wakes_the_waiting_workers_only(shared: Callable[..., SharedCounters]) -> None:
    block = shared(workers=3)
    zero, one, two = (block.worker(i) for i in range(3))
    assert zero.wake_fd is not None and one.wake_fd is not None and two.wake_fd is not None
    slot = zero.slot("web", "t:1")
    assert zero.take(slot, 1)
    assert not one.take(slot, 1)  # marks worker 1 waiting
    zero.give_back(slot)
    assert readable(one.wake_fd)
    assert not readable(two.wake_fd) and not readable(zero.wake_fd)
    one.drain_wake()
    assert not readable(one.wake_fd)
    one.clear_waiting()
    assert one.take(slot, 1)
    one.give_back(slot)
    assert not readable(one.wake_fd)  # no longer waiting: no wake


def test_a_listener_check_at_the_limit_marks_waiting(
        shared: Callable[..., SharedCounters]) -> None:
    block = shared(workers=2)
    zero, one = block.worker(0), block.worker(1)
    slot = zero.slot("web")
    assert zero.take(slot, 1)
    assert not one.has_room(slot, 1)
    zero.give_back(slot)
    assert one.wake_fd is not None and readable(one.wake_fd)


def test_one_process_has_no_pipes_and_no_lock_file(
        shared: Callable[..., SharedCounters]) -> None:
    counters = shared().worker(0)
    assert counters.wake_fd is None
    slot = counters.slot("web")
    assert counters.take(slot, 1)
    counters.give_back(slot)
    counters.drain_wake()  # nothing to drain
    assert counters.total(slot) == 0


def test_a_full_block_says_so(shared: Callable[..., SharedCounters]) -> None:
    counters = shared(capacity=3).worker(0)
    for index in range(3):
        counters.slot("web", f"t:{index}")
    assert counters.slot("web", "t:1") >= 0  # known names still resolve
    with pytest.raises(CountersFull, match=r"more than 3 distinct apps and targets"):
        counters.slot("web", "t:3")


def test_a_block_nearly_full_warns_once(shared: Callable[..., SharedCounters],
                                        caplog: pytest.LogCaptureFixture) -> None:
    """Slots are never given back (see the module doc): say so before the
    reload that needs one more is rejected."""
    block = shared(capacity=10)
    counters = block.worker(0)
    for index in range(8):
        counters.slot("web", f"t:{index}")
    assert not [r for r in caplog.records if r.name == "rawproxy.counters"]
    for index in range(8, 10):
        counters.slot("web", f"t:{index}")
    warnings = [r.getMessage() for r in caplog.records if r.name == "rawproxy.counters"]
    assert len(warnings) == 1 and "9 of 10" in warnings[0]
    assert block.slots_used == 10


def test_bad_arguments() -> None:
    with pytest.raises(ValueError):
        SharedCounters(0)
    block = SharedCounters(2, 8)
    try:
        with pytest.raises(ValueError):
            block.worker(2)
    finally:
        block.close()


# -- across processes ---------------------------------------------------------------

def test_workers_in_other_processes_lose_no_update(
        shared: Callable[..., SharedCounters]) -> None:
    block = shared(workers=2)
    slot = block.worker(0).slot("web", "t:1")

    def count_up() -> None:
        child = block.worker(1)
        for _ in range(5000):
            child.add(slot, 1)

    pid = os.fork()
    if pid == 0:
        try:
            count_up()
        finally:
            os._exit(0)
    parent = block.worker(0)
    for _ in range(5000):
        parent.add(slot, 1)
    os.waitpid(pid, 0)
    assert parent.total(slot) == 10_000


def test_the_limit_holds_across_processes(shared: Callable[..., SharedCounters]) -> None:
    block = shared(workers=3)
    slot = block.worker(0).slot("web", "t:1")
    limit = 3
    ceiling = block.worker(0).slot("max seen")

    def contend(index: int) -> None:
        counters = block.worker(index)
        for _ in range(1500):
            if counters.take(slot, limit):
                with counters.lock:
                    seen = counters.total(slot)
                    if seen > counters.total(ceiling):
                        counters.add(ceiling, seen - counters.total(ceiling))
                counters.give_back(slot)

    pids = []
    for index in (1, 2):
        pid = os.fork()
        if pid == 0:
            code = 1
            try:
                contend(index)
                code = 0
            finally:
                os._exit(code)
        pids.append(pid)
    contend(0)
    for pid in pids:
        _, status = os.waitpid(pid, 0)
        assert os.waitstatus_to_exitcode(status) == 0
    counters = block.worker(0)
    assert counters.total(slot) == 0
    assert 1 <= counters.total(ceiling) <= limit


def test_a_dead_worker_leaks_nothing(shared: Callable[..., SharedCounters]) -> None:
    block = shared(workers=2)
    survivor = block.worker(0)
    slot = survivor.slot("web", "t:1")
    app = survivor.slot("web")
    survivor.add(slot, 1)
    assert not survivor.take(app, 0)  # a waiting survivor, woken by the cleanup

    def hold_and_die() -> None:
        dying = block.worker(1)
        dying.add(slot, 4)
        dying.add(app, 2)
        dying.mark_waiting()

    in_child(hold_and_die)  # exits without giving anything back
    assert survivor.total(slot) == 5 and survivor.total(app) == 2
    block.clear_worker(1)
    assert survivor.total(slot) == 1 and survivor.total(app) == 0
    assert survivor.wake_fd is not None and readable(survivor.wake_fd)
    assert block.cells[block.waiting_cell(1)] == 0
