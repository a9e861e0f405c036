"""In-process tests of rawproxy.session: a Session on a real EventLoop.

No subprocess: the test plays client and target itself with non-blocking
loopback sockets, hands the session its "accepted" client socket, and
drives the loop with ``run_once`` until a condition holds (with a
deadline; nothing sleeps).  Names go through a real :class:`Resolver`
whose ``getaddrinfo`` is a table, so no query ever leaves the process.
"""

from __future__ import annotations

import errno
import json
import random
import socket
import struct
import time
from typing import Any, Callable, Iterator, Mapping, Optional, Sequence

import pytest

from rawproxy import netio, outcomes
from rawproxy.config import parse_config
from rawproxy.loop import EventLoop
from rawproxy.pipes import PipePool, splice_available
from rawproxy.resolver import Resolver
from rawproxy.ringbuf import BufferPool
from rawproxy.router import Route, Router
from rawproxy.movers import CopySession, SpliceSession
from rawproxy.session import Session, State
from rawproxy.sessionctx import SessionContext
from tests.support import Blackhole
from tests.unit.test_health import DEADLINE_S, Sockets, drive, port_of
from tests.unit.test_health import loop  # noqa: F401  (a pytest fixture, shared)

HOST = "127.0.0.1"
BUFFER = 64 * 1024
CHUNK = b"x" * 65536

needs_splice = pytest.mark.skipif(not splice_available(), reason="splice(2) is Linux-only")


class Peer:
    """One end the test plays (client or target): reads what is there."""

    def __init__(self, sock: socket.socket) -> None:
        sock.setblocking(False)
        self.sock = sock
        self.data = bytearray()
        self.ended = ""  # "", "eof" or "reset"

    def poll(self) -> bool:
        """Read what is available; True once the stream ended (EOF or reset)."""
        while not self.ended:
            try:
                chunk = self.sock.recv(65536)
            except (BlockingIOError, InterruptedError):
                return False
            except ConnectionResetError:
                self.ended = "reset"
                break
            if not chunk:
                self.ended = "eof"
                break
            self.data += chunk
        return True

    def has(self, data: bytes) -> bool:
        self.poll()
        return bytes(self.data) == data

    def send_all(self, loop: EventLoop, data: bytes) -> None:
        view = memoryview(data)
        while view:
            try:
                view = view[self.sock.send(view):]
            except BlockingIOError:
                loop.run_once(max_wait_s=0.01)

    def abort(self) -> None:
        """Close with RST (SO_LINGER 0)."""
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        self.sock.close()


class Net(Sockets):
    """Loopback sockets (and full accept queues) closed when the test ends."""

    def __init__(self) -> None:
        super().__init__()
        self.blackholes: list[Blackhole] = []

    def keep(self, sock: socket.socket) -> socket.socket:
        self.opened.append(sock)
        return sock

    refuser = Sockets.bound
    listener = Sockets.listening

    def blackhole(self) -> int:
        hole = Blackhole()
        self.blackholes.append(hole)
        return hole.port

    def accept(self, loop: EventLoop, listener: socket.socket) -> Peer:
        accepted: list[socket.socket] = []

        def one() -> bool:
            try:
                accepted.append(listener.accept()[0])
            except BlockingIOError:
                return False
            return True

        drive(loop, one, "the proxy to connect to the target")
        return Peer(self.keep(accepted[0]))

    def client_pair(self) -> tuple[Peer, socket.socket]:
        """A connected client and the proxy's side of it (as accept gives it)."""
        front = self.listener()
        client = self.keep(socket.create_connection((HOST, port_of(front))))
        front.setblocking(True)
        accepted = self.keep(front.accept()[0])
        accepted.setblocking(False)
        return Peer(client), accepted

    def close(self) -> None:
        for sock in self.opened:
            sock.close()
        for hole in self.blackholes:
            hole.close()


def table(names: Mapping[str, Sequence[int]]) -> Callable[..., list[tuple[Any, ...]]]:
    """A getaddrinfo answering ``name -> loopback ports`` and nothing else."""
    def getaddrinfo(host: str, port: int, *args: Any, **kwargs: Any) -> list[tuple[Any, ...]]:
        if host not in names:
            raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")
        return [(socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP, "", (HOST, p))
                for p in names[host]]
    return getaddrinfo


class Harness:
    """A SessionContext like the server's, with the test's hooks."""

    def __init__(self, loop: EventLoop, net: Net) -> None:
        self.loop = loop
        self.net = net
        self.names: dict[str, Sequence[int]] = {}
        self.getaddrinfo: Callable[..., Any] = table(self.names)
        self.resolver = Resolver(loop.call_soon_threadsafe,
                                 getaddrinfo=lambda *a, **k: self.getaddrinfo(*a, **k))
        self.closed: list[Session[Any]] = []
        self.opened: list[Session[Any]] = []
        self.shortages: list[str] = []
        self.pipes: Optional[PipePool] = PipePool(BUFFER) if splice_available() else None
        self.pool = BufferPool(BUFFER)
        self.half_open_timeout_s = 60.0

    def context(self) -> SessionContext:
        return SessionContext(self.loop, self.resolver, self.pool, self.closed.append,
                              self.half_open_timeout_s, self.pipes, self.shortages.append)

    def route(self, targets: Sequence[str], **keys: object) -> Route:
        document = {"Apps": [{"Name": "web", "Ports": [5001], "Targets": list(targets), **keys}]}
        router = Router(parse_config(json.dumps(document), "test.json"), random.Random(1))
        return router.routes["web"]

    def open(self, route: Route, kind: type[Session[Any]] = CopySession,
             early: bytes = b"") -> tuple[Session[Any], Peer]:
        client, accepted = self.net.client_pair()
        if early:
            client.sock.sendall(early)  # before the session exists: the kernel holds it
        session = kind(self.context(), route, accepted, "client", 5001)
        self.opened.append(session)
        session.start()
        return session, client

    def wait_closed(self, session: Session[Any], deadline_s: float = DEADLINE_S) -> None:
        drive(self.loop, lambda: session.state is State.CLOSED, "the session to close",
              deadline_s)
        assert self.closed.count(session) == 1


@pytest.fixture(autouse=True, params=["at-once", "on-write"])
def connect_path(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """Each session test both ways: a loopback connect over when connect()
    returns, taken at once, and the way every remote target goes (a wake-up
    for write readiness), forced here by saying no connect is over yet."""
    if request.param == "on-write":
        monkeypatch.setattr(netio, "established", lambda sock: False)
    path: str = request.param
    return path


@pytest.fixture
def net() -> Iterator[Net]:
    holder = Net()
    yield holder
    holder.close()


@pytest.fixture
def harness(loop: EventLoop, net: Net) -> Iterator[Harness]:
    holder = Harness(loop, net)
    yield holder
    for session in holder.opened:
        session.close(outcomes.SHUTDOWN, reset=True)  # what the test left open
    holder.resolver.close()


def address(sock: socket.socket) -> str:
    return f"{HOST}:{port_of(sock)}"


KINDS = [CopySession, pytest.param(SpliceSession, marks=needs_splice)]


# -- connecting and failover --------------------------------------------------


@pytest.mark.parametrize("kind", KINDS)
def test_failover_first_target_refused_second_works(
        loop: EventLoop, net: Net, harness: Harness, kind: type[Session[Any]]) -> None:
    refuser, listener = net.refuser(), net.listener()
    route = harness.route([address(refuser), address(listener)])
    first, second = route.balancer.targets
    # Mark the working one down, so the refuser is chosen first and the
    # working one only because it is the last untried target.
    route.balancer.record_failure(second, loop.time(), "stale")
    session, client = harness.open(route, kind, early=b"early ")
    target = net.accept(loop, listener)
    client.send_all(loop, b"bytes")
    drive(loop, lambda: target.has(b"early bytes"), "the early bytes, then the rest")
    assert session.target is second and session.state is State.RELAYING
    assert route.balancer.health(first).last_failure == outcomes.REFUSED
    assert route.stats.target(address(refuser)).failures == {outcomes.REFUSED: 1}
    assert route.stats.target(address(listener)).connected == 1


def test_every_target_failing_closes_the_client(
        loop: EventLoop, net: Net, harness: Harness) -> None:
    route = harness.route([address(net.refuser()), address(net.refuser())])
    session, client = harness.open(route)
    harness.wait_closed(session)
    assert session.end == outcomes.CONNECT_FAILED
    drive(loop, client.poll, "the client to see the end")
    assert all(h.consecutive_failures == 1 for h in route.balancer.healths())


def test_an_unresolvable_name_fails_over(
        loop: EventLoop, net: Net, harness: Harness) -> None:
    listener = net.listener()
    route = harness.route([f"nowhere.test:{port_of(listener)}", address(listener)])
    route.balancer.record_failure(route.balancer.targets[1], loop.time(), "stale")
    session, _ = harness.open(route)
    net.accept(loop, listener)
    drive(loop, lambda: session.state is State.RELAYING, "relaying")
    assert route.balancer.health(route.balancer.targets[0]).last_failure == outcomes.DNS


def test_a_name_whose_first_address_drops_syns_connects_to_the_second(
        loop: EventLoop, net: Net, harness: Harness) -> None:
    """#18 defect 7: each address gets its own share of ConnectTimeout."""
    listener = net.listener()
    harness.names["svc.test"] = [net.blackhole(), port_of(listener)]
    route = harness.route([f"svc.test:{port_of(listener)}"], ConnectTimeout=2.0)
    started = time.monotonic()
    session, client = harness.open(route, early=b"hi")
    target = net.accept(loop, listener)
    drive(loop, lambda: target.has(b"hi"), "the bytes through the second address")
    assert time.monotonic() - started < 2.0
    assert session.state is State.RELAYING
    assert route.balancer.health(route.balancer.targets[0]).consecutive_failures == 0


# -- relaying ---------------------------------------------------------------------


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("first", ["client", "target"])
def test_half_close_either_side_first(
        loop: EventLoop, net: Net, harness: Harness, kind: type[Session[Any]],
        first: str) -> None:
    listener = net.listener()
    session, client = harness.open(harness.route([address(listener)]), kind)
    target = net.accept(loop, listener)
    early, late = (client, target) if first == "client" else (target, client)
    early.send_all(loop, b"request")
    early.sock.shutdown(socket.SHUT_WR)
    drive(loop, late.poll, "the FIN to cross the proxy")
    assert (bytes(late.data), late.ended) == (b"request", "eof")
    assert session.state is State.RELAYING  # the other direction goes on
    ctx = session._ctx
    connects = ctx.connect_timeouts.for_budget(session.route.app.connect_timeout_s)
    assert session in ctx.half_open and len(connects) == 0
    late.send_all(loop, b"response")
    late.sock.shutdown(socket.SHUT_WR)
    drive(loop, early.poll, "the answer and its FIN")
    assert (bytes(early.data), early.ended) == (b"response", "eof")
    harness.wait_closed(session)
    assert session.end == outcomes.DONE
    assert len(ctx.half_open) == 0, "the close takes it out of the table"
    sent = (session.bytes_from_client, session.bytes_from_target)
    assert sent == ((7, 8) if first == "client" else (8, 7))


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("side", ["client", "target"])
def test_a_reset_on_one_side_resets_the_other(
        loop: EventLoop, net: Net, harness: Harness, kind: type[Session[Any]],
        side: str) -> None:
    listener = net.listener()
    session, client = harness.open(harness.route([address(listener)]), kind)
    target = net.accept(loop, listener)
    client.send_all(loop, b"ping")
    drive(loop, lambda: target.has(b"ping"), "a relayed byte")
    gone, other = (client, target) if side == "client" else (target, client)
    gone.abort()
    harness.wait_closed(session)
    assert session.end == outcomes.RESET
    drive(loop, other.poll, "the other side to see the end")
    assert other.ended == "reset"


def test_idle_timeout_with_nothing_buffered_ends_with_fin(
        loop: EventLoop, net: Net, harness: Harness) -> None:
    listener = net.listener()
    session, client = harness.open(harness.route([address(listener)], IdleTimeout=0.2))
    target = net.accept(loop, listener)
    client.send_all(loop, b"once")
    drive(loop, lambda: target.has(b"once"), "a relayed byte")
    harness.wait_closed(session)
    assert session.end == outcomes.IDLE_TIMEOUT
    drive(loop, client.poll, "the client to see the end")
    assert client.ended == "eof"  # nothing was lost: a clean FIN
    drive(loop, target.poll, "the target to see the end")
    assert target.ended == "eof"


def fill_downstream(loop: EventLoop, session: Session[Any], target: Peer) -> None:
    """The target sends until the session's downstream buffer is full
    (the client does not read, so everything backs up into the proxy)."""
    def full() -> bool:
        try:
            target.sock.send(CHUNK)
        except BlockingIOError:
            pass
        relay = session.relay
        return relay is not None and relay.downstream.buffer.is_full()
    drive(loop, full, "the downstream buffer to fill")


@pytest.mark.parametrize("kind", KINDS)
def test_idle_timeout_that_drops_buffered_bytes_resets_the_client(
        loop: EventLoop, net: Net, harness: Harness, kind: type[Session[Any]]) -> None:
    """#18 defect 8: a FIN here would pass a truncated stream for a whole one."""
    listener = net.listener()
    session, client = harness.open(harness.route([address(listener)], IdleTimeout=0.3), kind)
    target = net.accept(loop, listener)
    fill_downstream(loop, session, target)
    harness.wait_closed(session)
    assert session.end == outcomes.IDLE_TIMEOUT
    drive(loop, client.poll, "the client to read to the end")
    assert client.ended == "reset"


def test_half_open_timeout_that_drops_buffered_bytes_resets_the_client(
        loop: EventLoop, net: Net, harness: Harness) -> None:
    harness.half_open_timeout_s = 0.3
    listener = net.listener()
    session, client = harness.open(harness.route([address(listener)]))
    target = net.accept(loop, listener)
    client.sock.shutdown(socket.SHUT_WR)
    drive(loop, target.poll, "the client's FIN at the target")
    fill_downstream(loop, session, target)
    harness.wait_closed(session)
    assert session.end == outcomes.HALF_OPEN_TIMEOUT
    drive(loop, client.poll, "the client to read to the end")
    assert client.ended == "reset"


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("first", ["client", "target"])
def test_a_fin_on_the_fast_path_starts_the_half_open_timeout(
        loop: EventLoop, net: Net, harness: Harness, kind: type[Session[Any]],
        first: str) -> None:
    # Bytes have crossed both ways first, so the pool has a spare and the
    # FIN is read by the movers' fused path, not the general one.
    harness.half_open_timeout_s = 0.3
    listener = net.listener()
    session, client = harness.open(harness.route([address(listener)]), kind)
    target = net.accept(loop, listener)
    client.send_all(loop, b"ping")
    drive(loop, lambda: target.has(b"ping"), "the ping at the target")
    target.send_all(loop, b"pong")
    drive(loop, lambda: client.has(b"pong"), "the pong at the client")
    early, late = (client, target) if first == "client" else (target, client)
    early.sock.shutdown(socket.SHUT_WR)
    drive(loop, late.poll, "the FIN to cross the proxy")
    assert late.ended == "eof" and session.state is State.RELAYING
    harness.wait_closed(session)  # the late side never ends its direction
    assert session.end == outcomes.HALF_OPEN_TIMEOUT
    drive(loop, early.poll, "the early side to see the end")
    assert early.ended == "eof"  # nothing was held: a clean FIN


# -- allocation failures ------------------------------------------------------------


class NoPipes(PipePool):
    """A pool at the descriptor limit: every pipe it is asked for fails."""

    __slots__ = ("asked",)

    def __init__(self, capacity: int) -> None:
        super().__init__(capacity)
        self.asked = 0

    def take(self) -> tuple[int, int]:
        self.asked += 1
        raise OSError(errno.EMFILE, "Too many open files")


class NoMemory(BufferPool):
    """A pool that cannot allocate a ring's storage."""

    __slots__ = ("asked",)

    def __init__(self, capacity: int) -> None:
        super().__init__(capacity)
        self.asked = 0

    def take(self) -> bytearray:
        self.asked += 1
        raise MemoryError()


@pytest.mark.parametrize("proxy_protocol", [None, "v1"])
@pytest.mark.parametrize("kind", KINDS)
def test_no_buffer_or_pipe_closes_the_session_cleanly(
        loop: EventLoop, net: Net, harness: Harness, kind: type[Session[Any]],
        proxy_protocol: Optional[str]) -> None:
    """#18 defect 2: with ProxyProtocol the header needs a pipe (or ring) at once;
    without, the first byte does."""
    pool: Any = NoPipes(BUFFER) if kind is SpliceSession else NoMemory(BUFFER)
    if kind is SpliceSession:
        harness.pipes = pool
    else:
        harness.pool = pool
    listener = net.listener()
    keys = {} if proxy_protocol is None else {"ProxyProtocol": proxy_protocol}
    before = loop.watched_count
    session, client = harness.open(harness.route([address(listener)], **keys), kind,
                                   early=b"data")
    target = net.accept(loop, listener)
    harness.wait_closed(session)
    assert pool.asked >= 1
    assert session.end == outcomes.NO_RESOURCES
    assert harness.shortages  # the server is told, so it can pause accepting
    assert loop.watched_count == before
    assert session.client.fileno() == -1
    drive(loop, client.poll, "the client to see the end")
    drive(loop, target.poll, "the target to see the end")
    assert target.data == b""  # not a byte, not even half a header


# -- the client leaving while a target is tried -------------------------------------


def test_a_client_reset_during_connect_abandons_the_connect(
        loop: EventLoop, net: Net, harness: Harness) -> None:
    route = harness.route([f"{HOST}:{net.blackhole()}"], ConnectTimeout=4.0)
    before = loop.watched_count
    session, client = harness.open(route)
    loop.run_once(max_wait_s=0)
    client.abort()
    harness.wait_closed(session, deadline_s=2.0)
    assert session.end == outcomes.CLIENT_GONE
    assert loop.watched_count == before
    assert route.balancer.healths()[0].consecutive_failures == 0  # not the target's fault


def test_a_client_that_half_closes_during_connect_still_gets_its_answer(
        loop: EventLoop, net: Net, harness: Harness) -> None:
    """A FIN is no reason to give up: `printf req | nc -N` waits for the reply."""
    listener = net.listener()
    harness.names["slow.test"] = [port_of(listener)]
    session, client = harness.open(harness.route([f"slow.test:{port_of(listener)}"]))
    client.send_all(loop, b"req")
    client.sock.shutdown(socket.SHUT_WR)  # before the name is even resolved
    target = net.accept(loop, listener)
    drive(loop, target.poll, "the request and FIN")
    assert (bytes(target.data), target.ended) == (b"req", "eof")
    target.send_all(loop, b"reply")
    target.sock.shutdown(socket.SHUT_WR)
    drive(loop, client.poll, "the reply")
    assert (bytes(client.data), client.ended) == (b"reply", "eof")
    harness.wait_closed(session)
    assert session.end == outcomes.DONE


# -- shortages of our own are not the target's fault (#18 defect 13) ----------------


def test_a_resolver_shortage_closes_without_charging_the_target(
        loop: EventLoop, net: Net, harness: Harness) -> None:
    def no_descriptors(*args: object, **kwargs: object) -> list[tuple[object, ...]]:
        raise OSError(errno.EMFILE, "Too many open files")

    harness.getaddrinfo = no_descriptors
    route = harness.route([f"svc.test:{port_of(net.listener())}"])
    session, client = harness.open(route)
    harness.wait_closed(session)
    assert session.end == outcomes.NO_RESOURCES  # not connect-failed
    assert harness.shortages  # the server pauses accepting
    assert all(h.consecutive_failures == 0 for h in route.balancer.healths())
    assert all(not stats.failures for stats in route.stats.targets.values())
    drive(loop, client.poll, "the client to see the end")
