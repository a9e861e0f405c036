"""rawproxy.server in process: a real EventLoop on a thread, loopback sockets.

No subprocess: the test builds a :class:`Server` on an :class:`EventLoop`
running in a background thread, and talks to it over 127.0.0.1.  Anything
that touches the server's state (start, reload, drain, views) runs on the
loop thread through :meth:`LoopThread.call`.  Targets are named
``*.test`` and resolved by a fake ``getaddrinfo`` (no real DNS query); the
server's ports are fresh ephemeral ports (config ports must be 1-65535, so
port 0 cannot be asked for).  Nothing sleeps: conditions are polled with a
deadline.
"""

from __future__ import annotations

import json
import logging
import random
import socket
import threading
from typing import Any, Callable, Iterator, TypeVar

import pytest

from rawproxy import outcomes, views
from rawproxy.config import Config, parse_config
from rawproxy.listeners import BindError
from rawproxy.loop import EventLoop
from rawproxy.resolver import Resolver
from rawproxy.server import Server
from tests.support import (FIRST_PICK, HOST, Backend, connect, dead_port, free_ports, recv_exactly,
                           wait_until)

T = TypeVar("T")
WAIT_S = 10.0


class LoopThread:
    """An EventLoop running on its own thread; ``call`` runs a function there."""

    def __init__(self, loop: EventLoop) -> None:
        self.loop = loop
        self._thread = threading.Thread(target=loop.run, name="test-loop", daemon=True)
        self._thread.start()

    def call(self, fn: Callable[[], T]) -> T:
        done = threading.Event()
        box: dict[str, Any] = {}

        def run() -> None:
            try:
                box["value"] = fn()
            except BaseException as exc:  # handed back to the test thread
                box["error"] = exc
            finally:
                done.set()

        self.loop.call_soon_threadsafe(run)
        assert done.wait(WAIT_S), "the loop thread did not run the call"
        if "error" in box:
            raise box["error"]
        return box["value"]  # type: ignore[no-any-return]

    def stop(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(WAIT_S)
        assert not self._thread.is_alive()


class FakeDns:
    """``getaddrinfo`` for names ending in ``.test``: each maps to loopback."""

    def __init__(self) -> None:
        self.asked: list[str] = []

    def __call__(self, host: str, port: int, *args: object,
                 **kwargs: object) -> list[tuple[Any, ...]]:
        self.asked.append(host)
        if not host.endswith(".test"):
            raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")
        return [(socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP, "", (HOST, port))]


def make_config(*apps: dict[str, Any]) -> Config:
    return parse_config(json.dumps({"Apps": list(apps)}), "test.json")


class Harness:
    def __init__(self, config: Config) -> None:
        self.dns = FakeDns()
        self.loop = EventLoop()
        self.resolver = Resolver(self.loop.call_soon_threadsafe, getaddrinfo=self.dns)
        self.server = Server(config, self.loop, self.resolver, listen_host=HOST,
                             rng=random.Random(7))
        self.drained = threading.Event()
        self.server.on_drained = self.drained.set
        self.thread = LoopThread(self.loop)
        self.thread.call(self.server.start)

    def close(self) -> None:
        self.thread.call(self.server.close)
        self.thread.stop()
        self.resolver.close()
        self.loop.close()


@pytest.fixture
def harness() -> Iterator[Callable[[Config], Harness]]:
    started: list[Harness] = []

    def start(config: Config) -> Harness:
        started.append(Harness(config))
        return started[-1]

    yield start
    for harness in started:
        harness.close()


@pytest.fixture
def echo() -> Iterator[Backend]:
    backend = Backend("echo")
    yield backend
    backend.close()


def as_json(view: object) -> Any:
    """The view as the admin endpoint sends it (and proof that it can)."""
    return json.loads(json.dumps(view, allow_nan=False))


def round_trip(port: int, payload: bytes = b"ping") -> bytes:
    with connect(port) as sock:
        sock.sendall(payload)
        return recv_exactly(sock, len(payload))


def is_refused(port: int) -> bool:
    try:
        socket.create_connection((HOST, port), timeout=WAIT_S).close()
    except ConnectionRefusedError:
        return True
    return False


# -- relaying ----------------------------------------------------------------------

def test_relays_to_a_named_target_and_accounts_for_it(
        harness: Callable[[Config], Harness], echo: Backend,
        caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="rawproxy.access")
    (port,) = free_ports(1)
    h = harness(make_config({"Name": "web", "Ports": [port],
                             "Targets": [f"echo.test:{echo.port}"]}))
    assert round_trip(port, b"hello, proxy") == b"hello, proxy"
    stats = h.server.stats.apps["web"]

    def access_records() -> list[logging.LogRecord]:
        return [r for r in caplog.records if r.name == "rawproxy.access"]

    # Logged after the counters, on the loop thread: wait for the record.
    wait_until(lambda: len(access_records()) == 1, message="the session to be logged")
    assert (stats.accepted, stats.ends, stats.bytes_in, stats.bytes_out) == (
        1, {outcomes.DONE: 1}, 12, 12)
    assert h.dns.asked == ["echo.test"]
    (record,) = access_records()
    fields = record.fields  # type: ignore[attr-defined]
    assert fields["app"] == "web" and fields["port"] == port
    assert fields["target"] == f"echo.test:{echo.port}" and fields["end"] == outcomes.DONE
    assert f"end={outcomes.DONE}" in record.getMessage()


def test_fails_over_from_a_refused_target(harness: Callable[[Config], Harness],
                                          echo: Backend) -> None:
    (port,) = free_ports(1)
    dead = f"{HOST}:{dead_port()}"
    # The dead target is the near-certain first pick: the connection must
    # fail over to the live one without the client noticing.
    h = harness(make_config({"Name": "web", "Ports": [port], "Targets": [
        {"Address": dead, "Weight": FIRST_PICK}, echo.address]}))
    assert round_trip(port) == b"ping"
    targets = h.server.stats.apps["web"].targets
    assert targets[dead].failures == {outcomes.REFUSED: 1}
    assert targets[echo.address].connected == 1
    view = as_json(h.thread.call(lambda: views.config_view(h.server)))
    status = {t["Address"]: t for t in view["Apps"][0]["Status"]["Targets"]}
    assert status[dead]["Up"] is False and status[dead]["ConsecutiveFailures"] == 1
    assert status[dead]["LastFailure"] == outcomes.REFUSED
    assert status[echo.address]["Up"] is True


def test_a_client_outside_allow_from_is_reset_and_counted(
        harness: Callable[[Config], Harness], echo: Backend) -> None:
    (port,) = free_ports(1)
    h = harness(make_config({"Name": "private", "Ports": [port], "Targets": [echo.address],
                             "AllowFrom": ["192.0.2.0/24"]}))
    try:  # the reset may come as early as the connect
        with connect(port) as sock:
            sock.sendall(b"x")
            assert sock.recv(1) == b""
    except (ConnectionResetError, BrokenPipeError):
        pass
    stats = h.server.stats.apps["private"]
    wait_until(lambda: stats.ends == {outcomes.DENIED: 1})
    assert stats.denied == 1 and echo.accepted == 0


# -- reloading ---------------------------------------------------------------------

def test_reload_opens_added_ports_closes_removed_ones_and_keeps_the_rest(
        harness: Callable[[Config], Harness], echo: Backend) -> None:
    removed, kept, added = free_ports(3)
    app = {"Name": "web", "Targets": [echo.address]}
    h = harness(make_config({**app, "Ports": [removed, kept]}))
    kept_socket = h.server.listeners.by_port[kept].sock
    with connect(removed) as open_before:  # a session on a port about to go
        open_before.sendall(b"a")
        assert recv_exactly(open_before, 1) == b"a"
        h.thread.call(lambda: h.server.reload(make_config({**app, "Ports": [kept, added]})))
        assert sorted(h.server.listeners.by_port) == sorted([kept, added])
        assert h.server.listeners.by_port[kept].sock is kept_socket
        open_before.sendall(b"b")
        assert recv_exactly(open_before, 1) == b"b", "open sessions outlive their port"
    assert round_trip(added) == b"ping" and round_trip(kept) == b"ping"
    assert is_refused(removed)


def test_a_port_that_cannot_be_bound_rejects_the_reload_whole(
        harness: Callable[[Config], Harness], echo: Backend) -> None:
    first, fresh = free_ports(2)
    squatter = socket.socket()
    squatter.bind((HOST, 0))
    squatter.listen(1)
    try:
        busy = squatter.getsockname()[1]
        old = make_config({"Name": "web", "Ports": [first], "Targets": [echo.address]})
        h = harness(old)
        new = make_config({"Name": "web", "Ports": [first, fresh, busy],
                           "Targets": [echo.address]})
        with pytest.raises(BindError) as caught:
            h.thread.call(lambda: h.server.reload(new))
        assert caught.value.port == busy and caught.value.app == "web"
        assert h.server.config is old and list(h.server.listeners.by_port) == [first]
        assert is_refused(fresh), "the port bound before the failure was closed again"
        assert round_trip(first) == b"ping"
    finally:
        squatter.close()


# -- draining ----------------------------------------------------------------------

def test_drain_closes_listeners_and_waits_for_open_sessions(
        harness: Callable[[Config], Harness], echo: Backend) -> None:
    (port,) = free_ports(1)
    h = harness(make_config({"Name": "web", "Ports": [port], "Targets": [echo.address]}))
    with connect(port) as sock:
        sock.sendall(b"a")
        assert recv_exactly(sock, 1) == b"a"
        h.thread.call(lambda: h.server.drain(600.0))
        assert h.server.draining and is_refused(port)
        sock.sendall(b"b")
        assert recv_exactly(sock, 1) == b"b", "an open session goes on while draining"
        assert not h.drained.is_set()
        with pytest.raises(RuntimeError):
            h.thread.call(lambda: h.server.reload(h.server.config))
    assert h.drained.wait(WAIT_S), "drained once the last session ended"
    assert h.server.stats.apps["web"].ends == {outcomes.DONE: 1}


def test_drain_timeout_closes_what_is_still_open(
        harness: Callable[[Config], Harness], echo: Backend) -> None:
    (port,) = free_ports(1)
    h = harness(make_config({"Name": "web", "Ports": [port], "Targets": [echo.address]}))
    with connect(port) as sock:
        sock.sendall(b"a")
        assert recv_exactly(sock, 1) == b"a"
        h.thread.call(lambda: h.server.drain(0.05))
        assert h.drained.wait(WAIT_S)
        assert h.server.stats.apps["web"].ends == {outcomes.DRAIN_TIMEOUT: 1}
        with pytest.raises(ConnectionResetError):
            if sock.recv(1) == b"":
                raise AssertionError("closed with FIN; a drain timeout resets")


def test_drain_with_nothing_open_finishes_at_once(
        harness: Callable[[Config], Harness], echo: Backend) -> None:
    (port,) = free_ports(1)
    h = harness(make_config({"Name": "web", "Ports": [port], "Targets": [echo.address]}))
    h.thread.call(lambda: h.server.drain(600.0))
    assert h.drained.is_set() and is_refused(port)


def test_the_admin_views_of_a_running_server(harness: Callable[[Config], Harness],
                                             echo: Backend) -> None:
    (port,) = free_ports(1)
    h = harness(make_config({"Name": "web", "Ports": [port], "Targets": [echo.address]}))
    with connect(port) as sock:
        sock.sendall(b"abc")
        assert recv_exactly(sock, 3) == b"abc"
        snap = h.thread.call(lambda: views.metrics_snapshot(h.server))
        assert snap.active == {"web": 1} and snap.live_bytes_in == {"web": 3}
        view = as_json(h.thread.call(lambda: views.config_view(h.server)))
        assert view["Apps"][0]["Status"]["ActiveConnections"] == 1
        assert view["ListenHost"] == HOST and view["Draining"] is False


def test_a_listener_resetting_clients_takes_one_a_turn_until_it_admits_one(
        echo: Backend) -> None:
    """A flood turned away at accept must not hold the loop a whole batch a
    turn (every other connection waits that); admitted clients go 4 a turn."""
    (port,) = free_ports(1)
    config = make_config({"Name": "a", "Ports": [port], "Targets": [echo.address],
                          "PerClient": {"MaxConnections": 2}})
    loop = EventLoop()
    resolver = Resolver(loop.call_soon_threadsafe)
    server = Server(config, loop, resolver, listen_host=HOST)
    clients: list[socket.socket] = []

    def arrive(source: str, count: int) -> None:  # the kernel completes them: a backlog
        for _ in range(count):
            sock = socket.socket()
            clients.append(sock)
            sock.bind((source, 0))
            sock.connect((HOST, port))

    try:
        server.start()
        stats = server.stats.app("a")

        def turn() -> int:
            before = stats.accepted
            loop.run_once(WAIT_S)
            return stats.accepted - before

        arrive("127.0.0.1", 6)
        # 2 admitted, the 3rd reset: that ends the batch; then one a turn.
        assert turn() == 3 and stats.client_limited == 1
        assert [turn() for _ in range(3)] == [1, 1, 1] and stats.client_limited == 4
        arrive("127.0.0.2", 3)  # another address: its first two are admitted
        assert turn() == 3 and stats.client_limited == 5  # back to 4 after an admit
    finally:
        for sock in clients:
            sock.close()
        server.close()
        resolver.close()
        loop.close()
