"""Unit tests for rawproxy.resolver with a fake getaddrinfo, post and clock.

No query ever reaches a real resolver: ``getaddrinfo`` is a fake that
answers from a table.  ``post`` collects the callbacks the workers hand to
"the loop"; the test runs them on its own thread, as the loop would.  The
workers are real threads, so the tests wait on a condition with a timeout.
"""

from __future__ import annotations

import errno
import logging
import socket
import threading
from typing import Any, Callable, Iterator, Union

import pytest

from rawproxy.resolver import Resolution, Resolver

WAIT_S = 10.0

Answer = Union[list[tuple[Any, ...]], BaseException]


def info(family: int, sockaddr: tuple[Any, ...]) -> tuple[Any, ...]:
    return (family, socket.SOCK_STREAM, socket.IPPROTO_TCP, "", sockaddr)


class FakeGetAddrInfo:
    """Canned answers per host name; records every call."""

    def __init__(self) -> None:
        self.answers: dict[str, Answer] = {}
        self.calls: list[tuple[str, int]] = []
        self.kwargs: list[dict[str, Any]] = []
        self._lock = threading.Lock()

    def __call__(self, host: str, port: int, *args: Any, **kwargs: Any) -> list[tuple[Any, ...]]:
        with self._lock:
            self.calls.append((host, port))
            self.kwargs.append(kwargs)
        answer = self.answers.get(host, socket.gaierror(socket.EAI_NONAME, "Name unknown"))
        if isinstance(answer, BaseException):
            raise answer
        return answer


class FakePost:
    """The loop's call_soon_threadsafe: collects callbacks for the test to run."""

    def __init__(self) -> None:
        self.callbacks: list[Callable[[], None]] = []
        self.total = 0
        self._cond = threading.Condition()

    def __call__(self, callback: Callable[[], None]) -> None:
        with self._cond:
            self.callbacks.append(callback)
            self.total += 1
            self._cond.notify_all()

    def wait_for(self, total: int) -> None:
        with self._cond:
            if not self._cond.wait_for(lambda: self.total >= total, WAIT_S):
                raise AssertionError(f"timed out waiting for {total} posts (got {self.total})")

    def run_all(self) -> int:
        with self._cond:
            callbacks, self.callbacks = self.callbacks, []
        for callback in callbacks:
            callback()
        return len(callbacks)


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


class Collector:
    def __init__(self) -> None:
        self.results: list[Resolution] = []
        self.thread_ids: list[int] = []

    def __call__(self, resolution: Resolution) -> None:
        self.results.append(resolution)
        self.thread_ids.append(threading.get_ident())


@pytest.fixture
def gai() -> FakeGetAddrInfo:
    fake = FakeGetAddrInfo()
    fake.answers["backend.test"] = [info(socket.AF_INET, ("192.0.2.10", 80))]
    fake.answers["other.test"] = [info(socket.AF_INET, ("192.0.2.20", 80))]
    return fake


@pytest.fixture
def post() -> FakePost:
    return FakePost()


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def resolver(gai: FakeGetAddrInfo, post: FakePost, clock: FakeClock) -> Iterator[Resolver]:
    resolver = Resolver(post, gai, clock, ttl_s=30.0, negative_ttl_s=5.0, workers=2)
    yield resolver
    threads = list(resolver._threads)
    resolver.close()
    for thread in threads:
        thread.join(WAIT_S)
        assert not thread.is_alive()


def resolve_later(resolver: Resolver, post: FakePost, host: str, port: int = 80) -> Resolution:
    """A lookup that goes to the workers: wait for its post, run it, return the answer."""
    done = Collector()
    before = post.total
    assert resolver.resolve(host, port, done) is None
    post.wait_for(before + 1)
    assert done.results == [], "callbacks run on the loop thread only"
    post.run_all()
    assert len(done.results) == 1
    return done.results[0]


# -- literals ---------------------------------------------------------------------

@pytest.mark.parametrize("host,expected", [
    ("192.0.2.1", (socket.AF_INET, ("192.0.2.1", 443))),
    ("2001:db8::1", (socket.AF_INET6, ("2001:db8::1", 443, 0, 0))),
    ("::1", (socket.AF_INET6, ("::1", 443, 0, 0))),
])
def test_ip_literals_resolve_at_once(resolver: Resolver, gai: FakeGetAddrInfo, post: FakePost,
                                     host: str, expected: tuple[Any, ...]) -> None:
    done = Collector()
    resolution = resolver.resolve(host, 443, done)
    assert resolution is not None
    assert resolution.addresses == (expected,)
    assert resolution.error == ""
    assert gai.calls == []
    assert post.total == 0 and done.results == []
    assert resolver._threads == [], "no workers needed for literals"


# -- names --------------------------------------------------------------------------

def test_name_is_resolved_off_thread_and_delivered_via_post(
        resolver: Resolver, gai: FakeGetAddrInfo, post: FakePost) -> None:
    done = Collector()
    assert resolver.resolve("backend.test", 80, done) is None
    post.wait_for(1)
    assert done.results == []
    post.run_all()
    assert done.thread_ids == [threading.get_ident()]
    (resolution,) = done.results
    assert resolution.addresses == ((socket.AF_INET, ("192.0.2.10", 80)),)
    assert resolution.error == ""
    assert gai.calls == [("backend.test", 80)]
    assert gai.kwargs[0].get("type") == socket.SOCK_STREAM


def test_concurrent_lookups_of_one_name_share_one_query(
        resolver: Resolver, gai: FakeGetAddrInfo, post: FakePost) -> None:
    collectors = [Collector() for _ in range(3)]
    for done in collectors:
        assert resolver.resolve("backend.test", 80, done) is None
    post.wait_for(1)
    assert post.run_all() == 1
    assert gai.calls == [("backend.test", 80)]
    first = collectors[0].results
    assert len(first) == 1
    for done in collectors:
        assert done.results == first  # the very same Resolution object


def test_two_names_each_get_their_own_answer(
        gai: FakeGetAddrInfo, post: FakePost, clock: FakeClock) -> None:
    # One worker takes both jobs in turn; its posts must not mix them up
    # however late the loop runs them.
    resolver = Resolver(post, gai, clock, workers=1)
    try:
        first, second = Collector(), Collector()
        assert resolver.resolve("backend.test", 80, first) is None
        assert resolver.resolve("other.test", 80, second) is None
        post.wait_for(2)
        threads = list(resolver._threads)
    finally:
        resolver.close()
    for thread in threads:
        thread.join(WAIT_S)
        assert not thread.is_alive()
    assert post.run_all() == 2
    assert [r.addresses for r in first.results] == [((socket.AF_INET, ("192.0.2.10", 80)),)]
    assert [r.addresses for r in second.results] == [((socket.AF_INET, ("192.0.2.20", 80)),)]


def test_answers_are_cached_for_ttl(resolver: Resolver, gai: FakeGetAddrInfo,
                                   post: FakePost, clock: FakeClock) -> None:
    answer = resolve_later(resolver, post, "backend.test")
    clock.now += 29.9
    done = Collector()
    assert resolver.resolve("backend.test", 80, done) is answer
    assert len(gai.calls) == 1 and done.results == []
    clock.now += 0.2  # past ttl_s
    again = resolve_later(resolver, post, "backend.test")
    assert again is not answer
    assert again.addresses == answer.addresses
    assert len(gai.calls) == 2


def test_cache_is_per_port(resolver: Resolver, gai: FakeGetAddrInfo, post: FakePost) -> None:
    resolve_later(resolver, post, "backend.test", 80)
    gai.answers["backend.test"] = [info(socket.AF_INET, ("192.0.2.10", 81))]
    answer = resolve_later(resolver, post, "backend.test", 81)
    assert answer.addresses == ((socket.AF_INET, ("192.0.2.10", 81)),)
    assert gai.calls == [("backend.test", 80), ("backend.test", 81)]


def test_forget_drops_the_cache(resolver: Resolver, gai: FakeGetAddrInfo, post: FakePost) -> None:
    resolve_later(resolver, post, "backend.test")
    resolver.forget()
    resolve_later(resolver, post, "backend.test")
    assert len(gai.calls) == 2


def test_failures_are_cached_for_negative_ttl(resolver: Resolver, gai: FakeGetAddrInfo,
                                              post: FakePost, clock: FakeClock) -> None:
    gai.answers["gone.test"] = socket.gaierror(socket.EAI_NONAME, "Name or service not known")
    failure = resolve_later(resolver, post, "gone.test")
    assert failure.addresses == ()
    assert "gone.test" in failure.error
    assert "Name or service not known" in failure.error
    clock.now += 4.9
    assert resolver.resolve("gone.test", 80, Collector()) is failure
    assert len(gai.calls) == 1
    clock.now += 0.2  # past negative_ttl_s, well within ttl_s
    gai.answers["gone.test"] = [info(socket.AF_INET, ("192.0.2.30", 80))]
    fixed = resolve_later(resolver, post, "gone.test")
    assert fixed.error == ""
    assert fixed.addresses == ((socket.AF_INET, ("192.0.2.30", 80)),)


@pytest.mark.parametrize("answer", [
    OSError(101, "Network is unreachable"),
    UnicodeError("label too long"),
])
def test_other_lookup_errors_become_error_text(resolver: Resolver, gai: FakeGetAddrInfo,
                                               post: FakePost, answer: BaseException) -> None:
    gai.answers["odd.test"] = answer
    failure = resolve_later(resolver, post, "odd.test")
    assert failure.addresses == ()
    assert failure.error.startswith("cannot resolve odd.test: ")


def test_empty_answer_is_a_failure(resolver: Resolver, gai: FakeGetAddrInfo,
                                   post: FakePost) -> None:
    gai.answers["empty.test"] = []
    failure = resolve_later(resolver, post, "empty.test")
    assert failure.addresses == ()
    assert "empty.test" in failure.error and "no addresses" in failure.error


def test_duplicate_addresses_removed_in_order(resolver: Resolver, gai: FakeGetAddrInfo,
                                              post: FakePost) -> None:
    gai.answers["many.test"] = [
        info(socket.AF_INET, ("192.0.2.2", 80)),
        info(socket.AF_INET6, ("2001:db8::2", 80, 0, 0)),
        info(socket.AF_INET, ("192.0.2.1", 80)),
        info(socket.AF_INET, ("192.0.2.2", 80)),
        info(socket.AF_INET6, ("2001:db8::2", 80, 0, 0)),
    ]
    answer = resolve_later(resolver, post, "many.test")
    assert answer.addresses == (
        (socket.AF_INET, ("192.0.2.2", 80)),
        (socket.AF_INET6, ("2001:db8::2", 80, 0, 0)),
        (socket.AF_INET, ("192.0.2.1", 80)),
    )


def test_a_failing_callback_is_logged_and_others_still_run(
        resolver: Resolver, post: FakePost, caplog: pytest.LogCaptureFixture) -> None:
    def broken(resolution: Resolution) -> None:
        raise RuntimeError("boom")

    done = Collector()
    resolver.resolve("backend.test", 80, broken)
    resolver.resolve("backend.test", 80, done)
    post.wait_for(1)
    with caplog.at_level(logging.ERROR, logger="rawproxy.resolver"):
        post.run_all()
    assert len(done.results) == 1
    assert any("backend.test:80" in r.getMessage() and r.exc_info for r in caplog.records)


def test_close_stops_the_workers(gai: FakeGetAddrInfo, post: FakePost,
                                 clock: FakeClock) -> None:
    resolver = Resolver(post, gai, clock, workers=3)
    resolve_later(resolver, post, "backend.test")
    threads = list(resolver._threads)
    assert len(threads) == 3 and all(t.is_alive() for t in threads)
    resolver.close()
    for thread in threads:
        thread.join(WAIT_S)
    assert not any(t.is_alive() for t in threads)
    # A closed resolver starts no new workers.
    resolver.resolve("other.test", 80, Collector())
    assert resolver._threads == []
    assert gai.calls == [("backend.test", 80)]


def test_workers_start_once(resolver: Resolver, post: FakePost) -> None:
    resolve_later(resolver, post, "backend.test")
    threads = list(resolver._threads)
    assert threads
    resolve_later(resolver, post, "other.test")
    assert resolver._threads == threads


# -- failures of our own (#18 defects 9 and 13) ------------------------------------


class FailingOnce:
    """A thread factory whose first thread cannot start (a thread limit)."""

    def __init__(self) -> None:
        self.failures = 0

    def __call__(self, *args: Any, **kwargs: Any) -> threading.Thread:
        thread = threading.Thread(*args, **kwargs)
        if self.failures == 0:
            self.failures += 1

            def refuse() -> None:
                raise RuntimeError("can't start new thread")
            thread.start = refuse  # type: ignore[method-assign]
        return thread


def test_a_thread_that_cannot_start_does_not_wedge_the_name(
        gai: FakeGetAddrInfo, post: FakePost, clock: FakeClock,
        caplog: pytest.LogCaptureFixture) -> None:
    factory = FailingOnce()
    resolver = Resolver(post, gai, clock, workers=1, thread_factory=factory)
    try:
        with caplog.at_level(logging.WARNING, logger="rawproxy.resolver"):
            failed = resolver.resolve("backend.test", 80, Collector())
        assert failed is not None and failed.local and failed.addresses == ()
        assert "resolver thread" in failed.error
        assert any("can't start new thread" in r.getMessage() for r in caplog.records)
        # Not cached, nothing left waiting: the next client's lookup goes through.
        answer = resolve_later(resolver, post, "backend.test")
        assert answer.addresses == ((socket.AF_INET, ("192.0.2.10", 80)),)
        assert factory.failures == 1
    finally:
        threads = list(resolver._threads)
        resolver.close()
        for thread in threads:
            thread.join(WAIT_S)


@pytest.mark.parametrize("answer", [
    OSError(errno.EMFILE, "Too many open files"),   # EAI_SYSTEM, as Python raises it
    OSError(errno.ENOBUFS, "No buffer space available"),
    socket.gaierror(socket.EAI_MEMORY, "Memory allocation failure"),
    MemoryError(),
])
def test_our_own_shortage_is_answered_as_local_and_not_cached(
        resolver: Resolver, gai: FakeGetAddrInfo, post: FakePost,
        answer: BaseException) -> None:
    gai.answers["short.test"] = answer
    failure = resolve_later(resolver, post, "short.test")
    assert failure.local and failure.error.startswith("cannot resolve short.test")
    gai.answers["short.test"] = [info(socket.AF_INET, ("192.0.2.40", 80))]
    fixed = resolve_later(resolver, post, "short.test")  # asked again at once
    assert fixed.addresses == ((socket.AF_INET, ("192.0.2.40", 80)),)


@pytest.mark.parametrize("answer", [
    socket.gaierror(socket.EAI_NONAME, "Name or service not known"),
    socket.gaierror(socket.EAI_AGAIN, "Temporary failure in name resolution"),
])
def test_a_failing_name_is_the_names_fault(resolver: Resolver, gai: FakeGetAddrInfo,
                                           post: FakePost, answer: BaseException) -> None:
    gai.answers["bad.test"] = answer
    assert not resolve_later(resolver, post, "bad.test").local


def test_an_unexpected_lookup_error_still_answers(
        resolver: Resolver, gai: FakeGetAddrInfo, post: FakePost,
        caplog: pytest.LogCaptureFixture) -> None:
    gai.answers["odd.test"] = ValueError("a bug in a getaddrinfo replacement")
    with caplog.at_level(logging.ERROR, logger="rawproxy.resolver"):
        failure = resolve_later(resolver, post, "odd.test")
    assert failure.error and failure.addresses == ()
    assert any("odd.test" in r.getMessage() for r in caplog.records)
    assert resolve_later(resolver, post, "backend.test").error == ""  # the worker lives on


def test_a_resolution_is_loopback_when_every_address_is() -> None:
    def of(*hosts: str) -> Resolution:
        return Resolution(tuple((socket.AF_INET6 if ":" in host else socket.AF_INET,
                                 (host, 80)) for host in hosts), "", 0.0)

    assert of("127.0.0.1").loopback and of("127.3.2.1", "::1").loopback
    assert not of("127.0.0.1", "192.0.2.1").loopback  # one remote address: no
    assert not of("2001:db8::1").loopback
    assert not of().loopback  # a failed lookup
