"""Unit tests for rawproxy.relay: flows and relays driven by byte counts only.

The I/O shell is simulated: ``receive`` writes into ``ring.writable()`` as
``recv_into`` would and reports the count, ``send`` takes a prefix of
``ring.readable()`` as ``send`` would.  No sockets.
"""

from __future__ import annotations

import selectors

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from rawproxy.relay import WANT_READ, WANT_WRITE, Flow, Relay
from rawproxy.ringbuf import BufferPool, RingBuffer

HYPOTHESIS = settings(max_examples=200, deadline=None, derandomize=True)
READ_WRITE = WANT_READ | WANT_WRITE


def receive(flow: Flow[RingBuffer], data: bytes) -> int:
    """``recv_into(flow.buffer.writable())`` returning up to ``len(data)`` bytes."""
    region = flow.buffer.writable()
    count = min(len(region), len(data))
    region[:count] = data[:count]
    flow.on_received(count)
    return count


def receive_fin(flow: Flow[RingBuffer]) -> None:
    flow.buffer.writable()
    flow.on_received(0)


def send(flow: Flow[RingBuffer], max_bytes: int) -> bytes:
    region = flow.buffer.readable()
    out = bytes(region[:max_bytes])
    flow.on_sent(len(out))
    return out


def test_masks_are_the_selector_bits() -> None:
    assert WANT_READ == selectors.EVENT_READ
    assert WANT_WRITE == selectors.EVENT_WRITE


# -- Flow -----------------------------------------------------------------------

def test_new_flow_wants_to_read_only() -> None:
    flow = Flow(BufferPool(4))
    assert flow.wants_read()
    assert not flow.wants_write()
    assert not flow.should_shutdown_write()
    assert not flow.is_done()
    assert flow.bytes_sent == 0


def test_full_ring_stops_reading_until_a_send_makes_room() -> None:
    flow = Flow(BufferPool(4))
    assert receive(flow, b"abc") == 3
    assert flow.wants_read() and flow.wants_write()
    assert receive(flow, b"defg") == 1
    assert not flow.wants_read(), "backpressure: ring full"
    assert flow.wants_write()
    assert send(flow, 1) == b"a"
    assert flow.wants_read(), "one byte of room is enough to read again"
    assert send(flow, 99) == b"bcd"
    assert not flow.wants_write()


def test_bytes_sent_counts_what_went() -> None:
    flow = Flow(BufferPool(4))
    receive(flow, b"abcd")
    send(flow, 3)
    assert flow.bytes_sent == 3
    receive(flow, b"ef")
    send(flow, 99)
    send(flow, 99)
    assert flow.bytes_sent == 6


def test_fin_shuts_down_write_once_the_ring_is_empty() -> None:
    flow = Flow(BufferPool(8))
    receive(flow, b"tail")
    receive_fin(flow)
    assert flow.src_eof
    assert not flow.wants_read(), "nothing more to read after FIN"
    assert flow.wants_write()
    assert not flow.should_shutdown_write(), "bytes still to deliver"
    assert send(flow, 2) == b"ta"
    assert not flow.should_shutdown_write()
    assert send(flow, 2) == b"il"
    assert flow.should_shutdown_write()
    assert flow.should_shutdown_write(), "a predicate: asking twice changes nothing"
    assert not flow.is_done()
    flow.on_shutdown_write()
    assert not flow.should_shutdown_write(), "only once"
    assert flow.is_done()
    assert not flow.wants_read() and not flow.wants_write()


def test_fin_on_empty_ring_shuts_down_at_once_and_frees_storage() -> None:
    pool = BufferPool(8)
    flow = Flow(pool)
    receive_fin(flow)
    assert flow.should_shutdown_write()
    assert not flow.buffer.holds_storage
    assert pool.free_count == 1


def test_relay_close_gives_each_flows_storage_back() -> None:
    pool = BufferPool(8)
    relay = Relay(pool)
    receive(relay.upstream, b"abc")
    receive(relay.downstream, b"de")
    relay.close()
    assert not relay.upstream.buffer.holds_storage
    assert not relay.downstream.buffer.holds_storage
    assert pool.free_count == 2


def test_a_flow_makes_its_buffer_only_when_bytes_must_wait() -> None:
    pool = BufferPool(8)
    flow = Flow(pool)
    assert flow.stored is None
    assert flow.wants_read() and not flow.wants_write()
    assert flow.held == 0
    flow.on_received(0)  # a FIN: nothing to hold
    assert flow.should_shutdown_write() and flow.stored is None
    relay = Relay(pool)
    assert relay.masks() == (WANT_READ, WANT_READ)
    assert relay.bytes_buffered() == 0
    relay.close()  # nothing made, nothing to give back
    assert relay.upstream.stored is None and relay.downstream.stored is None
    receive(relay.upstream, b"abc")
    assert [flow.stored is None for flow in (relay.upstream, relay.downstream)] == [False, True]
    assert relay.masks() == (WANT_READ, WANT_READ | WANT_WRITE)
    assert relay.bytes_buffered() == 3


# -- Relay ----------------------------------------------------------------------

def test_fresh_relay_reads_both_sides() -> None:
    relay = Relay(BufferPool(4))
    assert relay.client_mask() == WANT_READ
    assert relay.target_mask() == WANT_READ
    assert relay.bytes_buffered() == 0
    assert not relay.is_done()


def test_client_bytes_make_the_target_writable() -> None:
    relay = Relay(BufferPool(4))
    receive(relay.upstream, b"hi")
    assert relay.client_mask() == WANT_READ
    assert relay.target_mask() == READ_WRITE
    assert relay.bytes_buffered() == 2


def test_target_bytes_make_the_client_writable() -> None:
    relay = Relay(BufferPool(4))
    receive(relay.downstream, b"hi")
    assert relay.client_mask() == READ_WRITE
    assert relay.target_mask() == WANT_READ


def test_full_upstream_stops_reading_the_client() -> None:
    relay = Relay(BufferPool(4))
    receive(relay.upstream, b"abcd")
    assert relay.client_mask() == 0
    assert relay.target_mask() == READ_WRITE
    send(relay.upstream, 1)
    assert relay.client_mask() == WANT_READ


def test_full_downstream_stops_reading_the_target() -> None:
    relay = Relay(BufferPool(4))
    receive(relay.downstream, b"abcd")
    assert relay.target_mask() == 0
    assert relay.client_mask() == READ_WRITE


def test_half_close_each_way_then_done() -> None:
    relay = Relay(BufferPool(4))
    receive(relay.upstream, b"q")
    receive_fin(relay.upstream)  # client sent FIN after its request
    assert relay.client_mask() == 0
    assert relay.target_mask() == READ_WRITE
    assert send(relay.upstream, 99) == b"q"
    assert relay.upstream.should_shutdown_write()
    relay.upstream.on_shutdown_write()
    assert relay.target_mask() == WANT_READ, "target may still answer"
    assert not relay.is_done()

    receive(relay.downstream, b"ok")
    assert relay.client_mask() == WANT_WRITE
    receive_fin(relay.downstream)
    assert relay.target_mask() == 0
    assert not relay.downstream.should_shutdown_write()
    assert send(relay.downstream, 99) == b"ok"
    assert relay.client_mask() == 0
    assert relay.downstream.should_shutdown_write()
    relay.downstream.on_shutdown_write()
    assert relay.is_done()
    assert relay.upstream.bytes_sent == 1
    assert relay.downstream.bytes_sent == 2


def test_relay_close_releases_both_rings() -> None:
    pool = BufferPool(4)
    relay = Relay(pool)
    receive(relay.upstream, b"a")
    receive(relay.downstream, b"b")
    assert pool.free_count == 0
    relay.close()
    assert relay.bytes_buffered() == 0
    assert pool.free_count == 2


# -- interleavings ----------------------------------------------------------------

OPS = st.lists(
    st.tuples(st.sampled_from(["recv", "send", "fin"]),
              st.sampled_from(["up", "down"]),
              st.integers(min_value=0, max_value=9)),
    max_size=80)


@HYPOTHESIS
@given(capacity=st.integers(min_value=1, max_value=9), ops=OPS)
def test_random_interleavings_are_bounded_and_in_order(
        capacity: int, ops: list[tuple[str, str, int]]) -> None:
    pool = BufferPool(capacity)
    relay = Relay(pool)
    flows = {"up": relay.upstream, "down": relay.downstream}
    produced = {name: bytearray() for name in flows}
    delivered = {name: bytearray() for name in flows}

    def produce(name: str, count: int) -> bytes:
        start = len(produced[name])
        return bytes((start + i) % 251 for i in range(count))

    for op, name, size in ops:
        flow = flows[name]
        if op == "recv" and flow.wants_read() and size:
            data = produce(name, size)
            count = receive(flow, data)
            assert count > 0, "a flow that wants to read has room"
            produced[name] += data[:count]
        elif op == "fin" and not flow.src_eof:
            receive_fin(flow)
        elif op == "send" and flow.wants_write():
            delivered[name] += send(flow, size)
        assert len(flow.buffer) <= capacity
        assert relay.bytes_buffered() <= 2 * capacity
        assert relay.masks() == (relay.client_mask(), relay.target_mask())
        assert flow.wants_read() == (not flow.src_eof and len(flow.buffer) < capacity)
        if flow.should_shutdown_write():
            flow.on_shutdown_write()
            assert not flow.should_shutdown_write()

    for name, flow in flows.items():
        while flow.wants_write():
            delivered[name] += send(flow, capacity)
        if not flow.src_eof:
            receive_fin(flow)
        assert flow.should_shutdown_write() != flow.dst_shut
        if flow.should_shutdown_write():
            flow.on_shutdown_write()
        assert delivered[name] == produced[name]
        assert flow.bytes_sent == len(produced[name])
        assert not flow.buffer.holds_storage
    assert relay.is_done()
    assert relay.client_mask() == relay.target_mask() == 0
    assert pool.free_count <= 2


@pytest.mark.parametrize("capacity", [1, 2, 7])
def test_byte_at_a_time_pump_delivers_everything(capacity: int) -> None:
    relay = Relay(BufferPool(capacity))
    data = bytes(range(50))
    out = bytearray()
    offset = 0
    while offset < len(data) or relay.upstream.wants_write():
        if relay.upstream.wants_read() and offset < len(data):
            offset += receive(relay.upstream, data[offset:offset + 1])
        if relay.target_mask() & WANT_WRITE:
            out += send(relay.upstream, 1)
    assert bytes(out) == data


def test_the_last_direction_to_end_is_known() -> None:
    # The session closes the pair then, and close's FIN stands in for a
    # shutdown: one shutdown per connection, not two.
    relay = Relay(BufferPool(4))
    receive_fin(relay.upstream)
    assert not relay.is_last_to_end(relay.upstream), "the target may still answer"
    relay.upstream.on_shutdown_write()
    receive_fin(relay.downstream)
    assert relay.is_last_to_end(relay.downstream)
    assert not relay.is_last_to_end(relay.upstream)
