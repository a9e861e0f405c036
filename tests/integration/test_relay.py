"""Relaying through a real proxy process: integrity, half-close, reset,
backpressure, descriptors, idle timeout (SPEC 5)."""

from __future__ import annotations

import hashlib
import os
import select
import signal
import socket
import struct
import threading
import time
from typing import Callable

import pytest

from rawproxy.pipes import splice_available

from tests.support import (HOST, Backend, ProxyFactory, ProxyProcess, connect, recv_exactly,
                           recv_until_eof, wait_until)

BackendFactory = Callable[..., Backend]
MiB = 1 << 20


@pytest.fixture(autouse=True, params=["splice", "copy"])
def relay_mode(request: pytest.FixtureRequest, proxies: ProxyFactory) -> str:
    """Every relay test runs on both paths: zero-copy splice and recv_into/send."""
    mode: str = request.param
    if mode == "splice" and not splice_available():
        pytest.skip("splice needs Linux and Python 3.10+")
    if mode == "copy":
        proxies.default_args.append("--no-splice")
    return mode


def one_app_proxy(proxies: ProxyFactory, target: Backend,
                  **settings: object) -> tuple[int, ProxyProcess]:
    proxy, ports = proxies.start([{"Name": "a", "Ports": 1, "Targets": [target.address],
                                   **settings}])
    return ports["a"][0], proxy


def stream_through(port: int, total: int, chunk: int = 256 * 1024) -> tuple[str, str, float]:
    """Send ``total`` random bytes while reading the echo; sha256 of both."""
    sent_hash, got_hash = hashlib.sha256(), hashlib.sha256()
    block = os.urandom(chunk)
    started = time.monotonic()
    with connect(port, timeout_s=60) as sock:
        def sender() -> None:
            remaining = total
            while remaining:
                piece = block[:min(chunk, remaining)]
                sent_hash.update(piece)
                sock.sendall(piece)
                remaining -= len(piece)
            sock.shutdown(socket.SHUT_WR)

        thread = threading.Thread(target=sender)
        thread.start()
        received = 0
        while True:
            data = sock.recv(MiB)
            if not data:
                break
            got_hash.update(data)
            received += len(data)
        thread.join(60)
    assert received == total
    return sent_hash.hexdigest(), got_hash.hexdigest(), time.monotonic() - started


@pytest.mark.slow
def test_64_mib_each_way_arrives_intact(proxies: ProxyFactory, backend: BackendFactory,
                                        record_property: Callable[[str, object], None]) -> None:
    port, _ = one_app_proxy(proxies, backend("echo"))
    sent, got, seconds = stream_through(port, 64 * MiB)
    assert sent == got
    record_property("MB_per_s_each_way", round(64 / seconds, 1))


@pytest.mark.slow
def test_100_concurrent_connections_of_1_mib(proxies: ProxyFactory,
                                             backend: BackendFactory) -> None:
    port, _ = one_app_proxy(proxies, backend("echo"))
    results: list[tuple[str, str]] = []
    errors: list[BaseException] = []

    def one() -> None:
        try:
            sent, got, _ = stream_through(port, MiB, chunk=64 * 1024)
            results.append((sent, got))
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=one) for _ in range(100)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(120)
    assert not errors, errors[:3]
    assert len(results) == 100
    assert all(sent == got for sent, got in results)


def test_client_half_close_still_gets_the_reply(proxies: ProxyFactory,
                                                backend: BackendFactory) -> None:
    target = backend("collect", reply=b"reply after your FIN")
    port, _ = one_app_proxy(proxies, target)
    with connect(port) as sock:
        sock.sendall(b"request")
        sock.shutdown(socket.SHUT_WR)
        assert recv_until_eof(sock) == b"reply after your FIN"
    assert target.received == [b"request"]


def test_target_half_close_still_gets_the_request(proxies: ProxyFactory) -> None:
    # A target that speaks first, ends its side, and keeps reading.
    listener = socket.socket()
    listener.bind((HOST, 0))
    listener.listen(8)
    received: list[bytes] = []

    def serve() -> None:
        conn, _ = listener.accept()
        with conn:
            conn.settimeout(15)
            conn.sendall(b"banner")
            conn.shutdown(socket.SHUT_WR)
            received.append(recv_until_eof(conn))

    thread = threading.Thread(target=serve)
    thread.start()
    try:
        _, ports = proxies.start([{"Name": "a", "Ports": 1,
                                   "Targets": [f"{HOST}:{listener.getsockname()[1]}"]}])
        with connect(ports["a"][0]) as sock:
            assert recv_until_eof(sock) == b"banner"  # the target's FIN arrived
            sock.sendall(b"late words")               # and our direction is open
            sock.shutdown(socket.SHUT_WR)
            thread.join(15)
        assert received == [b"late words"]
    finally:
        listener.close()


def reset(sock: socket.socket) -> None:
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    sock.close()


def test_client_reset_closes_the_target_promptly(proxies: ProxyFactory) -> None:
    listener = socket.socket()
    listener.bind((HOST, 0))
    listener.listen(8)
    try:
        _, ports = proxies.start([{"Name": "a", "Ports": 1,
                                   "Targets": [f"{HOST}:{listener.getsockname()[1]}"]}])
        client = connect(ports["a"][0])
        client.sendall(b"x")
        listener.settimeout(10)
        conn, _ = listener.accept()
        with conn:
            conn.settimeout(5)
            assert conn.recv(1) == b"x"
            reset(client)
            with pytest.raises(ConnectionResetError):
                conn.recv(1)  # the proxy resets the target side in turn
    finally:
        listener.close()


def test_target_reset_closes_the_client_promptly(proxies: ProxyFactory) -> None:
    listener = socket.socket()
    listener.bind((HOST, 0))
    listener.listen(8)
    try:
        _, ports = proxies.start([{"Name": "a", "Ports": 1,
                                   "Targets": [f"{HOST}:{listener.getsockname()[1]}"]}])
        with connect(ports["a"][0], timeout_s=5) as client:
            client.sendall(b"x")
            listener.settimeout(10)
            conn, _ = listener.accept()
            conn.settimeout(5)
            assert conn.recv(1) == b"x"
            reset(conn)
            with pytest.raises(ConnectionResetError):
                client.recv(1)
    finally:
        listener.close()


@pytest.mark.slow
def test_no_descriptor_growth_after_1000_connections(proxies: ProxyFactory,
                                                     backend: BackendFactory) -> None:
    port, proxy = one_app_proxy(proxies, backend("echo"))

    def run(connections: int) -> None:
        for index in range(connections):
            with connect(port) as sock:
                sock.sendall(b"%d" % index)
                if index % 3 == 0:
                    reset(sock)          # some leave abruptly
                    continue
                sock.shutdown(socket.SHUT_WR)
                assert recv_until_eof(sock) == b"%d" % index

    run(50)  # warm up: the splice path keeps a few idle pipes pooled, by design
    wait_until(lambda: proxy.count_lines("end=") >= 50)
    baseline = proxy.fd_count()
    run(1000)
    wait_until(lambda: proxy.fd_count() <= baseline,
               message="the proxy's descriptor count to return to its baseline")


def test_non_reading_target_bounds_what_the_proxy_buffers(proxies: ProxyFactory) -> None:
    listener = socket.socket()
    listener.bind((HOST, 0))
    listener.listen(8)
    try:
        proxy, ports = proxies.start([{"Name": "a", "Ports": 1, "Targets": [
            f"{HOST}:{listener.getsockname()[1]}"]}])
        rss_before = proxy.rss_bytes()
        block = os.urandom(256 * 1024)
        twice = memoryview(block * 2)  # send from any offset: the stream repeats `block`
        with connect(ports["a"][0]) as sock:
            listener.settimeout(10)
            target, _ = listener.accept()  # ... and does not read, for now
            sock.setblocking(False)
            sent = 0
            # Push until the chain (our send buffer, the proxy, the target's
            # receive buffer) stays full for half a second.
            while sent < 512 * MiB:
                _, writable, _ = select.select([], [sock], [], 0.5)
                if not writable:
                    break
                offset = sent % len(block)
                try:
                    sent += sock.send(twice[offset:offset + len(block)])
                except BlockingIOError:
                    continue
            assert sent < 512 * MiB, "the proxy never pushed back"
            growth = proxy.rss_bytes() - rss_before
            # Kernel socket buffers hold most of `sent`; the proxy's own
            # memory grows by its 64 KiB ring plus allocator noise at most.
            assert growth < 8 * MiB, f"proxy grew {growth / MiB:.1f} MiB holding {sent / MiB:.1f} MiB"
            with target:
                target.settimeout(10)
                # Now the target reads: every byte arrives, none was lost.
                got = recv_exactly(target, sent)
                assert len(got) == sent
                assert got == (block * (sent // len(block) + 1))[:sent]
    finally:
        listener.close()


def test_idle_timeout_closes_both_sides(proxies: ProxyFactory) -> None:
    listener = socket.socket()
    listener.bind((HOST, 0))
    listener.listen(8)
    try:
        proxy, ports = proxies.start([{"Name": "a", "Ports": 1, "IdleTimeout": 0.5,
                                       "Targets": [f"{HOST}:{listener.getsockname()[1]}"]}])
        with connect(ports["a"][0]) as client:
            client.sendall(b"hi")
            listener.settimeout(10)
            conn, _ = listener.accept()
            with conn:
                conn.settimeout(10)
                assert conn.recv(2) == b"hi"
                started = time.monotonic()
                assert conn.recv(1) == b""     # the proxy closed the target side
                assert client.recv(1) == b""   # and the client side
                assert time.monotonic() - started >= 0.3
        proxy.wait_for_line(r"end=idle-timeout")
    finally:
        listener.close()


def test_sigterm_drains_open_stream_then_exits_zero(proxies: ProxyFactory,
                                                   backend: BackendFactory) -> None:
    port, proxy = one_app_proxy(proxies, backend("echo"))
    with connect(port) as sock:
        sock.sendall(b"one")
        assert recv_exactly(sock, 3) == b"one"
        proxy.signal(signal.SIGTERM)
        proxy.wait_for_line(r"draining 1 connections")
        with pytest.raises(ConnectionRefusedError):
            connect(port).close()
        sock.sendall(b"two")             # the open stream keeps flowing
        assert recv_exactly(sock, 3) == b"two"
    assert proxy.wait() == 0


def test_reset_after_half_close_reaches_the_target(proxies: ProxyFactory) -> None:
    # The client ends its side, then resets: the proxy no longer reads or
    # writes that socket (nothing to send it), yet must see the reset.
    listener = socket.socket()
    listener.bind((HOST, 0))
    listener.listen(8)
    try:
        proxy, ports = proxies.start([{"Name": "a", "Ports": 1, "Targets": [
            f"{HOST}:{listener.getsockname()[1]}"]}])
        client = connect(ports["a"][0])
        client.sendall(b"request")
        client.shutdown(socket.SHUT_WR)
        listener.settimeout(10)
        target, _ = listener.accept()
        with target:
            target.settimeout(10)
            assert recv_until_eof(target) == b"request"  # the FIN went through
            reset(client)                                # then the reset
            # Without the error watch this waits for the half-open timeout (60 s).
            proxy.wait_for_line(r"end=reset", timeout_s=5)
            # After its FIN, a reset shows on the target's socket as a broken pipe.
            wait_until(lambda: target.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR) != 0
                       or not _can_send(target), message="the target side to be reset")
    finally:
        listener.close()


def _can_send(sock: socket.socket) -> bool:
    try:
        sock.send(b"x")
        return True
    except (BrokenPipeError, ConnectionResetError):
        return False
