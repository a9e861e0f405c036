"""rawproxy.pollers, and the loop's fd calls on Linux: one epoll, one call per change.

The epoll set is wrapped to record each ``epoll_ctl`` the loop makes, so
the counts issue #17 is about (interest changes, going quiet, closing) are
checked exactly; the events themselves come from real sockets.
"""

from __future__ import annotations

import select
import socket
import struct
import time
from typing import Any, Iterator

import pytest

from rawproxy.loop import EVENT_ERROR, EVENT_READ, EVENT_WRITE, EventLoop
from rawproxy.pollers import ERR, HUP, IN, OUT, EpollPoller, decode

needs_epoll = pytest.mark.skipif(not hasattr(select, "epoll"), reason="Linux's epoll")
RDHUP = 0x2000


def test_decoding_follows_selectors_and_errors_on_a_quiet_fd() -> None:
    assert decode(IN, EVENT_READ, EVENT_ERROR) == EVENT_READ
    assert decode(OUT, EVENT_WRITE, EVENT_ERROR) == EVENT_WRITE
    # As selectors has it: anything but IN wakes the writer, anything but OUT the reader.
    assert decode(IN | HUP, EVENT_READ, EVENT_ERROR) == EVENT_READ | EVENT_WRITE
    assert decode(OUT | ERR | HUP, EVENT_WRITE, EVENT_ERROR) == EVENT_READ | EVENT_WRITE
    assert decode(IN | RDHUP, EVENT_READ, EVENT_ERROR) == EVENT_READ | EVENT_WRITE
    # An error or hang-up alone: EVENT_ERROR on an fd watched for errors only,
    # both sides on an fd that had asked for something.
    assert decode(ERR | HUP, 0, EVENT_ERROR) == EVENT_ERROR
    assert decode(HUP, 0, EVENT_ERROR) == EVENT_ERROR
    assert decode(ERR, EVENT_READ, EVENT_ERROR) == EVENT_READ | EVENT_WRITE


class RecordingEpoll:
    """An epoll set that records each change made to it."""

    def __init__(self, real: Any) -> None:
        self.real = real
        self.calls: list[tuple[str, int, int]] = []

    def register(self, fd: int, mask: int = 0) -> None:
        self.calls.append(("add", fd, mask))
        self.real.register(fd, mask)

    def modify(self, fd: int, mask: int) -> None:
        self.calls.append(("mod", fd, mask))
        self.real.modify(fd, mask)

    def unregister(self, fd: int) -> None:
        self.calls.append(("del", fd, 0))
        self.real.unregister(fd)

    def close(self) -> None:
        self.real.close()


@pytest.fixture
def recorded() -> Iterator[tuple[EventLoop, RecordingEpoll]]:
    loop = EventLoop()
    poller = loop._poller
    assert isinstance(poller, EpollPoller)
    recording = RecordingEpoll(poller._epoll)
    poller._epoll = recording  # type: ignore[assignment]
    yield loop, recording
    loop.close()


@pytest.fixture
def tcp() -> Iterator[tuple[socket.socket, socket.socket]]:
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(1)
    client = socket.create_connection(listener.getsockname(), timeout=5)
    server, _ = listener.accept()
    listener.close()
    server.setblocking(False)
    yield client, server
    client.close()
    server.close()


@needs_epoll
def test_each_interest_change_is_one_call(recorded: tuple[EventLoop, RecordingEpoll],
                                          tcp: tuple[socket.socket, socket.socket]) -> None:
    loop, epoll = recorded
    _, server = tcp
    fd = server.fileno()
    loop.watch(fd, lambda events: None)
    for mask in (EVENT_READ, EVENT_READ | EVENT_WRITE, 0, EVENT_READ, 0, 0):
        loop.set_interest(fd, mask)
    assert epoll.calls == [("add", fd, IN), ("mod", fd, IN | OUT), ("mod", fd, 0),
                           ("mod", fd, IN), ("mod", fd, 0)]
    loop.unwatch(fd)
    assert epoll.calls[-1] == ("del", fd, 0)


@needs_epoll
def test_watching_errors_only_is_one_call_and_reports_a_reset(
        recorded: tuple[EventLoop, RecordingEpoll],
        tcp: tuple[socket.socket, socket.socket]) -> None:
    loop, epoll = recorded
    client, server = tcp
    seen: list[int] = []
    loop.watch(server.fileno(), seen.append, errors_only=True)
    assert epoll.calls == [("add", server.fileno(), 0)]
    client.sendall(b"unread")  # data alone wakes nothing: no read interest
    loop.run_once(max_wait_s=0.05)
    assert seen == []
    client.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    client.close()
    deadline = time.monotonic() + 5
    while not seen and time.monotonic() < deadline:
        loop.run_once(max_wait_s=0.1)
    assert seen and seen[0] == EVENT_ERROR
    loop.unwatch(server.fileno())


@needs_epoll
def test_an_fd_about_to_be_closed_costs_no_call_and_a_stray_is_dropped(
        recorded: tuple[EventLoop, RecordingEpoll],
        tcp: tuple[socket.socket, socket.socket]) -> None:
    loop, epoll = recorded
    client, server = tcp
    fd = server.fileno()
    seen: list[int] = []
    loop.watch(fd, seen.append)
    loop.set_interest(fd, EVENT_READ)
    epoll.calls.clear()
    loop.unwatch(fd, closing=True)
    assert epoll.calls == [], "the kernel drops a closed fd from the set itself"
    # Left open by mistake, it would wake the loop for ever: the loop drops it.
    client.sendall(b"x")
    loop.run_once(max_wait_s=1.0)
    assert epoll.calls == [("del", fd, 0)] and seen == []
    loop.run_once(max_wait_s=0)
    assert epoll.calls == [("del", fd, 0)], "dropped once, not again"


@needs_epoll
def test_a_handler_can_be_replaced_with_its_registration_kept(
        recorded: tuple[EventLoop, RecordingEpoll],
        tcp: tuple[socket.socket, socket.socket]) -> None:
    loop, epoll = recorded
    client, server = tcp
    first: list[int] = []
    second: list[int] = []
    loop.watch(server.fileno(), first.append)
    loop.set_interest(server.fileno(), EVENT_READ)
    calls = len(epoll.calls)
    loop.replace_handler(server.fileno(), second.append)
    assert len(epoll.calls) == calls and loop.interest(server.fileno()) == EVENT_READ
    client.sendall(b"x")
    loop.run_once(max_wait_s=1.0)
    assert (first, second) == ([], [EVENT_READ])
    loop.unwatch(server.fileno())
    with pytest.raises(ValueError):
        loop.replace_handler(server.fileno(), second.append)
