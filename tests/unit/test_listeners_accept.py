"""rawproxy.listeners: what an accept hands on (issue #17 trimmed its cost).

Accepting skips ``socket.accept()``'s Python layer and takes
``TCP_NODELAY`` from the listener: the client must still arrive as a
socket of the listener's family, with its peer's address, non-blocking
once the server makes it so, and with ``TCP_NODELAY`` on (Linux).
"""

from __future__ import annotations

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
