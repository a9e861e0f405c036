"""Unit tests for rawproxy.connect: one Connector on a real EventLoop.

The targets are loopback sockets (listening, refusing, or a full accept
queue that drops SYNs); names go through a Resolver whose getaddrinfo is
a table (see test_session), so nothing leaves the machine.
"""

from __future__ import annotations

import errno
import select
import selectors
import socket
import time
from typing import Iterator, Optional

import pytest

from rawproxy import netio, outcomes
from rawproxy.connect import ADDRESS_FLOOR_S, ConnectTimeouts, Connector, address_share
from rawproxy.loop import EVENT_WRITE, EventLoop
from rawproxy.resolver import Resolution, Resolver
from rawproxy.timeouts import Timeouts
from tests.unit.test_health import drive, loop, port_of  # noqa: F401  (loop: a fixture)
from tests.unit.test_session import HOST, Net, net, table  # noqa: F401  (net: a fixture)


class Report:
    """What a connector said: at most once."""

    def __init__(self) -> None:
        self.sock: Optional[socket.socket] = None
        self.failure: Optional[tuple[str, str]] = None
        self.calls = 0

    def connected(self, sock: socket.socket) -> None:
        self.calls += 1
        self.sock = sock

    def failed(self, reason: str, detail: str) -> None:
        self.calls += 1
        self.failure = (reason, detail)

    def done(self) -> bool:
        return self.calls > 0


class Names:
    def __init__(self, loop: EventLoop) -> None:
        self.names: dict[str, list[int]] = {}
        self.resolver = Resolver(loop.call_soon_threadsafe, getaddrinfo=table(self.names))


@pytest.fixture
def names(loop: EventLoop) -> Iterator[Names]:
    holder = Names(loop)
    yield holder
    holder.resolver.close()


def connect(loop: EventLoop, names: Names, host: str, port: int, budget_s: float = 2.0,
            timeouts: Optional[Timeouts[Connector]] = None,
            at_once: bool = False) -> tuple[Connector, Report]:
    report = Report()
    connector = Connector(loop, names.resolver, host, port, budget_s,
                          report.connected, report.failed, timeouts=timeouts, at_once=at_once)
    connector.start()
    return connector, report


def test_address_share_splits_what_is_left_with_a_floor() -> None:
    assert address_share(3.0, 1) == 3.0       # one address: the whole budget
    assert address_share(3.0, 2) == 1.5
    assert address_share(1.0, 10) == ADDRESS_FLOOR_S  # never a uselessly short try
    assert address_share(0.1, 10) == 0.1      # ... but never past the budget
    assert address_share(0.0, 2) == 0.0
    assert address_share(-1.0, 2) == 0.0


def test_connects_and_hands_over_an_unwatched_socket(
        loop: EventLoop, net: Net, names: Names) -> None:
    listener = net.listener()
    before = loop.watched_count
    connector, report = connect(loop, names, HOST, port_of(listener))
    drive(loop, report.done, "a report")
    assert report.sock is not None and report.calls == 1
    net.keep(report.sock)
    assert report.sock.getpeername()[1] == port_of(listener)
    assert connector.done and loop.watched_count == before
    assert loop.time() - connector.started_at < 2.0


@pytest.mark.parametrize("host", [HOST, "loop.test"])  # a literal, a name for 127.0.0.1
def test_at_once_an_established_loopback_connect_is_reported_from_start(
        loop: EventLoop, net: Net, names: Names, host: str) -> None:
    listener = net.listener()
    names.names["loop.test"] = [port_of(listener)]
    if host != HOST:  # a name is looked up in a thread: once cached, it is at once
        answers: list[Resolution] = []
        assert names.resolver.resolve(host, port_of(listener), answers.append) is None
        drive(loop, lambda: bool(answers), "the name's lookup")
    table = ConnectTimeouts(loop).for_budget(2.0)
    before = loop.watched_count
    connector, report = connect(loop, names, host, port_of(listener), timeouts=table,
                                at_once=True)
    assert report.sock is not None and report.calls == 1, "no turn of the loop needed"
    net.keep(report.sock)
    assert report.sock.getpeername()[1] == port_of(listener)
    assert connector.done and loop.watched_count == before, "never watched"
    assert len(table) == 0, "no timeout armed"


def test_at_once_a_connect_still_under_way_waits_for_its_event(
        loop: EventLoop, net: Net, names: Names) -> None:
    table = ConnectTimeouts(loop).for_budget(0.3)
    before = loop.watched_count
    connector, report = connect(loop, names, HOST, net.blackhole(), 0.3, timeouts=table,
                                at_once=True)
    assert not report.done() and loop.watched_count == before + 1 and len(table) == 1
    drive(loop, report.done, "a report")
    assert report.failure is not None and report.failure[0] == outcomes.TIMEOUT


def test_at_once_asks_only_for_addresses_on_this_host(
        loop: EventLoop, net: Net, names: Names, monkeypatch: pytest.MonkeyPatch) -> None:
    asked: list[socket.socket] = []

    def established(sock: socket.socket) -> bool:
        asked.append(sock)
        return True

    monkeypatch.setattr(netio, "established", established)
    listener = net.listener()
    resolution = names.resolver.resolve(HOST, port_of(listener), lambda _: None)
    assert resolution is not None and resolution.loopback
    resolution.loopback = False  # as for a remote address, without sending it anything
    connector, report = connect(loop, names, HOST, port_of(listener), at_once=True)
    assert asked == [] and not report.done(), "waits for write readiness"
    drive(loop, report.done, "a report")
    assert report.sock is not None
    net.keep(report.sock)
    resolution.loopback = True
    _, report = connect(loop, names, HOST, port_of(listener))  # at_once off
    assert asked == [] and not report.done()
    drive(loop, report.done, "a report")
    assert report.sock is not None
    net.keep(report.sock)


def test_at_once_after_an_address_that_failed_later_leaves_no_timer_behind(
        loop: EventLoop, net: Net, names: Names, monkeypatch: pytest.MonkeyPatch) -> None:
    first, second = net.listener(), net.listener()
    names.names["two.test"] = [port_of(first), port_of(second)]
    answers: list[Resolution] = []
    names.resolver.resolve("two.test", 1, answers.append)
    drive(loop, lambda: bool(answers), "the name's lookup")
    real_established = netio.established
    asked: list[socket.socket] = []

    def established(sock: socket.socket) -> bool:  # the first not yet: a timer is set
        asked.append(sock)
        return len(asked) > 1 and real_established(sock)

    def refused_late(sock: socket.socket) -> bool:
        raise netio.ConnectFailed(outcomes.REFUSED)

    monkeypatch.setattr(netio, "established", established)
    monkeypatch.setattr(netio, "finish_connect", refused_late)
    monkeypatch.setattr(loop, "exact_write_events", False)  # so the event is asked
    heap_before = len(loop._timers)
    connector, report = connect(loop, names, "two.test", 1, at_once=True)
    assert len(loop._timers) == heap_before + 1, "the first address's share is timed"
    drive(loop, report.done, "a report")
    assert report.sock is not None and len(asked) == 2
    net.keep(report.sock)
    assert report.sock.getpeername()[1] == port_of(second)
    assert heap_before == 0 and all(entry[2].cancelled for entry in loop._timers)


def test_refused_everywhere_reports_refused(loop: EventLoop, net: Net, names: Names) -> None:
    names.names["two.test"] = [port_of(net.refuser()), port_of(net.refuser())]
    _, report = connect(loop, names, "two.test", 1)
    drive(loop, report.done, "a report")
    assert report.failure is not None and report.failure[0] == outcomes.REFUSED


def test_an_unknown_name_reports_dns(loop: EventLoop, names: Names) -> None:
    _, report = connect(loop, names, "nowhere.test", 80)
    drive(loop, report.done, "a report")
    assert report.failure is not None
    assert report.failure[0] == outcomes.DNS and "nowhere.test" in report.failure[1]


def test_a_first_address_that_drops_syns_leaves_time_for_the_second(
        loop: EventLoop, net: Net, names: Names) -> None:
    listener = net.listener()
    names.names["svc.test"] = [net.blackhole(), port_of(listener)]
    started = time.monotonic()
    _, report = connect(loop, names, "svc.test", 1, budget_s=2.0)
    drive(loop, report.done, "a report")
    assert report.sock is not None, report.failure
    net.keep(report.sock)
    assert report.sock.getpeername()[1] == port_of(listener)
    assert time.monotonic() - started < 2.0


def test_a_silent_address_times_out_within_the_budget(
        loop: EventLoop, net: Net, names: Names) -> None:
    before = loop.watched_count
    started = time.monotonic()
    _, report = connect(loop, names, HOST, net.blackhole(), budget_s=0.3)
    drive(loop, report.done, "a report")
    assert report.failure is not None and report.failure[0] == outcomes.TIMEOUT
    assert 0.25 <= time.monotonic() - started < 2.0
    assert loop.watched_count == before  # its socket is closed


def test_in_a_timeout_table_a_silent_address_times_out_within_the_budget(
        loop: EventLoop, net: Net, names: Names) -> None:
    table = ConnectTimeouts(loop).for_budget(0.3)
    heap_before = len(loop._timers)
    started = time.monotonic()
    connector, report = connect(loop, names, HOST, net.blackhole(), 0.3, timeouts=table)
    assert connector in table and len(loop._timers) == heap_before + 1  # the table's one
    drive(loop, report.done, "a report")
    assert report.failure is not None and report.failure[0] == outcomes.TIMEOUT
    assert 0.25 <= time.monotonic() - started < 2.0
    assert connector not in table


def test_in_a_timeout_table_a_connect_that_ends_leaves_it(
        loop: EventLoop, net: Net, names: Names) -> None:
    table = ConnectTimeouts(loop).for_budget(2.0)
    _, report = connect(loop, names, HOST, port_of(net.listener()), timeouts=table)
    drive(loop, report.done, "a report")
    assert report.sock is not None
    net.keep(report.sock)
    assert len(table) == 0
    cancelled, _ = connect(loop, names, HOST, net.blackhole(), timeouts=table)
    assert cancelled in table
    cancelled.cancel()
    assert len(table) == 0


def test_a_name_of_two_addresses_is_timed_by_the_loop_not_the_table(
        loop: EventLoop, net: Net, names: Names) -> None:
    table = ConnectTimeouts(loop).for_budget(2.0)
    listener = net.listener()
    names.names["two.test"] = [net.blackhole(), port_of(listener)]
    resolved: list[object] = []
    names.resolver.resolve("two.test", 1, resolved.append)  # cached: no wait before
    drive(loop, lambda: bool(resolved), "the name resolved")
    before = loop.watched_count
    connector, report = connect(loop, names, "two.test", 1, timeouts=table)
    drive(loop, lambda: loop.watched_count > before, "the first address tried")
    assert connector not in table and not report.done()
    drive(loop, report.done, "a report")
    assert report.sock is not None, report.failure
    net.keep(report.sock)
    assert report.sock.getpeername()[1] == port_of(listener)
    assert len(table) == 0  # each address had its share, on the loop's heap


def test_a_connector_built_outside_a_turn_still_gets_its_whole_budget(
        loop: EventLoop, net: Net, names: Names) -> None:
    # Health checks start before the loop runs: the turn's time (now) is
    # then as old as the loop.  The budget runs from the clock, not from it.
    loop.now -= 10.0
    names.names["silent.test"] = [net.blackhole()]
    started = time.monotonic()
    _, report = connect(loop, names, "silent.test", 1, budget_s=0.5)  # resolved later
    drive(loop, report.done, "a report")
    assert report.failure is not None and report.failure[0] == outcomes.TIMEOUT
    assert time.monotonic() - started >= 0.45


def test_cancel_closes_the_attempt_and_reports_nothing(
        loop: EventLoop, net: Net, names: Names) -> None:
    before = loop.watched_count
    connector, report = connect(loop, names, HOST, net.blackhole(), budget_s=0.2)
    assert loop.watched_count == before + 1
    connector.cancel()
    assert loop.watched_count == before and connector.done
    deadline = time.monotonic() + 0.5  # past the budget: a live timer would have fired
    while time.monotonic() < deadline:
        loop.run_once(max_wait_s=0.05)
    assert report.calls == 0


def test_our_own_shortage_is_reported_as_no_resources(
        loop: EventLoop, names: Names) -> None:
    def no_descriptors(*args: object, **kwargs: object) -> list[tuple[object, ...]]:
        raise OSError(errno.EMFILE, "Too many open files")

    names.resolver = Resolver(loop.call_soon_threadsafe, getaddrinfo=no_descriptors)
    try:
        _, report = connect(loop, names, "any.test", 80)
        drive(loop, report.done, "a report")
    finally:
        names.resolver.close()
    assert report.failure is not None and report.failure[0] == outcomes.NO_RESOURCES


def test_kept_watched_the_socket_is_handed_over_with_its_write_interest(
        loop: EventLoop, net: Net, names: Names) -> None:
    # A session takes it over with one interest change, not an unwatch and a
    # fresh watch: the loop still has it, write interest and all.
    listener = net.listener()
    report = Report()
    connector = Connector(loop, names.resolver, HOST, port_of(listener), 2.0,
                          report.connected, report.failed, keep_watched=True)
    connector.start()
    drive(loop, report.done, "a report")
    assert report.sock is not None
    net.keep(report.sock)
    fd = report.sock.fileno()
    assert loop.is_watched(fd) and loop.interest(fd) == EVENT_WRITE
    events: list[int] = []
    loop.replace_handler(fd, events.append)
    loop.run_once(max_wait_s=1.0)
    assert events == [EVENT_WRITE], "the new handler gets the events"
    loop.unwatch(fd)


def ask_counter(monkeypatch: pytest.MonkeyPatch) -> list[socket.socket]:
    """The sockets netio.finish_connect is asked about, from now on."""
    asked: list[socket.socket] = []
    finish = netio.finish_connect

    def counted(sock: socket.socket) -> bool:
        asked.append(sock)
        return finish(sock)

    monkeypatch.setattr(netio, "finish_connect", counted)
    return asked


@pytest.mark.skipif(not hasattr(select, "epoll"), reason="exact write events are epoll's")
def test_the_first_event_settles_the_connect_without_asking_the_socket(
        loop: EventLoop, net: Net, names: Names, monkeypatch: pytest.MonkeyPatch) -> None:
    asked = ask_counter(monkeypatch)
    assert loop.exact_write_events
    _, report = connect(loop, names, HOST, port_of(net.listener()))
    drive(loop, report.done, "a report")
    assert report.sock is not None and asked == []
    net.keep(report.sock)
    _, refused = connect(loop, names, HOST, port_of(net.refuser()))
    drive(loop, refused.done, "a report")
    # Refused at once by loopback, or by the first event: an error comes
    # with more than the write bit, and the socket is asked why.
    assert refused.failure is not None and refused.failure[0] == outcomes.REFUSED


def test_where_events_are_not_exact_the_socket_is_asked(
        net: Net, names: Names, monkeypatch: pytest.MonkeyPatch) -> None:
    loop = EventLoop(selector=selectors.SelectSelector())
    try:
        assert not loop.exact_write_events
        asked = ask_counter(monkeypatch)
        resolver = Resolver(loop.call_soon_threadsafe, getaddrinfo=table(names.names))
        report = Report()
        Connector(loop, resolver, HOST, port_of(net.listener()), 2.0,
                  report.connected, report.failed).start()
        drive(loop, report.done, "a report")
        assert report.sock is not None and len(asked) == 1
        net.keep(report.sock)
        resolver.close()
    finally:
        loop.close()


class Hanging:
    """getaddrinfo where names starting "dead" hang until released; others answer."""

    def __init__(self) -> None:
        import threading
        self.release = threading.Event()
        self.started: list[str] = []

    def __call__(self, host: str, port: int, *args: object,
                 **kwargs: object) -> list[tuple[object, ...]]:
        self.started.append(host)
        if host.startswith("dead"):
            self.release.wait(30)
            raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")
        return [(socket.AF_INET, socket.SOCK_STREAM, 6, "", (HOST, port))]


@pytest.fixture
def hanging(loop: EventLoop) -> Iterator[tuple[Hanging, Resolver]]:
    gai = Hanging()
    resolver = Resolver(loop.call_soon_threadsafe, getaddrinfo=gai, workers=2)
    yield gai, resolver
    gai.release.set()
    resolver.close()


def test_a_lookup_still_queued_when_time_runs_out_is_our_shortage(
        loop: EventLoop, hanging: tuple[Hanging, Resolver]) -> None:
    """Two hanging names hold both resolver threads: a healthy name queued
    behind them is not charged a timeout (#M defect 3); a name whose own
    lookup is under way when its time runs out is."""
    gai, resolver = hanging
    holders = [Connector(loop, resolver, host, 80, 60.0, Report().connected, Report().failed)
               for host in ("dead1.test", "dead2.test")]
    for holder in holders:
        holder.start()
    # Both threads busy before the short budgets start: under load a thread
    # may be scheduled late, and a late one would make this race.
    drive(loop, lambda: len(gai.started) == 2, "both lookups under way")
    queued, running = Report(), Report()
    Connector(loop, resolver, "good.test", 80, 0.3, queued.connected, queued.failed).start()
    Connector(loop, resolver, "dead1.test", 80, 0.3, running.connected, running.failed).start()
    drive(loop, lambda: queued.done() and running.done(), "two reports")
    assert sorted(gai.started) == ["dead1.test", "dead2.test"]
    assert resolver.is_started("dead1.test", 80)
    assert not resolver.is_started("good.test", 80)
    assert queued.failure is not None and queued.failure[0] == outcomes.NO_RESOURCES
    assert running.failure is not None and running.failure[0] == outcomes.TIMEOUT
    for holder in holders:
        holder.cancel()


def test_a_connector_that_gave_up_withdraws_its_callback(
        loop: EventLoop, hanging: tuple[Hanging, Resolver]) -> None:
    _, resolver = hanging
    reports = []
    connectors = []
    for budget_s in (0.1, 0.1, 30.0):
        report = Report()
        connector = Connector(loop, resolver, "dead.test", 80, budget_s,
                              report.connected, report.failed)
        connector.start()
        reports.append(report)
        connectors.append(connector)
    drive(loop, lambda: reports[0].done() and reports[1].done(), "two timeouts")
    assert len(resolver._waiting[("dead.test", 80)]) == 1  # only the live one's
    connectors[2].cancel()
    assert resolver._waiting[("dead.test", 80)] == []
