"""Routing, balancing and failover through a real proxy process (SPEC 4)."""

from __future__ import annotations

import collections
import os
import shutil
import socket
import time
from pathlib import Path
from typing import Callable, Iterator

import pytest

from tests.support import (FIRST_PICK, HOST, Backend, Blackhole, ProxyFactory, connect, dead_port,
                           recv_exactly, recv_until_eof)

BackendFactory = Callable[..., Backend]


def backend_name(port: int) -> str:
    with connect(port) as sock:
        line = b""
        while not line.endswith(b"\n"):
            chunk = sock.recv(64)
            assert chunk, "backend closed before naming itself"
            line += chunk
        return line.decode().strip()


def echo_once(port: int, payload: bytes) -> bytes:
    with connect(port) as sock:
        # Sent at once, before the proxy can have connected a target: the
        # early bytes must be held and delivered first, in order.
        sock.sendall(payload)
        sock.shutdown(socket.SHUT_WR)
        return recv_until_eof(sock)


def test_each_port_reaches_only_its_apps_targets(proxies: ProxyFactory,
                                                 backend: BackendFactory) -> None:
    a1, a2 = backend("name", name="a1"), backend("name", name="a2")
    b1, b2 = backend("name", name="b1"), backend("name", name="b2")
    _, ports = proxies.start([
        {"Name": "a", "Ports": 3, "Targets": [a1.address, a2.address]},
        {"Name": "b", "Ports": 3, "Targets": [b1.address, b2.address]},
    ])
    for app, names in (("a", {"a1", "a2"}), ("b", {"b1", "b2"})):
        for port in ports[app]:
            seen = {backend_name(port) for _ in range(12)}
            assert seen <= names, f"port {port} of app {app} reached {seen - names}"
            assert seen, f"port {port} reached nothing"


def spread(port: int, connections: int) -> collections.Counter[str]:
    return collections.Counter(backend_name(port) for _ in range(connections))


def test_two_equal_targets_share_400_connections(proxies: ProxyFactory,
                                                 backend: BackendFactory) -> None:
    t1, t2 = backend("name", name="t1"), backend("name", name="t2")
    _, ports = proxies.start([{"Name": "a", "Ports": 1, "Targets": [t1.address, t2.address]}])
    counts = spread(ports["a"][0], 400)
    assert sum(counts.values()) == 400
    assert 120 <= counts["t1"] <= 280, counts  # 30-70 %


def test_weights_three_to_one(proxies: ProxyFactory, backend: BackendFactory) -> None:
    heavy, light = backend("name", name="heavy"), backend("name", name="light")
    _, ports = proxies.start([{"Name": "a", "Ports": 1, "Targets": [
        {"Address": heavy.address, "Weight": 3}, {"Address": light.address, "Weight": 1}]}])
    counts = spread(ports["a"][0], 400)
    # Expected 300 of 400 (sigma ~8.7): 260..340 is more than 4 sigma wide.
    assert 260 <= counts["heavy"] <= 340, counts


def test_failover_from_refused_target_keeps_early_bytes(proxies: ProxyFactory,
                                                        backend: BackendFactory) -> None:
    live = backend("echo")
    refused = f"{HOST}:{dead_port()}"
    proxy, ports = proxies.start([{"Name": "a", "Ports": 1, "Targets": [
        {"Address": refused, "Weight": FIRST_PICK}, live.address]}])
    payload = os.urandom(50_000)
    assert echo_once(ports["a"][0], payload) == payload
    proxy.wait_for_line(rf"target {refused}: connect failed: refused")
    # Later clients skip the target marked down and still all succeed.
    for _ in range(5):
        assert echo_once(ports["a"][0], b"again") == b"again"


def test_every_address_of_a_name_is_tried(proxies: ProxyFactory, backend: BackendFactory) -> None:
    # localhost resolves (from /etc/hosts, no DNS query) to ::1 and
    # 127.0.0.1; the backend listens on IPv4 only, so ::1 is refused first.
    live = backend("echo")
    _, ports = proxies.start([{"Name": "a", "Ports": 1,
                               "Targets": [f"localhost:{live.port}"]}])
    assert echo_once(ports["a"][0], b"hello") == b"hello"


@pytest.fixture
def no_dns(tmp_path: Path) -> Iterator[list[str]]:
    """A wrapper making every DNS lookup fail at once, on loopback.

    The proxy runs in a private mount namespace where /etc/resolv.conf says
    ``nameserver 127.0.0.1``, so ``bad.target.for.testing`` is refused by
    the local port 53 instead of reaching the resolver off this machine.
    """
    if os.geteuid() != 0 or shutil.which("unshare") is None:
        pytest.skip("needs root and unshare(1) to fake a resolver")
    resolv = tmp_path / "resolv.conf"
    resolv.write_text("nameserver 127.0.0.1\noptions timeout:1 attempts:1\n")
    yield ["unshare", "--mount", "sh", "-c",
           f'mount --bind "{resolv}" /etc/resolv.conf && exec "$@"', "sh"]


def test_failover_from_unresolvable_name(proxies: ProxyFactory, backend: BackendFactory,
                                         no_dns: list[str]) -> None:
    live = backend("echo")
    proxy, ports = proxies.start([{"Name": "a", "Ports": 1, "Targets": [
        {"Address": "bad.target.for.testing:6003", "Weight": FIRST_PICK}, live.address]}],
        wrapper=no_dns)
    payload = os.urandom(10_000)
    assert echo_once(ports["a"][0], payload) == payload
    proxy.wait_for_line(r"target bad\.target\.for\.testing:6003: connect failed: cannot resolve")


@pytest.fixture
def blackhole() -> Iterator[Blackhole]:
    hole = Blackhole()
    yield hole
    hole.close()


def test_failover_from_connect_timeout(proxies: ProxyFactory, backend: BackendFactory,
                                       blackhole: Blackhole) -> None:
    live = backend("echo")
    stuck = f"{HOST}:{blackhole.port}"
    proxy, ports = proxies.start([{"Name": "a", "Ports": 1, "ConnectTimeout": 0.5, "Targets": [
        {"Address": stuck, "Weight": FIRST_PICK}, live.address]}])
    payload = os.urandom(20_000)
    started = time.monotonic()
    assert echo_once(ports["a"][0], payload) == payload
    elapsed = time.monotonic() - started
    proxy.wait_for_line(rf"target {stuck}: connect failed: timeout")
    assert elapsed >= 0.45, "the connect timeout cannot have been waited for"


def test_all_targets_down_closes_client_promptly_while_others_serve(
        proxies: ProxyFactory, backend: BackendFactory, blackhole: Blackhole) -> None:
    live = backend("echo")
    _, ports = proxies.start([
        {"Name": "down", "Ports": 1, "ConnectTimeout": 0.5,
         "Targets": [f"{HOST}:{dead_port()}", f"{HOST}:{blackhole.port}"]},
        {"Name": "up", "Ports": 1, "Targets": [live.address]},
    ])
    with connect(ports["up"][0]) as healthy:
        healthy.sendall(b"before")
        assert recv_exactly(healthy, 6) == b"before"
        started = time.monotonic()
        with connect(ports["down"][0]) as doomed:
            doomed.sendall(b"anyone?")
            try:
                leftover = recv_until_eof(doomed)
            except ConnectionResetError:
                leftover = b""
        elapsed = time.monotonic() - started
        assert leftover == b""
        # ConnectTimeout x targets = 1 s at most; allow for a loaded machine.
        assert elapsed < 3.0, f"client held {elapsed:.2f}s after all targets failed"
        healthy.sendall(b"after")
        assert recv_exactly(healthy, 5) == b"after"
