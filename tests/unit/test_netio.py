"""Unit tests for rawproxy.netio: error classification and the socket calls.

The sockets here are loopback only (127.0.0.1, ephemeral ports) and every
blocking call has a timeout.  A port that refuses connections is one held
bound but not listening, so no other test can take it meanwhile.
"""

from __future__ import annotations

import errno
import os
import select
import socket
import sys
from pathlib import Path
from typing import Iterator

import pytest

from rawproxy import netio
from rawproxy.netio import ConnectFailed, PeerGone
from tests.support import Blackhole

HOST = "127.0.0.1"
TIMEOUT_S = 10.0


@pytest.fixture
def listener() -> Iterator[socket.socket]:
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind((HOST, 0))
    sock.listen(8)
    sock.settimeout(TIMEOUT_S)
    yield sock
    sock.close()


@pytest.fixture
def refusing_port() -> Iterator[int]:
    """Bound, never listening: the kernel answers a SYN with RST."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind((HOST, 0))
    yield sock.getsockname()[1]
    sock.close()


@pytest.fixture
def connected(listener: socket.socket) -> Iterator[tuple[socket.socket, socket.socket]]:
    client = socket.create_connection(listener.getsockname(), timeout=TIMEOUT_S)
    server, _ = listener.accept()
    server.settimeout(TIMEOUT_S)
    yield client, server
    client.close()
    server.close()


def wait_writable(sock: socket.socket) -> None:
    _, writable, _ = select.select([], [sock], [], TIMEOUT_S)
    assert writable, "connect did not complete in time"


# -- classification --------------------------------------------------------------------

@pytest.mark.parametrize("err,reason", [
    (errno.ECONNREFUSED, "refused"),
    (errno.ETIMEDOUT, "timeout"),
    (errno.ENETUNREACH, "unreachable"),
    (errno.EHOSTUNREACH, "unreachable"),
    (errno.EADDRNOTAVAIL, "unreachable"),
    (errno.ECONNRESET, "reset"),
    (errno.ECONNABORTED, "reset"),
    (errno.EMFILE, "emfile"),
    (errno.EACCES, "eacces"),
    (99_999, "99999"),
])
def test_connect_reason(err: int, reason: str) -> None:
    assert netio.connect_reason(err) == reason


@pytest.mark.parametrize("err,gone", [
    (errno.ECONNRESET, True),
    (errno.EPIPE, True),
    (errno.ENOTCONN, True),
    (errno.EBADF, False),
    (errno.ENOMEM, False),
])
def test_is_peer_gone(err: int, gone: bool) -> None:
    assert netio.is_peer_gone(OSError(err, "x")) is gone


def test_connect_failed_carries_its_reason() -> None:
    exc = ConnectFailed("refused")
    assert exc.reason == "refused" and str(exc) == "refused"


# -- formatting -------------------------------------------------------------------------

@pytest.mark.parametrize("addr,text", [
    (("127.0.0.1", 5001), "127.0.0.1:5001"),
    (("::1", 5001, 0, 0), "[::1]:5001"),
    (("2001:db8::1", 80), "[2001:db8::1]:80"),
    ("/run/rawproxy.sock", "/run/rawproxy.sock"),
])
def test_format_sockaddr(addr: object, text: str) -> None:
    assert netio.format_sockaddr(addr) == text


def test_peer_name(connected: tuple[socket.socket, socket.socket]) -> None:
    client, server = connected
    assert netio.peer_name(client) == netio.format_sockaddr(server.getsockname())
    with socket.socket() as unconnected:
        assert netio.peer_name(unconnected) == "?"


# -- listening and connecting -------------------------------------------------------------

def test_open_listener_on_loopback_port_zero() -> None:
    sock = netio.open_listener(HOST, 0, 16)
    try:
        host, port = sock.getsockname()
        assert host == HOST and port != 0
        assert sock.getblocking() is False
        assert sock.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN) == 1
        assert sock.getsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR) != 0
        with pytest.raises(BlockingIOError):
            sock.accept()  # non-blocking: nothing pending
        with socket.create_connection((HOST, port), timeout=TIMEOUT_S):
            select.select([sock], [], [], TIMEOUT_S)
            conn, _ = sock.accept()
            conn.close()
    finally:
        sock.close()


def test_open_listener_takes_numeric_hosts_only() -> None:
    # AI_NUMERICHOST: a name is rejected without any DNS query.
    with pytest.raises(socket.gaierror):
        netio.open_listener("listener.invalid", 0, 16)


def test_open_listener_on_a_taken_port_raises(listener: socket.socket) -> None:
    with pytest.raises(OSError) as caught:
        netio.open_listener(HOST, listener.getsockname()[1], 16)
    assert caught.value.errno == errno.EADDRINUSE


def test_start_connect_to_closed_port_is_refused(refusing_port: int) -> None:
    try:
        sock = netio.start_connect(socket.AF_INET, (HOST, refusing_port))
    except ConnectFailed as exc:
        assert exc.reason == "refused"
        return
    try:
        assert sock.getblocking() is False
        wait_writable(sock)
        with pytest.raises(ConnectFailed) as caught:
            netio.finish_connect(sock)
        assert caught.value.reason == "refused"
    finally:
        sock.close()


def test_no_local_port_left_is_our_shortage(monkeypatch: pytest.MonkeyPatch) -> None:
    """EADDRNOTAVAIL from connect(): on Linux, the ephemeral ports are used
    up here; the target did nothing wrong (not charged as unreachable)."""
    monkeypatch.setattr(socket.socket, "connect_ex",
                        lambda self, addr: errno.EADDRNOTAVAIL)
    with pytest.raises(netio.LocalResourceError):
        netio.start_connect(socket.AF_INET, (HOST, 9))


def test_start_connect_then_finish_connect(listener: socket.socket) -> None:
    sock = netio.start_connect(socket.AF_INET, listener.getsockname())
    try:
        assert sock.getblocking() is False
        wait_writable(sock)
        assert netio.finish_connect(sock) is True
        server, _ = listener.accept()
        server.close()
    finally:
        sock.close()


def test_established_once_the_handshake_is_over(listener: socket.socket) -> None:
    sock = netio.start_connect(socket.AF_INET, listener.getsockname())
    try:
        wait_writable(sock)
        assert netio.established(sock) is True
    finally:
        sock.close()


def test_not_established_while_the_syn_is_unanswered_or_before_any_connect() -> None:
    hole = Blackhole()  # a full accept queue: the SYN is dropped
    sock = netio.start_connect(socket.AF_INET, (HOST, hole.port))
    try:
        assert netio.established(sock) is False
    finally:
        sock.close()
        hole.close()
    with socket.socket() as never_connected:
        assert netio.established(never_connected) is False


def test_finish_connect_says_not_yet_while_connecting() -> None:
    # A socket that never connected has SO_ERROR 0 too: the peer name decides.
    with socket.socket() as sock:
        assert netio.finish_connect(sock) is False


def test_connect_next_skips_addresses_that_fail_at_once(
        listener: socket.socket, monkeypatch: pytest.MonkeyPatch) -> None:
    real_start = netio.start_connect
    refused = ("127.0.0.2", 9)  # never contacted: the fake refuses it at once

    def start(family: int, sockaddr: netio.SockAddr) -> socket.socket:
        if sockaddr == refused:
            raise ConnectFailed("refused")
        return real_start(family, sockaddr)

    monkeypatch.setattr(netio, "start_connect", start)
    addresses: list[tuple[int, netio.SockAddr]] = [
        (socket.AF_INET, refused), (socket.AF_INET, listener.getsockname())]
    sock, _ = netio.connect_next(addresses)
    assert sock is not None and addresses == []
    sock.close()
    assert netio.connect_next([(socket.AF_INET, refused)]) == (None, "refused")


def test_connect_next_reports_the_caller_reason_when_nothing_is_left() -> None:
    assert netio.connect_next([], "timeout") == (None, "timeout")


def test_set_nodelay(connected: tuple[socket.socket, socket.socket]) -> None:
    client, _ = connected
    netio.set_nodelay(client)
    assert client.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY) != 0
    left, right = socket.socketpair()  # not TCP: ignored
    with left, right:
        netio.set_nodelay(left)


# -- closing ---------------------------------------------------------------------------------

def test_shutdown_write_sends_fin(connected: tuple[socket.socket, socket.socket]) -> None:
    client, server = connected
    client.sendall(b"last")
    netio.shutdown_write(client)
    assert server.recv(16) == b"last"
    assert server.recv(16) == b""
    server.sendall(b"reply")  # the other direction stays open
    assert client.recv(16) == b"reply"


def test_shutdown_write_on_unconnected_socket_is_peer_gone() -> None:
    with socket.socket() as sock:
        with pytest.raises(PeerGone):
            netio.shutdown_write(sock)


def test_close_sends_fin(connected: tuple[socket.socket, socket.socket]) -> None:
    client, server = connected
    netio.close(server)
    assert client.recv(16) == b""
    netio.close(server)  # twice: harmless


def test_abort_sends_rst(connected: tuple[socket.socket, socket.socket]) -> None:
    client, server = connected
    netio.abort(server)
    assert server.fileno() == -1
    with pytest.raises(ConnectionResetError):
        client.recv(16)


def test_abort_of_a_closed_socket_is_harmless() -> None:
    sock = socket.socket()
    sock.close()
    netio.abort(sock)


def test_a_connecting_socket_is_non_blocking(listener: socket.socket) -> None:
    sock = netio.start_connect(socket.AF_INET, listener.getsockname())
    with sock:
        assert sock.gettimeout() == 0.0 and os.get_blocking(sock.fileno()) is False


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="Linux copies the option")
def test_a_listener_hands_tcp_nodelay_to_what_it_accepts(listener: socket.socket) -> None:
    assert netio.nodelay_for_accepted(listener) is True
    with socket.create_connection(listener.getsockname(), timeout=TIMEOUT_S):
        accepted, _ = listener.accept()
        with accepted:
            assert accepted.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY) != 0


def test_a_unix_listener_hands_nothing(tmp_path: Path) -> None:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.bind(str(tmp_path / "s"))
        sock.listen(1)
        assert netio.nodelay_for_accepted(sock) is False  # each would need its own (none)


def test_a_stream_socket_behaves_as_any_socket(listener: socket.socket) -> None:
    sock = netio.start_connect(socket.AF_INET, listener.getsockname())
    assert isinstance(sock, netio.StreamSocket) and isinstance(sock, socket.socket)
    assert sock.family == socket.AF_INET and sock.type == socket.SOCK_STREAM
    assert not sock._closed and "[closed]" not in repr(sock)
    peer, _ = listener.accept()
    with peer:
        wrapped = netio.StreamSocket(socket.AF_INET, socket.SOCK_STREAM, 0, peer.detach())
        with wrapped:  # socket.socket's __exit__ and close(), on the C-made object
            wrapped.sendall(b"ping")
            assert sock.recv(4) == b"ping"
        assert wrapped.fileno() == -1 and wrapped._closed
        assert "[closed]" in repr(wrapped)
    sock.close()
    assert sock.fileno() == -1
