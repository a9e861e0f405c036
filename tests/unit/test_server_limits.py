"""Overload and abuse (SPEC 13) in process: PerClient and --max-connections.

A real :class:`Server` on an :class:`EventLoop` thread (as in test_server),
clients on loopback; a second client address is 127.0.0.2 (all of 127/8 is
loopback on Linux), bound before connecting.  Nothing sleeps: conditions
are polled with a deadline, and "is still waiting" is a recv timeout.
"""

from __future__ import annotations

import logging
import os
import random
import select
import socket
import threading
import time
from typing import Callable, Iterator, Optional

import pytest

from rawproxy import outcomes
from rawproxy.admission import Admission
from rawproxy.config import Config
from rawproxy.counters import SharedCounters
from rawproxy.loop import EventLoop
from rawproxy.resolver import Resolver
from rawproxy.router import Router
from rawproxy.server import Server
from tests.support import HOST, Backend, free_ports, recv_exactly, wait_until
from tests.unit.test_server import FakeDns, LoopThread, make_config

OTHER_HOST = "127.0.0.2"
PAYLOAD = b"ping"


class CountingEcho(Backend):
    """An echo backend that counts the connections open at once.

    A connection counts until its peer's FIN or reset is in its receive
    queue, not until the serving thread gets round to reading it: a proxy
    closes one backend connection before it opens the next, so when the
    next is accepted the kernel already holds the old one's end."""

    def __init__(self) -> None:
        self.max_open = 0
        self._live: list[socket.socket] = []
        self._count_lock = threading.Lock()
        super().__init__("echo")

    @property
    def open(self) -> int:
        with self._count_lock:
            self._live = [conn for conn in self._live if not _peer_ended(conn)]
            return len(self._live)

    def _serve(self, conn: socket.socket) -> None:
        with self._count_lock:
            self._live = [c for c in self._live if not _peer_ended(c)] + [conn]
            self.max_open = max(self.max_open, len(self._live))
        super()._serve(conn)


def _peer_ended(conn: socket.socket) -> bool:
    # Through a duplicate without a timeout: with one (the serving thread
    # set it), recv first waits for data, MSG_DONTWAIT or not.
    try:
        fd = os.dup(conn.fileno())
    except (OSError, ValueError):
        return True  # closed by its serving thread
    with socket.socket(fileno=fd) as peek:
        try:
            return peek.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT) == b""
        except BlockingIOError:
            return False  # open, nothing to read
        except OSError:
            return True  # reset


class LimitHarness:
    def __init__(self, config: Config, max_connections: Optional[int]) -> None:
        self.loop = EventLoop()
        self.resolver = Resolver(self.loop.call_soon_threadsafe, getaddrinfo=FakeDns())
        self.server = Server(config, self.loop, self.resolver, listen_host=HOST,
                             rng=random.Random(7), max_connections=max_connections)
        self.thread = LoopThread(self.loop)
        self.thread.call(self.server.start)

    def close(self) -> None:
        self.thread.call(self.server.close)
        self.thread.stop()
        self.resolver.close()
        self.loop.close()


Start = Callable[..., LimitHarness]


@pytest.fixture
def proxy() -> Iterator[Start]:
    started: list[LimitHarness] = []

    def start(*apps: dict[str, object], max_connections: Optional[int] = None) -> LimitHarness:
        started.append(LimitHarness(make_config(*apps), max_connections))
        return started[-1]

    yield start
    for harness in started:
        harness.close()


@pytest.fixture
def echo() -> Iterator[CountingEcho]:
    backend = CountingEcho()
    yield backend
    backend.close()


def client(port: int, source: str = HOST) -> socket.socket:
    sock = socket.socket()
    try:
        sock.settimeout(10)
        sock.bind((source, 0))
        sock.connect((HOST, port))
    except OSError:
        sock.close()
        raise
    return sock


def try_client(port: int, source: str = HOST) -> Optional[socket.socket]:
    """A connected client, or None if the proxy's reset came back first (it
    may, on a busy machine, before ``connect`` returns)."""
    try:
        return client(port, source)
    except ConnectionResetError:
        return None


def is_served(port: int, source: str = HOST) -> bool:
    """One client: True if its echo comes back, False if it is reset."""
    sock = try_client(port, source)
    if sock is None:
        return False
    with sock:
        return served(sock)


def served(sock: Optional[socket.socket]) -> bool:
    """True if an echo comes back; False if the proxy reset the connection."""
    if sock is None:
        return False
    try:
        sock.sendall(PAYLOAD)
        answer = recv_exactly(sock, len(PAYLOAD))
    except (ConnectionResetError, BrokenPipeError):
        return False
    assert answer == PAYLOAD, answer
    return True


def is_waiting(sock: socket.socket, wait_s: float = 0.3) -> bool:
    """Connected (in the kernel's backlog) but not served within ``wait_s``."""
    sock.sendall(PAYLOAD)
    sock.settimeout(wait_s)
    try:
        sock.recv(len(PAYLOAD))
    except socket.timeout:
        return True
    finally:
        sock.settimeout(10)
    return False


# -- PerClient MaxConnections ----------------------------------------------------------

def test_per_client_max_connections_resets_the_third_and_serves_other_addresses(
        proxy: Start, echo: CountingEcho, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="rawproxy.access")
    (port,) = free_ports(1)
    h = proxy({"Name": "web", "Ports": [port], "Targets": [echo.address],
               "PerClient": {"MaxConnections": 2}})
    first, second = client(port), client(port)
    assert served(first) and served(second)
    assert not is_served(port)  # the third
    stats = h.server.stats.apps["web"]

    def access_records() -> list[logging.LogRecord]:
        return [r for r in caplog.records if r.name == "rawproxy.access"]

    # Counted, then logged, on the loop thread: wait for the record.
    wait_until(lambda: len(access_records()) == 1, message="the reset to be logged")
    assert stats.client_limited == 1 and stats.ends.get(outcomes.CLIENT_LIMIT) == 1
    records = access_records()
    assert [r.fields["end"] for r in records] == [outcomes.CLIENT_LIMIT]  # type: ignore[attr-defined]
    assert "127.0.0.1 over PerClient MaxConnections 2" in records[0].getMessage()
    with client(port, OTHER_HOST) as other, client(port, OTHER_HOST) as again:
        assert served(other) and served(again)  # another address has its own count
    first.close()
    wait_until(lambda: h.server.active_by_app["web"] == 1, message="the closes to be seen")
    assert is_served(port)  # one of 127.0.0.1's two slots is free again
    second.close()
    assert stats.client_limited == 1


# -- PerClient Rate ------------------------------------------------------------------------

def test_per_client_rate_resets_a_burst_beyond_r_and_refills(
        proxy: Start, echo: CountingEcho) -> None:
    (port,) = free_ports(1)
    h = proxy({"Name": "web", "Ports": [port], "Targets": [echo.address],
               "PerClient": {"Rate": 5}})
    started = time.monotonic()
    socks = [try_client(port) for _ in range(20)]  # connected at once; judged after
    try:
        results = [served(sock) for sock in socks]
    finally:
        for sock in socks:
            if sock is not None:
                sock.close()
    elapsed = time.monotonic() - started
    admitted = results.count(True)
    # A bucket of 5, refilled 5 a second: whatever the machine's load.
    assert 1 <= admitted <= 5 + 5 * elapsed + 1, (admitted, elapsed)
    assert admitted < 20 or elapsed > 2.8
    stats = h.server.stats.apps["web"]
    wait_until(lambda: stats.client_limited == results.count(False))
    with client(port, OTHER_HOST) as other:
        assert served(other)  # another address has a bucket of its own
    deadline = time.monotonic() + 10

    def refilled() -> bool:
        assert time.monotonic() < deadline, "no refill within 10 s"
        return is_served(port)

    wait_until(refilled, interval_s=0.05, message="a refilled bucket")


def test_a_flood_of_resets_logs_one_line_and_a_count(
        proxy: Start, echo: CountingEcho, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="rawproxy")
    (port,) = free_ports(1)
    h = proxy({"Name": "web", "Ports": [port], "Targets": [echo.address],
               "PerClient": {"MaxConnections": 1}})
    holder = client(port)
    assert served(holder)
    for _ in range(10):
        assert not is_served(port)
    stats = h.server.stats.apps["web"]
    wait_until(lambda: stats.client_limited == 10)

    def logged() -> int:
        return len([r for r in caplog.records if r.name == "rawproxy.access"
                    and getattr(r, "fields", {}).get("end") == outcomes.CLIENT_LIMIT])

    def held() -> int:  # "app web: 9 more connections reset by PerClient in the last 1s ..."
        return sum(int(r.getMessage().split(": ", 1)[1].split()[0]) for r in caplog.records
                   if "reset by PerClient" in r.getMessage())

    # Every reset is either logged or in a summary line, once the last window closed.
    wait_until(lambda: logged() + held() == 10, message="the summary line")
    assert 1 <= logged() < 10 and held() > 0
    holder.close()


# -- --max-connections -----------------------------------------------------------------------

def test_max_connections_pauses_every_port_and_serves_the_rest_later(
        proxy: Start, echo: CountingEcho) -> None:
    port_a, port_b = free_ports(2)
    h = proxy({"Name": "a", "Ports": [port_a], "Targets": [echo.address]},
              {"Name": "b", "Ports": [port_b], "Targets": [echo.address]},
              max_connections=3)
    first = [client(port_a), client(port_b), client(port_a)]
    for sock in first:
        assert served(sock)
    waiting = [client(port_b), client(port_a)]  # the kernel's backlog takes them
    try:
        for sock in waiting:
            assert is_waiting(sock)
        assert echo.open == 3
        first[0].close()
        first[1].close()
        for sock in waiting:
            assert recv_exactly(sock, len(PAYLOAD)) == PAYLOAD  # served, not refused
            assert served(sock)
        assert echo.max_open == 3
        assert h.server.open_connections_total() == 3
    finally:
        for sock in first + waiting:
            sock.close()
    wait_until(lambda: h.server.open_connections_total() == 0)
    assert not h.server.stats.apps["a"].ends.get(outcomes.CLIENT_LIMIT)


# -- --max-connections in the shared counters (admission), no sockets ---------------------

def test_the_total_is_one_count_for_every_worker_and_wakes_the_paused_one() -> None:
    shared = SharedCounters(workers=2, capacity=16)
    loops = [EventLoop(), EventLoop()]
    try:
        config = make_config({"Name": "a", "Ports": [1], "Targets": ["h.test:1"]},
                             {"Name": "b", "Ports": [2], "Targets": ["h.test:1"]})
        admissions = [Admission(loop, shared.worker(i), lambda: 0, max_connections=3)
                      for i, loop in enumerate(loops)]
        routes = [Router(config, random.Random(1), counters=shared.worker(i)).routes
                  for i in range(2)]
        first, second = admissions
        for app in ("a", "b"):
            assert first.reserve(routes[0][app])  # before an accept ...
            first.consume()  # ... and a session took it
        assert second.reserve(routes[1]["a"])  # three open, over two workers and apps
        second.consume()
        assert not second.has_room(routes[1]["b"]) and not second.reserve(routes[1]["b"])
        assert second.total_paused and first.open_total() == second.open_total() == 3
        wake_fd = shared.worker(1).wake_fd
        assert wake_fd is not None and not select.select([wake_fd], [], [], 0)[0]
        first.release(routes[0]["a"], routes[0]["a"])  # worker 0 frees one
        assert select.select([wake_fd], [], [], 0)[0]  # worker 1 is told at once
        assert second.reserve(routes[1]["b"]) and second.open_total() == 3
        second.unreserve()  # refused at accept after all: the slot is free again
        assert first.open_total() == 2
    finally:
        for loop in loops:
            loop.close()
        shared.close()
