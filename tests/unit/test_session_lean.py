"""A session's connection path costs what it must and no more (issue #17).

Three savings with a visible shape: one ``shutdown`` per connection (the
last direction to end is closed, and close's FIN says the same); a
client that spoke first has its bytes read in the turn its target
connects, not one wake-up later; and a loopback target whose handshake
was over when ``connect()`` returned is relayed to at once, each socket
registered once with its mask.  What the peers see must not change:
every byte, then a FIN (never a reset).
"""

from __future__ import annotations

import socket
from typing import Any

import pytest

from rawproxy import netio, outcomes
from rawproxy.loop import EVENT_READ, EVENT_WRITE, EventLoop
from rawproxy.pollers import EpollPoller
from rawproxy.session import Session, State
from tests.unit.test_health import drive
from tests.unit.test_health import loop  # noqa: F401  (a pytest fixture, shared)
from tests.unit.test_session import KINDS, Harness, Net, address
from tests.unit.test_session import connect_path, harness, net  # noqa: F401  (fixtures)


def counted_shutdowns(monkeypatch: pytest.MonkeyPatch) -> list[socket.socket]:
    calls: list[socket.socket] = []
    shutdown = netio.shutdown_write

    def counting(sock: socket.socket) -> None:
        calls.append(sock)
        shutdown(sock)

    monkeypatch.setattr(netio, "shutdown_write", counting)
    return calls


@pytest.mark.parametrize("target_first", [False, True])
@pytest.mark.parametrize("kind", KINDS)
def test_one_shutdown_per_connection_and_both_peers_see_a_fin(
        loop: EventLoop, net: Net, harness: Harness, kind: type[Session[Any]],
        target_first: bool, monkeypatch: pytest.MonkeyPatch) -> None:
    shutdowns = counted_shutdowns(monkeypatch)
    listener = net.listener()
    session, client = harness.open(harness.route([address(listener)]), kind)
    target = net.accept(loop, listener)
    first, second = (target, client) if target_first else (client, target)
    first.sock.sendall(b"question")
    first.sock.shutdown(socket.SHUT_WR)
    drive(loop, lambda: second.has(b"question") and second.ended == "eof",
          "the bytes, then the FIN, through")
    assert len(shutdowns) == 1, "the first direction to end is half-closed"
    second.sock.sendall(b"answer")
    second.sock.shutdown(socket.SHUT_WR)
    drive(loop, lambda: first.has(b"answer") and first.ended == "eof",
          "the answer, then a FIN (not a reset)")
    harness.wait_closed(session)
    assert session.end == outcomes.DONE and session.state is State.CLOSED
    assert len(shutdowns) == 1, "the last direction is closed, not shut down first"


@pytest.mark.parametrize("kind", KINDS)
def test_a_client_that_spoke_first_is_read_in_the_connect_turn(
        loop: EventLoop, net: Net, harness: Harness, kind: type[Session[Any]]) -> None:
    listener = net.listener()
    session, _ = harness.open(harness.route([address(listener)]), kind, early=b"hello")
    target = net.accept(loop, listener)  # the kernel completed the handshake already
    drive(loop, lambda: session.relay is not None, "the target to connect")
    # No further turn: the bytes went out in the turn that saw the connect.
    assert target.has(b"hello")


def recorded_registrations(monkeypatch: pytest.MonkeyPatch) -> list[tuple[int, str, int]]:
    """Each epoll registration or change as (fd, what, mask): one epoll_ctl each."""
    calls: list[tuple[int, str, int]] = []
    change, watch_errors = EpollPoller.change, EpollPoller.watch_errors

    def changing(self: EpollPoller, fd: int, old: int, mask: int) -> None:
        calls.append((fd, "mask", mask))
        change(self, fd, old, mask)

    def watching_errors(self: EpollPoller, fd: int) -> None:
        calls.append((fd, "errors", 0))
        watch_errors(self, fd)

    monkeypatch.setattr(EpollPoller, "change", changing)
    monkeypatch.setattr(EpollPoller, "watch_errors", watching_errors)
    return calls


@pytest.mark.parametrize("kind", KINDS)
def test_a_loopback_target_connected_at_once_is_relayed_to_before_any_turn(
        loop: EventLoop, net: Net, harness: Harness, kind: type[Session[Any]],
        connect_path: str, monkeypatch: pytest.MonkeyPatch) -> None:
    registrations = recorded_registrations(monkeypatch)
    listener = net.listener()
    session, client = harness.open(harness.route([address(listener)]), kind, early=b"hello")
    client_fd, target_fd = session.client.fileno(), session._target_fd
    if connect_path == "at-once":
        assert session.state is State.RELAYING, "relaying with no turn of the loop"
        assert registrations == [(client_fd, "mask", EVENT_READ), (target_fd, "mask", EVENT_READ)]
        table = session._ctx.connect_timeouts.for_budget(session.route.app.connect_timeout_s)
        assert len(table) == 0, "no connect timeout armed"
    else:  # the way of a remote target: errors only, then write readiness
        assert session.state is State.CONNECTING
        connecting_fd = registrations[0][0]
        assert registrations == [(connecting_fd, "mask", EVENT_WRITE), (client_fd, "errors", 0)]
    target = net.accept(loop, listener)
    drive(loop, lambda: target.has(b"hello"), "the early bytes at the target")
    target.sock.sendall(b"world")
    drive(loop, lambda: client.has(b"world"), "the answer at the client")
    assert session.state is State.RELAYING
