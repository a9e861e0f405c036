"""A session's connection path costs what it must and no more (issue #17).

Two savings with a visible shape: one ``shutdown`` per connection (the
last direction to end is closed, and close's FIN says the same), and a
client that spoke first has its bytes read in the turn its target
connects, not one wake-up later.  What the peers see must not change:
every byte, then a FIN (never a reset).
"""

from __future__ import annotations

import socket
from typing import Any

import pytest

from rawproxy import netio, outcomes
from rawproxy.loop import EventLoop
from rawproxy.session import Session, State
from tests.unit.test_health import drive
from tests.unit.test_health import loop  # noqa: F401  (a pytest fixture, shared)
from tests.unit.test_session import KINDS, Harness, Net, address
from tests.unit.test_session import harness, net  # noqa: F401  (pytest fixtures)


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
