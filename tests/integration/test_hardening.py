"""Resource exhaustion, hostile and broken peers, privileges (SPEC 3-5)."""

from __future__ import annotations

import os
import pwd
import resource
import select
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable, Iterator

import pytest

from tests.support import (HOST, Backend, ProxyFactory, ProxyProcess, SelectorEcho, connect,
                           free_ports, proxy_argv, recv_exactly, recv_until_eof,
                           start_echo_process, wait_until, write_config)

BackendFactory = Callable[..., Backend]
KiB, MiB = 1 << 10, 1 << 20


@pytest.fixture
def many_echo() -> Iterator[SelectorEcho]:
    server = SelectorEcho()
    yield server
    server.close()


def cpu_seconds(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as stat:
        fields = stat.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def test_half_open_connection_is_closed_after_the_timeout(proxies: ProxyFactory) -> None:
    listener = socket.socket()
    listener.bind((HOST, 0))
    listener.listen(8)
    try:
        proxy, ports = proxies.start([{"Name": "a", "Ports": 1, "Targets": [
            f"{HOST}:{listener.getsockname()[1]}"]}], "--half-open-timeout", "0.5")
        with connect(ports["a"][0]) as client:
            client.sendall(b"bye")
            client.shutdown(socket.SHUT_WR)  # our FIN...
            listener.settimeout(10)
            target, _ = listener.accept()
            with target:
                target.settimeout(10)
                assert recv_until_eof(target) == b"bye"  # ...reached the target,
                started = time.monotonic()                # which never answers
                assert client.recv(1) == b""
                assert time.monotonic() - started >= 0.4
        proxy.wait_for_line("end=half-open-timeout")
    finally:
        listener.close()


def test_idle_connections_hold_no_buffers(proxies: ProxyFactory,
                                          many_echo: SelectorEcho,
                                          record_property: Callable[[str, object], None]) -> None:
    proxy, ports = proxies.start([{"Name": "a", "Ports": 1, "Targets": [many_echo.address]}])
    port = ports["a"][0]
    warm = [connect(port) for _ in range(50)]  # warm up allocator arenas
    rss_before = proxy.rss_bytes()
    count = 1000
    clients = []
    try:
        for _ in range(count):
            sock = connect(port)
            sock.sendall(b"x")          # one byte each way, then silence
            clients.append(sock)
        for sock in clients:
            assert recv_exactly(sock, 1) == b"x"
        wait_until(lambda: many_echo.open_connections >= count + len(warm))
        per_connection = (proxy.rss_bytes() - rss_before) / count
        record_property("proxy_KiB_per_idle_connection", round(per_connection / KiB, 2))
        # Two 64 KiB rings each would be 128 KiB; idle sessions hold none.
        assert per_connection < 16 * KiB, f"{per_connection / KiB:.1f} KiB per idle connection"
    finally:
        for sock in clients + warm:
            sock.close()


def test_client_that_never_reads_is_bounded_and_harms_no_one(proxies: ProxyFactory,
                                                             backend: BackendFactory) -> None:
    proxy, ports = proxies.start([{"Name": "a", "Ports": 1, "Targets": [backend().address]}])
    port = ports["a"][0]
    rss_before = proxy.rss_bytes()
    block = b"\1" * (256 * KiB)
    with connect(port) as greedy:
        greedy.setblocking(False)
        sent = 0
        while sent < 512 * MiB:  # echo comes back, but is never read
            _, writable, _ = select.select([], [greedy], [], 0.5)
            if not writable:
                break
            try:
                sent += greedy.send(block)
            except BlockingIOError:
                continue
        assert sent < 512 * MiB, "nothing pushed back on a client that never reads"
        assert proxy.rss_bytes() - rss_before < 8 * MiB
        with connect(port) as polite:        # meanwhile, others are served
            polite.sendall(b"hello")
            assert recv_exactly(polite, 5) == b"hello"


def test_backend_killed_mid_stream_closes_the_client_promptly(proxies: ProxyFactory) -> None:
    (port,) = free_ports(1)
    echo = start_echo_process(port)
    try:
        _, ports = proxies.start([{"Name": "a", "Ports": 1, "Targets": [f"{HOST}:{port}"]}])
        with connect(ports["a"][0], timeout_s=10) as client:
            client.sendall(b"x" * 1000)
            assert recv_exactly(client, 1000) == b"x" * 1000
            echo.kill()
            echo.wait(10)
            started = time.monotonic()
            try:
                leftover = recv_until_eof(client)
            except ConnectionResetError:
                leftover = b""
            assert leftover == b""
            assert time.monotonic() - started < 5
    finally:
        if echo.poll() is None:
            echo.kill()
        echo.wait(10)
        if echo.stdout is not None:
            echo.stdout.close()


@pytest.mark.slow
def test_a_storm_of_2000_connects_is_served(proxies: ProxyFactory,
                                           many_echo: SelectorEcho) -> None:
    proxy, ports = proxies.start([{"Name": "a", "Ports": 1, "Targets": [many_echo.address]}])
    port = ports["a"][0]
    count = 2000
    socks = []
    try:
        for _ in range(count):  # every connect at once, none waits for another
            sock = socket.socket()
            sock.setblocking(False)
            sock.connect_ex((HOST, port))
            socks.append(sock)
        for index, sock in enumerate(socks):
            sock.settimeout(30)
            sock.sendall(b"%05d" % index)
        for index, sock in enumerate(socks):
            assert recv_exactly(sock, 5) == b"%05d" % index
    finally:
        for sock in socks:
            sock.close()
    assert proxy.proc.poll() is None
    assert proxy.count_lines(r"ERROR|Traceback") == 0


def _low_fd_limit() -> None:
    resource.setrlimit(resource.RLIMIT_NOFILE, (48, 48))


def test_out_of_descriptors_pauses_sheds_and_recovers(proxies: ProxyFactory,
                                                      many_echo: SelectorEcho) -> None:
    proxy, ports = proxies.start([{"Name": "a", "Ports": 1, "Targets": [many_echo.address]}],
                                 preexec_fn=_low_fd_limit)
    port = ports["a"][0]
    held: list[socket.socket] = []
    try:
        proxy.wait_for_line(r"file descriptor limit 48")
        shed = 0
        for _ in range(40):  # ~20 sessions fit in 48 descriptors: the rest cannot
            try:
                sock = connect(port, timeout_s=10)
            except ConnectionResetError:
                shed += 1  # accepted and reset before connect() even returned
                continue
            held.append(sock)
            try:
                sock.sendall(b"ping")
                if recv_exactly(sock, 4) != b"ping":
                    shed += 1
            except (ConnectionResetError, BrokenPipeError):
                shed += 1
        assert shed > 0, "every connection got a session in 48 descriptors?"
        proxy.wait_for_line(r"accept paused")
        busy_from = cpu_seconds(proxy.pid)
        time.sleep(1.0)  # measuring that an exhausted proxy stays quiet takes time
        assert cpu_seconds(proxy.pid) - busy_from < 0.5, "spinning while out of descriptors"
        for sock in held:
            sock.close()
        held.clear()

        def serves() -> bool:
            try:
                with connect(port, timeout_s=2) as sock:
                    sock.sendall(b"back")
                    return recv_exactly(sock, 4) == b"back"
            except OSError:
                return False

        wait_until(serves, message="the proxy to serve again once descriptors are free")
    finally:
        for sock in held:
            sock.close()
        assert proxy.stop() == 0


@pytest.mark.skipif(os.geteuid() != 0, reason="dropping privileges needs root")
def test_user_option_drops_root_after_binding(proxies: ProxyFactory,
                                              backend: BackendFactory) -> None:
    nobody = pwd.getpwnam("nobody")
    proxy, ports = proxies.start([{"Name": "a", "Ports": 1, "Targets": [backend().address]}],
                                 "--user", "nobody")
    proxy.wait_for_line(rf"running as uid {nobody.pw_uid}")

    def ids(field: str) -> set[int]:
        with open(f"/proc/{proxy.pid}/status") as status:
            for line in status:
                if line.startswith(field + ":"):
                    return {int(value) for value in line.split()[1:]}
        return set()

    assert ids("Uid") == {nobody.pw_uid} and ids("Gid") == {nobody.pw_gid}
    with connect(ports["a"][0]) as sock:
        sock.sendall(b"still here")
        assert recv_exactly(sock, 10) == b"still here"


def test_unknown_user_exits_2_before_binding() -> None:
    result = subprocess.run([sys.executable, "rawproxy.py", "--user", "no-such-user-here"],
                            cwd=str(Path(__file__).resolve().parents[2]),
                            capture_output=True, text=True, timeout=30)
    assert result.returncode == 2
    assert result.stderr.strip() == "rawproxy: error: --user: no such user 'no-such-user-here'"



class UnreadStderrProxy:
    """rawproxy with stderr a pipe this test reads only when it chooses to.

    Without PYTHONUNBUFFERED, as in production: sys.stderr is then buffered,
    and a write through it would hold its lock while blocked.
    """

    def __init__(self, tmp_path: Path, target: str) -> None:
        path = tmp_path / "c.json"
        env = {k: v for k, v in os.environ.items() if k != "PYTHONUNBUFFERED"}
        for _attempt in range(5):
            self.port = write_config(path, [{"Name": "a", "Ports": 1,
                                             "Targets": [target]}])["a"][0]
            self.proc = subprocess.Popen(proxy_argv(path), stdin=subprocess.DEVNULL,
                                         stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                                         env=env)
            wait_until(lambda: self.serves() or self.proc.poll() is not None, timeout_s=30,
                       message="the proxy to listen (or exit)")
            if self.proc.poll() is None:
                return
            # Another test took the fresh port in the meantime (its bind failed): retry.
            self.proc.communicate()
        raise AssertionError("the proxy never listened in 5 attempts")

    def serves(self) -> bool:
        try:
            with connect(self.port, timeout_s=2) as sock:
                sock.sendall(b"up")
                return recv_exactly(sock, 2) == b"up"
        except OSError:
            return False

    def relay(self, count: int) -> None:
        """One access-log line each: far more than a pipe holds."""
        for n in range(count):
            with connect(self.port, timeout_s=5) as sock:
                payload = n.to_bytes(4, "big")
                sock.sendall(payload)
                assert recv_exactly(sock, 4) == payload, f"connection {n} not relayed"

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.communicate()


@pytest.fixture
def unread_stderr_proxy(tmp_path: Path, backend: BackendFactory) -> Iterator[UnreadStderrProxy]:
    proxy = UnreadStderrProxy(tmp_path, backend("echo").address)
    yield proxy
    proxy.close()


def test_stderr_nobody_reads_does_not_stop_relaying_or_exit(
        unread_stderr_proxy: UnreadStderrProxy) -> None:
    proxy = unread_stderr_proxy
    proxy.relay(2000)
    proxy.proc.send_signal(signal.SIGTERM)
    # Still nobody reads: the drain and the bounded log flush must end it.
    assert proxy.proc.wait(timeout=20) == 0
    assert proxy.proc.stderr is not None
    assert len(proxy.proc.stderr.read()) >= 16384, "the pipe never filled: the test proves nothing"


def test_log_lines_held_while_stderr_was_stuck_arrive_once_it_is_read(
        unread_stderr_proxy: UnreadStderrProxy) -> None:
    proxy = unread_stderr_proxy
    proxy.relay(2000)
    proxy.proc.send_signal(signal.SIGTERM)
    _, err = proxy.proc.communicate(timeout=30)
    assert proxy.proc.returncode == 0
    assert len(err) > 4 * 65536, "the log never outgrew the pipe: the test proves nothing"
    access = [line for line in err.decode().splitlines() if "rawproxy.access" in line]
    # The 2,000 sent 4 bytes each; the readiness checks before them, 2.
    assert sum(" bytes_in=4 " in line for line in access) == 2000, "lines were dropped"
    assert all(" bytes_in=4 " in line or " bytes_in=2 " in line for line in access)
