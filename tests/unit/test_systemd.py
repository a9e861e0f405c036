"""systemd's protocols (``rawproxy.systemd``) and the inherited sockets they feed."""

from __future__ import annotations

import os
import socket
from pathlib import Path
from typing import Iterator

import pytest

from rawproxy import systemd
from rawproxy.inherited import InheritedSockets


# -- sd_listen_fds ---------------------------------------------------------------------

def test_listen_fds_are_taken_from_3_when_listen_pid_is_ours() -> None:
    env = {"LISTEN_PID": "4242", "LISTEN_FDS": "2", "LISTEN_FDNAMES": "a:b", "OTHER": "x"}
    assert systemd.parse_listen_fds(env, 4242) == [3, 4]
    assert env == {"OTHER": "x"}, "the variables are for this process only"


@pytest.mark.parametrize("env", [
    {"LISTEN_PID": "1", "LISTEN_FDS": "2"},           # another process's (inherited by mistake)
    {"LISTEN_FDS": "2"},                              # no pid
    {"LISTEN_PID": "4242", "LISTEN_FDS": "two"},      # not a number
    {"LISTEN_PID": "4242", "LISTEN_FDS": "-1"},
    {"LISTEN_PID": "٤٢٤٢", "LISTEN_FDS": "1"},         # digits, but not ASCII ones
    {},
])
def test_listen_fds_are_none_unless_the_variables_are_right(env: dict[str, str]) -> None:
    assert systemd.parse_listen_fds(env, 4242) == []
    assert "LISTEN_PID" not in env and "LISTEN_FDS" not in env


# -- sd_notify ---------------------------------------------------------------------------

@pytest.mark.parametrize("value, address", [
    ("/run/systemd/notify", "/run/systemd/notify"),
    ("@abstract/name", "\0abstract/name"),
    ("", None),
    (None, None),
    ("vsock:2:1234", None),  # not something a stdlib AF_UNIX client can reach
])
def test_notify_socket_addresses(value: str, address: str) -> None:
    assert systemd.notify_address(value) == address


@pytest.fixture
def listener() -> Iterator[tuple[socket.socket, str]]:
    """A datagram socket in the abstract namespace, and its NOTIFY_SOCKET name."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    name = f"rawproxy-unit-{os.getpid()}-{id(sock)}"
    sock.bind("\0" + name)
    sock.settimeout(5)
    yield sock, "@" + name
    sock.close()


def test_each_notification_is_one_datagram(listener: tuple[socket.socket, str]) -> None:
    sock, name = listener
    notifier = systemd.Notifier.from_environment({"NOTIFY_SOCKET": name})
    try:
        assert notifier.enabled
        notifier.ready()
        notifier.reloading()
        notifier.stopping()
        notifier.main_pid(1234)
        heard = [sock.recv(4096).decode().split("\n") for _ in range(4)]
    finally:
        notifier.close()
    assert heard[0][0] == "READY=1"
    assert heard[1][0] == "RELOADING=1" and heard[1][1].startswith("MONOTONIC_USEC=")
    assert heard[2] == ["STOPPING=1"]
    assert heard[3][:2] == ["MAINPID=1234", "READY=1"]


def test_a_notifier_without_a_socket_does_nothing_and_one_nobody_hears_never_raises() -> None:
    quiet = systemd.Notifier.from_environment({})
    assert not quiet.enabled and not quiet.notify("READY=1")
    gone = systemd.Notifier("\0rawproxy-unit-nobody-listens-here")
    try:
        assert not gone.notify("READY=1")
    finally:
        gone.close()


# -- inherited sockets, matched by address ---------------------------------------------------

def tcp_listener(host: str = "127.0.0.1", reuse_port: bool = False,
                 port: int = 0) -> socket.socket:
    sock = socket.socket()
    if reuse_port:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    sock.bind((host, port))
    sock.listen(8)
    return sock


def pool_of(*socks: socket.socket) -> InheritedSockets:
    """A pool holding duplicates (the pool closes what it holds)."""
    return InheritedSockets.from_fds([os.dup(sock.fileno()) for sock in socks])


def test_a_port_takes_the_socket_bound_to_it_and_the_rest_are_closed() -> None:
    first, second = tcp_listener(), tcp_listener()
    pool = pool_of(first, second)
    try:
        assert len(pool) == 2
        taken = pool.take("127.0.0.1", second.getsockname()[1])
        assert taken is not None and taken.getsockname() == second.getsockname()
        assert not taken.getblocking()
        assert pool.take("127.0.0.1", second.getsockname()[1]) is None  # handed out once
        assert pool.take("127.0.0.1", 1) is None  # not inherited: bind it
        pool.close_rest()
        assert len(pool) == 0
        taken.close()
    finally:
        pool.close()
        first.close()
        second.close()


def test_an_exact_address_wins_over_another_on_the_same_port() -> None:
    loopback = tcp_listener("127.0.0.1", reuse_port=True)
    port = loopback.getsockname()[1]
    other = tcp_listener("127.0.0.2", reuse_port=True, port=port)
    pool = pool_of(loopback, other)
    try:
        taken = pool.take("127.0.0.2", port)
        assert taken is not None and taken.getsockname()[0] == "127.0.0.2"
        taken.close()
    finally:
        pool.close()
        loopback.close()
        other.close()


def test_what_is_not_a_listening_stream_socket_is_closed() -> None:
    unlistened = socket.socket()
    unlistened.bind(("127.0.0.1", 0))
    datagram = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    read_end, write_end = os.pipe()
    fds = [os.dup(unlistened.fileno()), os.dup(datagram.fileno()), read_end]
    try:
        assert len(InheritedSockets.from_fds(fds)) == 0
        for fd in fds:
            with pytest.raises(OSError):
                os.fstat(fd)  # closed
    finally:
        unlistened.close()
        datagram.close()
        os.close(write_end)


def test_a_unix_socket_is_taken_by_its_path(tmp_path: Path) -> None:
    path = f"{tmp_path}/admin.sock"
    unix = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    unix.bind(path)
    unix.listen(1)
    tcp = tcp_listener()
    pool = pool_of(unix, tcp)
    try:
        assert pool.take_admin("", 0, path + ".other") is None
        assert pool.take_admin("127.0.0.1", 0, None) is None  # port 0: the kernel picks
        taken = pool.take_admin("", 0, path)
        assert taken is not None and taken.getsockname() == path
        taken.close()
    finally:
        pool.close()
        unix.close()
        tcp.close()


def test_workers_get_one_socket_of_a_group_each_and_share_a_lone_one() -> None:
    group = [tcp_listener(reuse_port=True)]
    port = group[0].getsockname()[1]
    group.append(tcp_listener(reuse_port=True, port=port))
    lone = tcp_listener()  # systemd's: one socket for every worker
    try:
        grouped_inodes: list[int] = []
        lone_inodes: list[int] = []
        for index in range(3):
            pool = pool_of(*group, lone)
            pool.share(index)
            assert len(pool) == 2
            for inodes, want in ((grouped_inodes, port), (lone_inodes, lone.getsockname()[1])):
                taken = pool.take("127.0.0.1", want)
                assert taken is not None
                inodes.append(os.fstat(taken.fileno()).st_ino)
                taken.close()
            pool.close()
        group_inodes = [os.fstat(sock.fileno()).st_ino for sock in group]
        # A third worker (an old one was gone at the upgrade) shares one.
        assert grouped_inodes == [group_inodes[0], group_inodes[1], group_inodes[0]]
        assert lone_inodes == [os.fstat(lone.fileno()).st_ino] * 3
    finally:
        for sock in (*group, lone):
            sock.close()


def test_the_supervisor_keeps_only_what_its_workers_share() -> None:
    group = [tcp_listener(reuse_port=True)]
    group.append(tcp_listener(reuse_port=True, port=group[0].getsockname()[1]))
    lone = tcp_listener()
    pool = pool_of(*group, lone)
    try:
        pool.close_rest(workers=2)  # each worker has one of the group; all share ``lone``
        assert len(pool) == 1
        kept = pool.take("127.0.0.1", lone.getsockname()[1])
        assert kept is not None
        kept.close()
    finally:
        pool.close()
        for sock in (*group, lone):
            sock.close()
