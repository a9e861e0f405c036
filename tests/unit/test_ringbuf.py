"""Unit tests for rawproxy.ringbuf: the pool and the ring, no sockets.

The ring is checked against a plain ``bytearray`` model by a hypothesis
state machine: random ``commit``/``advance`` sizes on small capacities, so
the data wraps around the end of the storage all the time.
"""

from __future__ import annotations

import pytest
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    precondition,
    rule,
)

from rawproxy.ringbuf import BufferPool, RingBuffer

# derandomize: the same examples on every run (a seeded RNG, in effect).
HYPOTHESIS = settings(max_examples=200, deadline=None, derandomize=True)


# -- BufferPool --------------------------------------------------------------

def test_pool_take_gives_fresh_arrays_of_buffer_bytes() -> None:
    pool = BufferPool(16)
    first, second = pool.take(), pool.take()
    assert len(first) == len(second) == 16
    assert first is not second
    assert pool.free_count == 0


def test_pool_reuses_what_was_given_back() -> None:
    pool = BufferPool(8)
    storage = pool.take()
    pool.give_back(storage)
    assert pool.free_count == 1
    assert pool.take() is storage
    assert pool.free_count == 0


def test_pool_keeps_at_most_max_free() -> None:
    pool = BufferPool(8, max_free=2)
    arrays = [pool.take() for _ in range(5)]
    for storage in arrays:
        pool.give_back(storage)
    assert pool.free_count == 2
    kept = {id(pool.take()), id(pool.take())}
    assert kept <= {id(a) for a in arrays}
    assert pool.free_count == 0


def test_pool_with_max_free_zero_keeps_nothing() -> None:
    pool = BufferPool(8, max_free=0)
    pool.give_back(pool.take())
    assert pool.free_count == 0


@pytest.mark.parametrize("buffer_bytes", [0, -1])
def test_pool_rejects_non_positive_size(buffer_bytes: int) -> None:
    with pytest.raises(ValueError):
        BufferPool(buffer_bytes)


# -- RingBuffer: examples ------------------------------------------------------

def fill(ring: RingBuffer, data: bytes) -> int:
    """recv_into, simulated: write a prefix of ``data`` into writable()."""
    region = ring.writable()
    count = min(len(region), len(data))
    region[:count] = data[:count]
    ring.commit(count)
    return count


def drain(ring: RingBuffer, max_bytes: int) -> bytes:
    """send, simulated: take a prefix of readable()."""
    region = ring.readable()
    out = bytes(region[:max_bytes])
    ring.advance(len(out))
    return out


def test_new_ring_is_empty_and_holds_no_storage() -> None:
    pool = BufferPool(8)
    ring = RingBuffer(pool)
    assert ring.capacity == 8
    assert len(ring) == 0 and ring.free == 8
    assert ring.is_empty() and not ring.is_full()
    assert not ring.holds_storage
    assert len(ring.readable()) == 0
    assert not ring.holds_storage  # reading an empty ring borrows nothing


def test_storage_is_held_exactly_while_bytes_are() -> None:
    pool = BufferPool(8)
    ring = RingBuffer(pool)
    held: list[tuple[bool, int]] = []

    def note() -> None:
        held.append((ring.holds_storage, pool.free_count))

    assert len(ring.writable()) == 8  # about to be filled: borrowed
    note()
    ring.commit(3)
    note()
    ring.advance(2)
    note()
    ring.advance(1)
    note()
    assert held == [(True, 0), (True, 0), (True, 0), (False, 1)]


def test_commit_of_nothing_into_an_empty_ring_releases_storage() -> None:
    pool = BufferPool(8)
    ring = RingBuffer(pool)
    ring.writable()
    ring.commit(0)  # recv_into returned 0 (EOF)
    assert not ring.holds_storage
    assert pool.free_count == 1


def test_rings_share_the_pooled_arrays() -> None:
    pool = BufferPool(4)
    first, second = RingBuffer(pool), RingBuffer(pool)
    assert fill(first, b"ab") == 2
    assert drain(first, 4) == b"ab"
    assert pool.free_count == 1
    assert fill(second, b"cd") == 2  # takes the array the first gave back
    assert pool.free_count == 0
    assert drain(second, 4) == b"cd"


def test_emptied_ring_offers_the_whole_capacity_again() -> None:
    ring = RingBuffer(BufferPool(8))
    fill(ring, b"abcde")
    drain(ring, 5)
    assert len(ring.writable()) == 8


def test_regions_wrap_around_the_end() -> None:
    ring = RingBuffer(BufferPool(8))
    assert fill(ring, b"abcdef") == 6
    assert drain(ring, 4) == b"abcd"
    assert len(ring.writable()) == 2  # the tail of the storage first
    assert fill(ring, b"ghijkl") == 2
    assert len(ring.writable()) == 4  # then the head, up to the oldest byte
    assert fill(ring, b"ijklmn") == 4
    assert ring.is_full() and len(ring.writable()) == 0
    assert drain(ring, 99) == b"efgh"  # readable stops at the end of storage
    assert drain(ring, 99) == b"ijkl"
    assert ring.is_empty() and not ring.holds_storage


def test_append_across_the_wrap() -> None:
    ring = RingBuffer(BufferPool(8))
    fill(ring, b"012345")
    drain(ring, 5)
    ring.append(b"ABCDEFG")  # 2 bytes at the tail, 5 at the head
    assert ring.is_full()
    assert drain(ring, 99) + drain(ring, 99) == b"5ABCDEFG"


def test_append_more_than_free_raises_and_changes_nothing() -> None:
    ring = RingBuffer(BufferPool(4))
    ring.append(b"abc")
    with pytest.raises(ValueError):
        ring.append(b"de")
    assert len(ring) == 3
    assert drain(ring, 99) == b"abc"


def test_append_of_nothing_borrows_nothing() -> None:
    ring = RingBuffer(BufferPool(4))
    ring.append(b"")
    assert not ring.holds_storage


@pytest.mark.parametrize("nbytes", [-1, 6])
def test_commit_out_of_range_raises(nbytes: int) -> None:
    ring = RingBuffer(BufferPool(8))
    ring.writable()
    ring.commit(3)
    with pytest.raises(ValueError):
        ring.commit(nbytes)  # 5 bytes are free
    assert len(ring) == 3


def test_commit_of_exactly_free_is_allowed_and_one_more_is_not() -> None:
    ring = RingBuffer(BufferPool(8))
    ring.writable()
    ring.commit(3)
    ring.commit(5)
    assert ring.is_full()
    with pytest.raises(ValueError):
        ring.commit(1)


@pytest.mark.parametrize("nbytes", [-1, 4])
def test_advance_out_of_range_raises(nbytes: int) -> None:
    ring = RingBuffer(BufferPool(8))
    fill(ring, b"abc")
    with pytest.raises(ValueError):
        ring.advance(nbytes)
    assert len(ring) == 3
    assert drain(ring, 99) == b"abc"


def test_advance_on_empty_ring_raises() -> None:
    ring = RingBuffer(BufferPool(8))
    with pytest.raises(ValueError):
        ring.advance(1)


def test_close_drops_bytes_and_gives_storage_back() -> None:
    pool = BufferPool(8)
    ring = RingBuffer(pool)
    fill(ring, b"abc")
    ring.close()
    assert ring.is_empty() and not ring.holds_storage
    assert pool.free_count == 1
    fill(ring, b"xy")  # still usable
    assert drain(ring, 99) == b"xy"


# -- RingBuffer: property test against a bytearray model ----------------------

class RingMachine(RuleBasedStateMachine):
    """Random fills and drains; the ring must behave like a FIFO of bytes."""

    def __init__(self) -> None:
        super().__init__()
        self.capacity = 1
        self.pool = BufferPool(1)
        self.ring = RingBuffer(self.pool)
        self.model = bytearray()  # bytes held, oldest first
        self.stream_in = bytearray()
        self.stream_out = bytearray()
        self.ever_held = False

    @initialize(capacity=st.integers(min_value=1, max_value=17))
    def make_ring(self, capacity: int) -> None:
        self.capacity = capacity
        self.pool = BufferPool(capacity)
        self.ring = RingBuffer(self.pool)

    @rule(data=st.binary(max_size=20))
    def receive(self, data: bytes) -> None:
        region = self.ring.writable()
        self.ever_held = True
        assert len(region) <= self.capacity - len(self.model)
        if len(self.model) < self.capacity:
            assert len(region) > 0, "a ring with room must offer some"
        count = min(len(region), len(data))
        region[:count] = data[:count]
        self.ring.commit(count)
        self.model += data[:count]
        self.stream_in += data[:count]

    @rule(max_bytes=st.integers(min_value=0, max_value=20))
    def send(self, max_bytes: int) -> None:
        region = self.ring.readable()
        assert 0 < len(region) or not self.model
        assert bytes(region) == bytes(self.model[:len(region)])
        count = min(max_bytes, len(region))
        self.stream_out += region[:count]
        self.ring.advance(count)
        del self.model[:count]

    @rule(data=st.binary(max_size=20))
    def append(self, data: bytes) -> None:
        free = self.capacity - len(self.model)
        if len(data) > free:
            with pytest.raises(ValueError):
                self.ring.append(data)
            return
        self.ring.append(data)
        self.ever_held = self.ever_held or bool(data)
        self.model += data
        self.stream_in += data

    @precondition(lambda self: len(self.model) < self.capacity)
    @rule(extra=st.integers(min_value=1, max_value=5))
    def commit_too_much(self, extra: int) -> None:
        self.ring.writable()
        self.ever_held = True
        with pytest.raises(ValueError):
            self.ring.commit(self.capacity - len(self.model) + extra)
        if not self.model:
            self.ring.commit(0)  # hand back what writable() borrowed

    @rule(extra=st.integers(min_value=1, max_value=5))
    def advance_too_much(self, extra: int) -> None:
        with pytest.raises(ValueError):
            self.ring.advance(len(self.model) + extra)

    @rule()
    def negative_sizes(self) -> None:
        with pytest.raises(ValueError):
            self.ring.advance(-1)
        with pytest.raises(ValueError):
            self.ring.commit(-1)

    @invariant()
    def sizes_agree(self) -> None:
        held = len(self.model)
        assert len(self.ring) == held <= self.capacity
        assert self.ring.free == self.capacity - held
        assert self.ring.is_empty() == (held == 0)
        assert self.ring.is_full() == (held == self.capacity)

    @invariant()
    def storage_borrowed_only_while_holding(self) -> None:
        assert self.ring.holds_storage == bool(self.model)
        # One array in play: either in the ring or back in the pool.
        assert self.pool.free_count + self.ring.holds_storage == int(self.ever_held)

    @invariant()
    def stream_is_in_order(self) -> None:
        assert self.stream_out + self.model == self.stream_in

    def teardown(self) -> None:
        while self.model:
            self.send(self.capacity)
        assert self.stream_out == self.stream_in
        assert not self.ring.holds_storage


RingMachine.TestCase.settings = settings(
    HYPOTHESIS, max_examples=60, stateful_step_count=40)
TestRingMachine = RingMachine.TestCase
