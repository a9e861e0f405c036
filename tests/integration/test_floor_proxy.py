"""benchmarks/floor_proxy.py, the benchmark's floor peer: it must relay what
the workloads send (else its figures would be of a broken proxy), end both
directions in order, and keep no descriptor of a finished connection."""

from __future__ import annotations

import os
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


@pytest.mark.parametrize("size", [16, 3 * 1024 * 1024])
def test_the_floor_echoes_a_half_closed_stream_whole(floor: object, size: int) -> None:
    data = os.urandom(size)
    with connect(_port(floor)) as client:
        got: list[bytes] = []
        reader = threading.Thread(target=lambda: got.append(recv_until_eof(client)))
        reader.start()
        client.sendall(data)  # more than the socket buffers hold: the pipe parks
        client.shutdown(socket.SHUT_WR)
        reader.join(30)
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
