"""Unit tests for rawproxy.health: active TCP checks on a real EventLoop.

Targets are IP literals on 127.0.0.1 (the resolver answers them without a
thread or a lookup): a listening socket stands for a target that is up, a
bound socket that does not listen for one that refuses.  The loop is driven
with ``run_once`` until a condition holds, with a deadline; nothing sleeps.
"""

from __future__ import annotations

import errno
import json
import random
import socket
import time
from typing import Callable, Iterator

import pytest

from rawproxy.config import Config, Target, parse_config
from rawproxy.health import HealthChecks
from rawproxy.loop import EventLoop
from rawproxy.resolver import Resolver
from rawproxy.router import Balancer, Router
from tests.support import Blackhole

HOST = "127.0.0.1"
DEADLINE_S = 5.0


def drive(loop: EventLoop, condition: Callable[[], bool], what: str,
          deadline_s: float = DEADLINE_S) -> None:
    """Turn the loop until ``condition()`` holds, or fail after ``deadline_s``."""
    deadline = time.monotonic() + deadline_s
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {deadline_s}s waiting for {what}")
        loop.run_once(max_wait_s=0.01)


def make_config(ports: list[int], interval_s: float = 0.1, timeout_s: float = 2.0) -> Config:
    document = {"Apps": [{
        "Name": "web", "Ports": [5001],
        "Targets": [f"{HOST}:{port}" for port in ports],
        "HealthCheck": {"Interval": interval_s, "Timeout": timeout_s},
    }]}
    return parse_config(json.dumps(document), "test.json")


class Sockets:
    """Loopback sockets that are closed when the test ends."""

    def __init__(self) -> None:
        self.opened: list[socket.socket] = []

    def bound(self) -> socket.socket:
        """Bound to a fresh port and not listening: connects are refused."""
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.opened.append(sock)
        sock.bind((HOST, 0))
        return sock

    def listening(self) -> socket.socket:
        sock = self.bound()
        sock.listen(16)
        sock.setblocking(False)
        return sock


def port_of(sock: socket.socket) -> int:
    port: int = sock.getsockname()[1]
    return port


@pytest.fixture
def sockets() -> Iterator[Sockets]:
    holder = Sockets()
    yield holder
    for sock in holder.opened:
        sock.close()


@pytest.fixture
def loop() -> Iterator[EventLoop]:
    event_loop = EventLoop()
    yield event_loop
    event_loop.close()


@pytest.fixture
def checks(loop: EventLoop) -> Iterator[HealthChecks]:
    resolver = Resolver(loop.call_soon_threadsafe)
    health_checks = HealthChecks(loop, resolver)
    yield health_checks
    health_checks.stop()
    resolver.close()


def targets_of(router: Router) -> tuple[Balancer, Target, Target]:
    balancer = router.routes["web"].balancer
    up, down = balancer.targets
    return balancer, up, down


def test_listening_target_is_marked_up_and_closed_port_down(
        loop: EventLoop, checks: HealthChecks, sockets: Sockets) -> None:
    listener, refuser = sockets.listening(), sockets.bound()
    router = Router(make_config([port_of(listener), port_of(refuser)]), random.Random(1))
    balancer, up, down = targets_of(router)
    balancer.record_check(up, False, "stale")  # so that "up" must be earned
    checks.start(router)
    drive(loop, lambda: not balancer.health(up).check_failed
          and balancer.health(down).check_failed, "both verdicts")
    assert balancer.health(down).last_failure == "refused"
    assert balancer.health(down).is_down(loop.now + 3600)
    assert balancer.acquire(loop.now) == up


def test_checks_repeat_every_interval(
        loop: EventLoop, checks: HealthChecks, sockets: Sockets) -> None:
    listener, refuser = sockets.listening(), sockets.bound()
    router = Router(make_config([port_of(listener), port_of(refuser)]), random.Random(1))
    checks.start(router)
    accepted: list[socket.socket] = []

    def accept_all() -> bool:
        while True:
            try:
                conn, _ = listener.accept()
            except BlockingIOError:
                return len(accepted) >= 3
            accepted.append(conn)
            conn.close()

    drive(loop, accept_all, "three checks of the listening target")


def test_a_target_that_starts_listening_comes_back_up(
        loop: EventLoop, checks: HealthChecks, sockets: Sockets) -> None:
    listener, later = sockets.listening(), sockets.bound()
    router = Router(make_config([port_of(listener), port_of(later)]), random.Random(1))
    balancer, _, target = targets_of(router)
    checks.start(router)
    drive(loop, lambda: balancer.health(target).check_failed, "the target to be marked down")
    later.listen(16)
    drive(loop, lambda: not balancer.health(target).check_failed,
          "the next check to mark it up")
    assert not balancer.health(target).is_down(loop.now)


def test_a_target_that_stops_listening_goes_down(
        loop: EventLoop, checks: HealthChecks, sockets: Sockets) -> None:
    listener, other = sockets.listening(), sockets.listening()
    router = Router(make_config([port_of(listener), port_of(other)]), random.Random(1))
    balancer, target, _ = targets_of(router)
    checks.start(router)
    accepted: list[socket.socket] = []

    def checked_once() -> bool:
        try:
            conn, _ = listener.accept()
        except BlockingIOError:
            return False
        accepted.append(conn)
        conn.close()
        return True

    drive(loop, checked_once, "a first check")
    assert not balancer.health(target).check_failed
    listener.close()  # the port now refuses
    drive(loop, lambda: balancer.health(target).check_failed, "the target to be marked down")
    assert balancer.health(target).last_failure == "refused"


def test_start_moves_the_checks_to_the_new_router(
        loop: EventLoop, checks: HealthChecks, sockets: Sockets) -> None:
    listener, refuser = sockets.listening(), sockets.bound()
    config = make_config([port_of(listener), port_of(refuser)])
    first = Router(config, random.Random(1))
    checks.start(first)
    drive(loop, lambda: targets_of(first)[0].health(targets_of(first)[2]).check_failed,
          "the first router's verdict")
    second = Router(config, random.Random(2))  # no previous: starts all up
    checks.start(second)
    balancer, _, down = targets_of(second)
    assert not balancer.health(down).check_failed
    drive(loop, lambda: balancer.health(down).check_failed, "the second router's verdict")


def test_apps_without_a_health_check_are_not_checked(
        loop: EventLoop, checks: HealthChecks, sockets: Sockets) -> None:
    refuser = sockets.bound()
    document = {"Apps": [{"Name": "web", "Ports": [5001],
                          "Targets": [f"{HOST}:{port_of(refuser)}"]}]}
    router = Router(parse_config(json.dumps(document), "test.json"), random.Random(1))
    before = loop.watched_count
    checks.start(router)
    loop.run_once(max_wait_s=0)
    assert loop.watched_count == before  # no check socket was opened
    assert not router.routes["web"].balancer.healths()[0].check_failed


def test_stop_closes_checks_in_flight(
        loop: EventLoop, checks: HealthChecks, sockets: Sockets) -> None:
    listener, other = sockets.listening(), sockets.listening()
    router = Router(make_config([port_of(listener), port_of(other)]), random.Random(1))
    balancer, target, _ = targets_of(router)
    balancer.record_check(target, False, "stale")
    before = loop.watched_count
    checks.start(router)
    # A non-blocking connect is still in progress until the loop turns.
    assert loop.watched_count == before + 2
    checks.stop()
    assert loop.watched_count == before  # sockets unwatched (and closed)
    loop.run_once(max_wait_s=0)
    assert balancer.health(target).check_failed  # an abandoned check gives no verdict


def test_a_shortage_of_our_own_gives_no_verdict(loop: EventLoop, sockets: Sockets) -> None:
    """No descriptor for the lookup (#18 defect 13): the target is not marked down."""
    lookups: list[str] = []

    def no_descriptors(host: str, *args: object, **kwargs: object) -> list[tuple[object, ...]]:
        lookups.append(host)
        raise OSError(errno.EMFILE, "Too many open files")

    resolver = Resolver(loop.call_soon_threadsafe, getaddrinfo=no_descriptors)
    health_checks = HealthChecks(loop, resolver)
    document = {"Apps": [{"Name": "web", "Ports": [5001],
                          "Targets": [f"svc.test:{port_of(sockets.listening())}"],
                          "HealthCheck": {"Interval": 0.1, "Timeout": 2.0}}]}
    router = Router(parse_config(json.dumps(document), "test.json"), random.Random(1))
    try:
        health_checks.start(router)
        first = health_checks._checks[0]
        # Done well within its Timeout, and asked again next round (not cached).
        drive(loop, lambda: first.done and len(lookups) >= 2, "two rounds of lookups")
    finally:
        health_checks.stop()
        resolver.close()
    assert not router.routes["web"].balancer.healths()[0].check_failed


def test_a_check_still_in_flight_is_not_started_again(
        loop: EventLoop, checks: HealthChecks) -> None:
    """Timeout > Interval: checks of a black hole must not pile up (one per target)."""
    hole = Blackhole()
    try:
        router = Router(make_config([hole.port], interval_s=0.1, timeout_s=5.0),
                        random.Random(1))
        checks.start(router)
        until = loop.now + 0.6  # six intervals
        in_flight: list[int] = []

        def rounds_done() -> bool:
            in_flight.append(sum(1 for c in checks._checks if not c.done))
            return loop.now >= until

        drive(loop, rounds_done, "six intervals")
        assert max(in_flight) == 1, f"checks piled up: {max(in_flight)} in flight"
    finally:
        checks.stop()
        hole.close()
