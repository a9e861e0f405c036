"""PipeBuffer and PipePool: the splice path's buffers, with real pipes."""

from __future__ import annotations

import fcntl
import os
import socket

import pytest

from rawproxy.pipes import SPLICE_FLAGS, PipeBuffer, PipePool, splice_available
from rawproxy.relay import Flow

pytestmark = pytest.mark.skipif(not splice_available(), reason="splice needs Linux, Python 3.10+")


def is_open(fd: int) -> bool:
    try:
        os.fstat(fd)
        return True
    except OSError:
        return False


def holds(buffer: PipeBuffer) -> bool:
    # A function, not the property inline: mypy would keep a narrowed value
    # of ``buffer.holds_storage`` across the calls that change it.
    return buffer.holds_storage


def test_pool_sizes_pipes_and_reuses_them() -> None:
    pool = PipePool(128 * 1024, max_free=1)
    first = pool.take()
    assert fcntl.fcntl(first[1], getattr(fcntl, "F_GETPIPE_SZ", 1032)) >= 128 * 1024
    assert os.get_blocking(first[0]) is False and os.get_blocking(first[1]) is False
    second = pool.take()
    pool.give_back(first)
    pool.give_back(second)  # over max_free: closed, not kept
    assert pool.free_count == 1
    assert not is_open(second[0]) and not is_open(second[1])
    assert pool.take() == first
    pool.give_back(first)
    pool.close()
    assert not is_open(first[0])


def test_buffer_borrows_a_pipe_only_while_holding_bytes() -> None:
    pool = PipePool(65536)
    buffer = PipeBuffer(pool)
    assert not holds(buffer)
    read_end, write_end = buffer.pipe()
    os.write(write_end, b"abc")
    buffer.commit(3)
    assert len(buffer) == 3 and holds(buffer) and not buffer.is_full()
    assert os.read(read_end, 3) == b"abc"
    buffer.advance(3)
    assert not holds(buffer) and pool.free_count == 1
    buffer.pipe()
    buffer.commit(0)  # e.g. splice said EAGAIN on an empty pipe
    assert not holds(buffer)


def test_mark_full_stops_reading_until_some_bytes_drain() -> None:
    buffer = PipeBuffer(PipePool(65536))
    _, write_end = buffer.pipe()
    os.write(write_end, b"x" * 10)
    buffer.commit(10)
    flow = Flow(PipePool(65536))
    flow.stored = buffer
    assert flow.wants_read()
    buffer.mark_full()
    assert buffer.is_full() and not flow.wants_read()
    buffer.advance(1)
    assert not buffer.is_full() and flow.wants_read()


def test_closing_a_buffer_with_bytes_destroys_its_pipe() -> None:
    pool = PipePool(65536)
    buffer = PipeBuffer(pool)
    pipe = buffer.pipe()
    buffer.append(b"stale")
    assert len(buffer) == 5
    buffer.close()
    assert pool.free_count == 0, "a pipe with stale bytes must never be pooled"
    assert not is_open(pipe[0]) and not is_open(pipe[1])


def test_append_and_range_checks() -> None:
    buffer = PipeBuffer(PipePool(8))
    buffer.append(b"PROXY")  # a 64 KiB pipe at least, but the flow counts to 8
    assert len(buffer) == 5 and buffer.free == 3
    with pytest.raises(ValueError):
        buffer.append(b"toolong")
    with pytest.raises(ValueError):
        buffer.commit(4)
    with pytest.raises(ValueError):
        buffer.advance(6)
    assert os.read(buffer.pipe()[0], 5) == b"PROXY"
    buffer.advance(5)
    assert buffer.is_empty()


def test_splice_moves_bytes_socket_to_pipe_to_socket() -> None:
    left, right = socket.socketpair()
    out_left, out_right = socket.socketpair()
    buffer = PipeBuffer(PipePool(65536))
    try:
        left.sendall(b"zero copy")
        _, write_end = buffer.pipe()
        moved = os.splice(right.fileno(), write_end, buffer.free, flags=SPLICE_FLAGS)
        buffer.commit(moved)
        sent = os.splice(buffer.pipe()[0], out_left.fileno(), len(buffer), flags=SPLICE_FLAGS)
        buffer.advance(sent)
        assert (moved, sent) == (9, 9)
        out_right.settimeout(5)
        assert out_right.recv(100) == b"zero copy"
        assert buffer.is_empty() and not holds(buffer)
    finally:
        for sock in (left, right, out_left, out_right):
            sock.close()
