"""rawproxy.listeners: what an accept hands on (issue #17 trimmed its cost).

Accepting skips ``socket.accept()``'s Python layer and takes
``TCP_NODELAY`` from the listener: the client must still arrive as a
socket of the listener's family, with its peer's address, non-blocking
once the server makes it so, and with ``TCP_NODELAY`` on (Linux).
"""

from __future__ import annotations

import select
import socket
import sys
from typing import Any, Iterator

import pytest

from rawproxy import netio
from rawproxy.listeners import Listener, ListenerSet
from rawproxy.loop import EventLoop
from tests.unit.test_health import drive

HOSTS = ["127.0.0.1", pytest.param("::1", marks=pytest.mark.skipif(
    not socket.has_ipv6, reason="no IPv6"))]


@pytest.fixture
def loop() -> Iterator[EventLoop]:
    holder = EventLoop()
    yield holder
    holder.close()


@pytest.mark.parametrize("host", HOSTS)
def test_an_accepted_client_keeps_its_family_address_and_nodelay(loop: EventLoop,
                                                                  host: str) -> None:
    got: list[tuple[socket.socket, Any]] = []
    listeners = ListenerSet(loop, host, backlog=8, reuse_port=False, accept_batch=4,
                            wants_accept=lambda listener: True,
                            on_client=lambda listener, sock, addr: got.append((sock, addr)),
                            on_exhausted=lambda listener, addr, reason: None)
    try:
        sock = netio.open_listener(host, 0, 8)
    except OSError as exc:  # IPv6 configured off
        pytest.skip(f"cannot listen on {host}: {exc}")
    listener = Listener(sock, sock.getsockname()[1], None, listeners)  # type: ignore[arg-type]
    listeners.by_port[listener.port] = listener
    loop.watch(listener.fd, listener.on_events)
    loop.set_interest(listener.fd, 1)
    with socket.create_connection((host, listener.port), timeout=5) as client:
        drive(loop, lambda: bool(got), "the accept")
        accepted, addr = got[0]
        with accepted:
            assert accepted.family == sock.family and accepted.type == socket.SOCK_STREAM
            assert addr[:2] == client.getsockname()[:2]
            assert accepted.getpeername()[:2] == client.getsockname()[:2]
            if sys.platform.startswith("linux"):
                assert listener.nodelay_inherited
                assert accepted.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY) != 0
            accepted.setblocking(False)
            client.sendall(b"ping")
            drive(loop, lambda: _readable(accepted), "the bytes")
            assert accepted.recv(16) == b"ping"
    loop.unwatch(listener.fd)
    sock.close()


def _readable(sock: socket.socket) -> bool:
    try:
        return bool(sock.recv(16, socket.MSG_PEEK))
    except BlockingIOError:
        return False


def test_accepts_run_after_the_turns_other_events_and_not_after_a_removal(
        loop: EventLoop) -> None:
    """A flooded listener's batch must not delay connections already open:
    in a turn where both are ready, the open connection is served first."""
    order: list[str] = []

    def on_client(listener: Listener, sock: socket.socket, addr: object) -> None:
        order.append("accept")
        sock.close()

    def on_open(events: int) -> None:
        order.append(open_side.recv(16).decode())

    def on_open_then_remove(events: int) -> None:
        on_open(events)
        del listeners.by_port[listener.port]

    listeners = ListenerSet(loop, "127.0.0.1", backlog=8, reuse_port=False, accept_batch=4,
                            wants_accept=lambda listener: True, on_client=on_client,
                            on_exhausted=lambda listener, addr, reason: None)
    sock = netio.open_listener("127.0.0.1", 0, 8)
    listener = Listener(sock, sock.getsockname()[1], None, listeners)  # type: ignore[arg-type]
    listeners.by_port[listener.port] = listener
    open_side, peer = socket.socketpair()
    try:
        # Ready after the listener (the connect comes first): epoll reports
        # it after the listener, so only the deferral puts it first.
        loop.watch(listener.fd, listener.on_events)
        loop.set_interest(listener.fd, 1)
        loop.watch(open_side.fileno(), on_open)
        loop.set_interest(open_side.fileno(), 1)
        with socket.create_connection(("127.0.0.1", listener.port), timeout=5):
            peer.sendall(b"open")
            drive(loop, lambda: "accept" in order, "the accept")
            assert order == ["open", "accept"]
            # Removed by a handler of the same turn: the batch accepts nothing.
            with socket.create_connection(("127.0.0.1", listener.port), timeout=5):
                peer.sendall(b"drop")
                select.select([sock], [], [], 5)
                loop.replace_handler(open_side.fileno(), on_open_then_remove)
                drive(loop, lambda: "drop" in order, "the removal")
                assert order == ["open", "accept", "drop"]
    finally:
        loop.unwatch(listener.fd)
        loop.unwatch(open_side.fileno())
        for closing in (sock, open_side, peer):
            closing.close()
