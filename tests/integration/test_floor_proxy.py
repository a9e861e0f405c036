"""benchmarks/floor_proxy.py, the benchmark's floor peer: it must relay what
the workloads send (else its figures would be of a broken proxy), end both
directions in order, and keep no descriptor of a finished connection."""

from __future__ import annotations

import os
import select
import socket
import threading
from typing import Callable, Iterator

import pytest

from tests.support import HOST, Backend, connect, recv_until_eof, wait_until

floor_proxy = pytest.importorskip("benchmarks.floor_proxy")
pytestmark = pytest.mark.skipif(not hasattr(os, "splice"),
                                reason="the floor proxy needs os.splice (Linux, Python 3.10+)")


@pytest.fixture
def floor(backend: Callable[..., Backend]) -> Iterator[object]:
    echo = backend("echo")
    proxy = floor_proxy.Proxy((HOST, 0), (HOST, echo.port))
    thread = threading.Thread(target=proxy.run, daemon=True)
    thread.start()
    yield proxy
    proxy.running = False
    thread.join(5)
    assert not thread.is_alive()
    proxy.listener.close()
    proxy.epoll.close()


def _port(proxy: object) -> int:
    return int(proxy.listener.getsockname()[1])  # type: ignore[attr-defined]


def _parked(proxy: object) -> bool:
    """Some direction holds bytes its destination would not take."""
    for handler in list(proxy.handlers.values()):  # type: ignore[attr-defined]
        conn = getattr(handler, "__self__", None)
        if isinstance(conn, floor_proxy.Conn) and (conn.up.held or conn.down.held):
            return True
    return False


@pytest.mark.parametrize("size", [16, 32 * 1024 * 1024])
def test_the_floor_echoes_a_half_closed_stream_whole(floor: object, size: int) -> None:
    data = os.urandom(size)
    with connect(_port(floor)) as client:
        got: list[bytes] = []

        def send_all_then_fin() -> None:
            client.sendall(data)
            client.shutdown(socket.SHUT_WR)

        writer = threading.Thread(target=send_all_then_fin)
        writer.start()
        if size > 16:
            # Nobody reads the echo yet: the backend stops reading, and the
            # floor must park the bytes it could not pass on, not drop them.
            wait_until(lambda: _parked(floor), timeout_s=20.0,
                       message="the floor to park a direction")
        got.append(recv_until_eof(client))
        writer.join(30)
    assert got == [data]


def test_the_floor_keeps_no_descriptor_of_an_ended_connection(floor: object) -> None:
    handlers = floor.handlers  # type: ignore[attr-defined]
    for _ in range(50):
        with connect(_port(floor)) as client:
            client.sendall(b"ping")
            assert client.recv(4) == b"ping"
    # Each ended connection's two sockets leave the loop: only the listener stays.
    wait_until(lambda: len(handlers) == 1, timeout_s=5.0,
               message="the sockets of ended connections to leave the loop")


def test_a_descriptor_closed_and_reused_in_one_batch_misses_the_old_events(
        backend: Callable[..., Backend]) -> None:
    # The batch says fd 7 (a connection that ends) and fd 8 (its target) are
    # readable; 7's handler closes both, and fd 8 is at once a new socket.
    # The batch's event for 8 was the old socket's: the new one must not get it.
    proxy = floor_proxy.Proxy((HOST, 0), (HOST, backend("echo").port))
    got: list[str] = []

    def old_client(events: int) -> None:
        got.append("old client")
        proxy.handlers.pop(8)
        proxy.closed_in_batch.add(8)
        proxy.handlers[8] = lambda events: got.append("new socket")

    class Batches:
        def __init__(self) -> None:
            self.left = [[(7, select.EPOLLIN), (8, select.EPOLLIN)], [(8, select.EPOLLIN)]]

        def poll(self, timeout: float) -> list[tuple[int, int]]:
            if not self.left:
                proxy.running = False
                return []
            return self.left.pop(0)

    real_epoll = proxy.epoll
    try:
        proxy.handlers[7] = old_client
        proxy.handlers[8] = lambda events: got.append("old target")
        proxy.epoll = Batches()
        proxy.run()
    finally:
        real_epoll.close()
        proxy.listener.close()
    assert got == ["old client", "new socket"]  # the second batch is the new socket's
