"""The fused fast path (rawproxy.movers) against the reference path, outcome by outcome.

Each session class has a reference twin here whose handlers are the
general code in ``session`` (``_pump`` over the ``relay`` rules), the fast
path switched off.  Hypothesis writes a script (who sends how much, who
half-closes, who stops reading) and a chaos schedule for the I/O calls
(``splice``, or ``recv_into``/``send``: would-block, or fewer bytes than
asked), and each script runs twice on real loopback sockets: once through
the production class, once through its twin, with the same schedule.

They must agree on everything: every I/O call the session made (which
side, how many bytes asked, what came of it), the bytes each peer got and
how its stream ended, how the session ended, and its byte counts, with
no buffer or pipe left held.  The reference must also be right: each peer
gets exactly what the other sent, in order.
"""

from __future__ import annotations

import errno
import os
import socket
import stat
from typing import Any, Callable, Iterator, Union

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from rawproxy import netio, outcomes
from rawproxy.loop import EventLoop
from rawproxy.movers import CopySession, SpliceSession
from rawproxy.pipes import splice_available
from rawproxy.session import Session, State
from tests.unit.test_health import drive
from tests.unit.test_health import loop  # noqa: F401  (a pytest fixture, shared)
from tests.unit.test_session import Harness, Net, address
from tests.unit.test_session import connect_path  # noqa: F401  (autouse: both connect paths)

SIDES = ("client", "target")
PATTERN = bytes(range(251)) * 400  # position-dependent bytes: a reordering shows


def pattern(offset: int, size: int) -> bytes:
    start = offset % 251
    return PATTERN[start:start + size]

NORMAL, WOULD_BLOCK, SHORT, RESET = 0, 1, 2, 3
IoLog = list[tuple[str, str, int, Union[int, str]]]


class ReferenceCopy(CopySession):
    """CopySession with the fast path off: the general code handles every event."""

    __slots__ = ()
    _on_client_events = Session._on_client_events
    _on_target_events = Session._on_target_events


class ReferenceSplice(SpliceSession):
    """SpliceSession with the fast path off."""

    __slots__ = ()
    _on_client_events = Session._on_client_events
    _on_target_events = Session._on_target_events


class Chaos:
    """The I/O schedule: call ``i`` (from 0) gets ``schedule[i]``, then all normal."""

    def __init__(self, schedule: list[tuple[int, int]]) -> None:
        self.schedule = schedule
        self.calls = 0
        self.log: IoLog = []

    def next(self) -> tuple[int, int]:
        index, self.calls = self.calls, self.calls + 1
        return self.schedule[index] if index < len(self.schedule) else (NORMAL, 0)

    def run(self, kind: str, role: str, asked: int, call: Callable[[int], int]) -> int:
        """Call ``call(count)`` as the schedule says, and log what came of it."""
        action, short = self.next()
        if action == WOULD_BLOCK:
            self.log.append((kind, role, asked, "would-block"))
            raise BlockingIOError(errno.EAGAIN, "chaos: would block")
        if action == RESET:
            self.log.append((kind, role, asked, "reset"))
            raise ConnectionResetError(errno.ECONNRESET, "chaos: reset")
        count = max(1, min(asked, short)) if action == SHORT else asked
        try:
            done = call(count)
        except OSError as exc:
            self.log.append((kind, role, asked, errno.errorcode.get(exc.errno or 0, "?")))
            raise
        self.log.append((kind, role, asked, done))
        return done


def chaos_socket(chaos: Chaos, role: str) -> type[socket.socket]:
    """A socket class whose recv_into/send go through ``chaos`` as ``role``."""

    class ChaosSocket(socket.socket):
        def recv_into(self, buffer: Any, nbytes: int = 0, flags: int = 0) -> int:
            asked = nbytes or len(buffer)
            return chaos.run("recv", role, asked,
                             lambda n: super(ChaosSocket, self).recv_into(buffer, n, flags))

        def send(self, data: Any, flags: int = 0) -> int:
            view = memoryview(data)
            return chaos.run("send", role, len(view),
                             lambda n: super(ChaosSocket, self).send(view[:n], flags))

    return ChaosSocket


def rewrap(sock: socket.socket, cls: type[socket.socket]) -> socket.socket:
    wrapped = cls(sock.family, sock.type, sock.proto, fileno=sock.detach())
    wrapped.setblocking(False)
    return wrapped


class Run:
    """One script through one session class; what it did and how it ended."""

    def __init__(self, harness: Harness, net: Net, loop: EventLoop,
                 kind: type[Session[Any]], chaos: Chaos,
                 monkeypatch: pytest.MonkeyPatch) -> None:
        self.loop = loop
        self.chaos = chaos
        listener = net.listener()
        route = harness.route([address(listener)])
        copy = issubclass(kind, CopySession)
        if copy:
            target_class = chaos_socket(chaos, "target")
            start_connect = netio.start_connect
            monkeypatch.setattr(netio, "start_connect",
                                lambda family, sockaddr: rewrap(start_connect(family, sockaddr),
                                                                target_class))
        else:
            monkeypatch.setattr(os, "splice", self._splice)  # movers calls os.splice
        client, accepted = net.client_pair()
        if copy:
            accepted = rewrap(accepted, chaos_socket(chaos, "client"))
        self.session = kind(harness.context(), route, accepted, "client", 5001)
        harness.opened.append(self.session)
        self.session.start()
        self.peers = {"client": client, "target": net.accept(loop, listener)}
        self.sent = {side: bytearray() for side in SIDES}
        self.finished = {side: False for side in SIDES}
        self.paused = {side: False for side in SIDES}

    def _role(self, fd: int) -> str:
        if stat.S_ISFIFO(os.fstat(fd).st_mode):
            return "pipe"
        return "client" if fd == self.session._client_fd else "target"

    def _splice(self, src: int, dst: int, count: int, *args: Any, **kwargs: Any) -> int:
        role = f"{self._role(src)}>{self._role(dst)}"
        return self.chaos.run("splice", role, count,
                              lambda n: os_splice(src, dst, n, *args, **kwargs))

    def _send(self, side: str, data: bytes) -> None:
        """All of ``data`` from ``side``; a paused reader resumes if it must."""
        view = memoryview(data)
        stalled = 0
        while view:
            try:
                view = view[self.peers[side].sock.send(view):]
                stalled = 0
            except (BrokenPipeError, ConnectionResetError):
                return  # the proxy reset the connection
            except BlockingIOError:
                stalled += 1
                if stalled > 50:
                    self.paused = {other: False for other in SIDES}
                self.turns(1)

    def turns(self, count: int = 4) -> None:
        for _ in range(count):
            self.loop.run_once(max_wait_s=0)
        for side in SIDES:
            if not self.paused[side]:
                self.peers[side].poll()

    def step(self, action: tuple[Any, ...]) -> None:
        verb, side = action[0], action[1]
        peer = self.peers[side]
        if verb == "send" and not self.finished[side]:
            data = pattern(len(self.sent[side]), action[2])
            self._send(side, data)
            self.sent[side] += data
        elif verb == "fin" and not self.finished[side]:
            try:
                peer.sock.shutdown(socket.SHUT_WR)
            except OSError:
                pass  # the proxy reset the connection already
            self.finished[side] = True
        elif verb == "pause":
            self.paused[side] = not self.paused[side]
        self.turns()

    def finish(self) -> dict[str, Any]:
        self.paused = {side: False for side in SIDES}
        for side in SIDES:
            if not self.finished[side]:
                self.step(("fin", side))

        def ended() -> bool:
            self.turns(1)
            return self.session.state is State.CLOSED and all(
                self.peers[side].ended for side in SIDES)

        drive(self.loop, ended, "the session to end and both peers to see it")
        relay = self.session.relay
        assert relay is not None
        assert relay.bytes_buffered() == 0
        assert not (relay.upstream.buffer.holds_storage or relay.downstream.buffer.holds_storage)
        return {"io": self.chaos.log, "end": self.session.end,
                "bytes": (self.session.bytes_from_client, self.session.bytes_from_target),
                "got": {side: bytes(self.peers[side].data) for side in SIDES},
                "ended": {side: self.peers[side].ended for side in SIDES}}


os_splice: Callable[..., int] = getattr(os, "splice", lambda *a, **k: 0)

steps = st.lists(st.one_of(
    st.tuples(st.just("send"), st.sampled_from(SIDES),
              st.sampled_from([1, 7, 100, 1500, 20000, 65536])),
    st.tuples(st.just("fin"), st.sampled_from(SIDES)),
    st.tuples(st.just("pause"), st.sampled_from(SIDES))), max_size=8)
schedules = st.lists(st.tuples(st.sampled_from([NORMAL, WOULD_BLOCK, SHORT, SHORT, RESET]),
                               st.sampled_from([1, 5, 99, 1000, 30000])), max_size=24)
# Each outcome of each call in the steady state's turn, at least once: the
# I/O calls run read-in, send-out, per event, client first (the first event
# goes the general way: the pool has no spare yet).
PING_PONG = [("send", "client", 100), ("send", "target", 100), ("send", "client", 100)]
OK = (NORMAL, 0)
MUST_TRY = [
    [OK, OK, OK, (SHORT, 10)],        # the fast path sends less than it read
    [OK, OK, OK, (WOULD_BLOCK, 0)],   # ... or nothing: the peer's buffer is full
    [OK, OK, OK, (RESET, 0)],         # ... or the peer is gone
    [OK, OK, (WOULD_BLOCK, 0)],       # a readable event with nothing to read
    [OK, OK, (RESET, 0)],             # reading fails
    [OK, OK, (SHORT, 1), OK, OK, OK],  # reads one byte of many
]


def must_try(test: Callable[..., None]) -> Callable[..., None]:
    for schedule in MUST_TRY:
        test = example(script=PING_PONG, schedule=schedule)(test)
    return test



@pytest.fixture
def runner(loop: EventLoop, monkeypatch: pytest.MonkeyPatch) -> Iterator[Callable[..., Any]]:
    """Runs one script through one class, each run with fresh sockets."""
    harnesses: list[tuple[Harness, Net]] = []

    def run(kind: type[Session[Any]], script: list[tuple[Any, ...]],
            schedule: list[tuple[int, int]]) -> dict[str, Any]:
        net = Net()
        harness = Harness(loop, net)
        harnesses.append((harness, net))
        with monkeypatch.context() as patch:
            one = Run(harness, net, loop, kind, Chaos(schedule), patch)
            for action in script:
                one.step(action)
            outcome = one.finish()
            outcome["sent"] = {side: bytes(one.sent[side]) for side in SIDES}
        return outcome

    yield run
    for harness, net in harnesses:
        for session in harness.opened:
            session.close(outcomes.SHUTDOWN, reset=True)
        harness.resolver.close()
        net.close()


def check(fast: dict[str, Any], reference: dict[str, Any]) -> None:
    if any(outcome == "reset" for _, _, _, outcome in reference["io"]):
        assert reference["end"] == outcomes.RESET
    else:
        assert reference["got"]["target"] == reference["sent"]["client"]
        assert reference["got"]["client"] == reference["sent"]["target"]
        assert reference["end"] == outcomes.DONE
    for key in ("io", "end", "bytes", "got", "ended", "sent"):
        assert fast[key] == reference[key], f"the fast path differs in {key!r}"


@settings(max_examples=30, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(script=steps, schedule=schedules)
@must_try
def test_copy_fast_path_does_what_the_reference_does(
        runner: Callable[..., Any], script: list[tuple[Any, ...]],
        schedule: list[tuple[int, int]]) -> None:
    check(runner(CopySession, script, schedule), runner(ReferenceCopy, script, schedule))


@pytest.mark.skipif(not splice_available(), reason="splice(2) is Linux-only")
@settings(max_examples=30, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(script=steps, schedule=schedules)
@must_try
def test_splice_fast_path_does_what_the_reference_does(
        runner: Callable[..., Any], script: list[tuple[Any, ...]],
        schedule: list[tuple[int, int]]) -> None:
    check(runner(SpliceSession, script, schedule), runner(ReferenceSplice, script, schedule))


@pytest.mark.parametrize("kind", [CopySession, pytest.param(SpliceSession, marks=pytest.mark.skipif(
    not splice_available(), reason="splice(2) is Linux-only"))])
def test_the_fast_path_takes_the_steady_turns(runner: Callable[..., Any],
                                              kind: type[Session[Any]],
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    # Not vacuous: in the steady state the general code is not entered.
    general: list[int] = []
    pump = Session._pump

    def counting_pump(self: Session[Any], *args: Any) -> None:
        general.append(1)
        pump(self, *args)

    monkeypatch.setattr(Session, "_pump", counting_pump)
    script = [("send", "client", 100), ("send", "target", 100)] * 5
    outcome = runner(kind, script, [])
    assert outcome["got"]["target"] == pattern(0, 500)
    # Only the first read goes the general way (the pool has no spare yet):
    # the FINs, the half-open turns and the closing hang-up are fast too.
    assert len(general) <= 1, f"{len(general)} turns took the general path"
