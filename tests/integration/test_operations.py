"""Operations: reload, drain, admin endpoint, limits, PROXY protocol, health
checks, log format, the single-file build (SPEC 1, 2, 6, 7)."""

from __future__ import annotations

import http.client
import json
import re
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Callable, Iterator

import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.support import (FIRST_PICK, HOST, REPO, Backend, ProxyFactory, ProxyProcess, connect,
                           dead_port, free_ports, recv_exactly, recv_until_eof, stable_ports,
                           wait_until)

BackendFactory = Callable[..., Backend]


def name_of(port: int) -> str:
    with connect(port) as sock:
        line = b""
        while not line.endswith(b"\n"):
            chunk = sock.recv(64)
            assert chunk
            line += chunk
        return line.decode().strip()


def echo(port: int, payload: bytes = b"ping") -> bytes:
    with connect(port) as sock:
        sock.sendall(payload)
        sock.shutdown(socket.SHUT_WR)
        return recv_until_eof(sock)


def rewrite(proxy: ProxyProcess, apps: list[dict[str, object]]) -> None:
    proxy.config_path.write_text(json.dumps({"Apps": apps}))


def reload(proxy: ProxyProcess, apps: list[dict[str, object]]) -> None:
    done = proxy.count_lines(r"config reloaded|reload \(SIGHUP\) rejected")
    rewrite(proxy, apps)
    proxy.signal(signal.SIGHUP)
    wait_until(lambda: proxy.count_lines(r"config reloaded|reload \(SIGHUP\) rejected") > done,
               message="the reload to be logged")


# -- reload -----------------------------------------------------------------

def test_reload_changes_targets_and_open_streams_survive(proxies: ProxyFactory,
                                                         backend: BackendFactory) -> None:
    old, new = backend("name", name="old"), backend("name", name="new")
    echoer = backend("echo")
    proxy, ports = proxies.start([
        {"Name": "a", "Ports": 1, "Targets": [old.address]},
        {"Name": "e", "Ports": 1, "Targets": [echoer.address]}])
    assert name_of(ports["a"][0]) == "old"
    with connect(ports["e"][0]) as stream:
        stream.sendall(b"before")
        assert recv_exactly(stream, 6) == b"before"
        reload(proxy, [{"Name": "a", "Ports": ports["a"], "Targets": [new.address]},
                       {"Name": "e", "Ports": ports["e"], "Targets": [old.address]}])
        assert {name_of(ports["a"][0]) for _ in range(5)} == {"new"}
        stream.sendall(b"after the reload")  # still relayed to the echoer, untouched
        assert recv_exactly(stream, 16) == b"after the reload"


def test_reload_adds_an_app_and_removes_a_port(proxies: ProxyFactory,
                                               backend: BackendFactory) -> None:
    a, b = backend("name", name="a"), backend("name", name="b")
    proxy, ports = proxies.start([{"Name": "a", "Ports": 2, "Targets": [a.address]}])
    kept, dropped = ports["a"]
    (added,) = stable_ports(1)  # bound by the reload, later
    reload(proxy, [{"Name": "a", "Ports": [kept], "Targets": [a.address]},
                   {"Name": "b", "Ports": [added], "Targets": [b.address]}])
    assert name_of(kept) == "a"
    assert name_of(added) == "b"
    with pytest.raises(ConnectionRefusedError):
        connect(dropped).close()


def test_port_moved_between_apps_never_refuses(proxies: ProxyFactory,
                                               backend: BackendFactory) -> None:
    a, b = backend("name", name="a"), backend("name", name="b")
    proxy, ports = proxies.start([{"Name": "a", "Ports": 1, "Targets": [a.address]},
                                  {"Name": "b", "Ports": 1, "Targets": [b.address]}])
    moving = ports["a"][0]
    refused: list[int] = []
    stop = threading.Event()

    def hammer() -> None:
        while not stop.is_set():
            try:
                connect(moving).close()
            except ConnectionRefusedError:
                refused.append(1)

    thread = threading.Thread(target=hammer)
    thread.start()
    try:
        reload(proxy, [{"Name": "a", "Ports": stable_ports(1), "Targets": [a.address]},
                       {"Name": "b", "Ports": [ports["b"][0], moving], "Targets": [b.address]}])
    finally:
        stop.set()
        thread.join(10)
    assert name_of(moving) == "b"
    assert not refused, "the moved port refused connections during the reload"


def test_invalid_reload_keeps_the_old_config(proxies: ProxyFactory,
                                             backend: BackendFactory) -> None:
    a = backend("name", name="a")
    proxy, ports = proxies.start([{"Name": "a", "Ports": 1, "Targets": [a.address]}])
    port = ports["a"][0]
    reload(proxy, [{"Name": "a", "Ports": [port, 70000], "Targets": [a.address]}])
    line = proxy.wait_for_line(r"reload \(SIGHUP\) rejected")
    assert 'Apps[0] "a" Ports[1]: 70000 is not a port (1-65535)' in line
    assert name_of(port) == "a"
    # A port that cannot be bound rejects the reload whole, too.
    squatter = socket.socket()
    squatter.bind((HOST, 0))
    squatter.listen(1)
    try:
        reload(proxy, [{"Name": "a", "Ports": [port, squatter.getsockname()[1]],
                        "Targets": [a.address]}])
        assert proxy.count_lines(r"reload \(SIGHUP\) rejected") == 2
        assert name_of(port) == "a"
    finally:
        squatter.close()


def test_watch_reloads_when_the_file_changes(proxies: ProxyFactory,
                                             backend: BackendFactory) -> None:
    old, new = backend("name", name="old"), backend("name", name="new")
    proxy, ports = proxies.start([{"Name": "a", "Ports": 1, "Targets": [old.address]}],
                                 "--watch")
    rewrite(proxy, [{"Name": "a", "Ports": ports["a"], "Targets": [new.address]}])
    proxy.wait_for_line("config reloaded", timeout_s=10)
    assert name_of(ports["a"][0]) == "new"


# -- drain ------------------------------------------------------------------

def test_drain_cuts_a_stream_longer_than_the_timeout(proxies: ProxyFactory,
                                                     backend: BackendFactory) -> None:
    proxy, ports = proxies.start([{"Name": "a", "Ports": 1, "Targets": [backend().address]}],
                                 "--drain-timeout", "0.5")
    with connect(ports["a"][0]) as sock:
        sock.sendall(b"x")
        assert recv_exactly(sock, 1) == b"x"
        started = time.monotonic()
        proxy.signal(signal.SIGTERM)
        try:
            assert sock.recv(1) == b""
        except ConnectionResetError:
            pass
        assert time.monotonic() - started >= 0.4
    assert proxy.wait() == 0
    proxy.wait_for_line("end=drain-timeout")


# -- admin endpoint -----------------------------------------------------------

def admin_port(proxy: ProxyProcess) -> int:
    line = proxy.wait_for_line(r"admin endpoint on http://")
    match = re.search(r":(\d+)/", line)
    assert match
    return int(match.group(1))


def get(port: int, path: str) -> tuple[int, str, str]:
    conn = http.client.HTTPConnection(HOST, port, timeout=10)
    try:
        conn.request("GET", path)
        response = conn.getresponse()
        return response.status, response.getheader("Content-Type") or "", response.read().decode()
    finally:
        conn.close()


def samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    out = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            out[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return out


def test_metrics_count_the_traffic_the_test_made(proxies: ProxyFactory,
                                                 backend: BackendFactory) -> None:
    live = backend("echo")
    dead = f"{HOST}:{dead_port()}"
    proxy, ports = proxies.start([{"Name": "a", "Ports": 1, "Targets": [
        live.address, {"Address": dead, "Weight": FIRST_PICK}]}], "--admin", f"{HOST}:0")
    port = admin_port(proxy)
    for index in range(3):
        assert echo(ports["a"][0], b"x" * (1000 + index)) == b"x" * (1000 + index)
    status, content_type, text = get(port, "/metrics")
    assert status == 200 and content_type.startswith("text/plain; version=0.0.4")
    got = samples(text)
    app = (("app", "a"),)
    assert got[("rawproxy_connections_accepted_total", app)] == 3
    assert got[("rawproxy_connections_closed_total", app)] == 3
    assert got[("rawproxy_connections_active", app)] == 0
    assert got[("rawproxy_bytes_in_total", app)] == 3003
    assert got[("rawproxy_bytes_out_total", app)] == 3003
    assert got[("rawproxy_connections_ended_total", (("app", "a"), ("end", "done")))] == 3
    dead_labels = (("app", "a"), ("reason", "refused"), ("target", dead))
    assert got[("rawproxy_connect_failures_total", dead_labels)] >= 1
    assert got[("rawproxy_target_up", (("app", "a"), ("target", dead)))] == 0
    assert got[("rawproxy_target_up", (("app", "a"), ("target", live.address)))] == 1
    live_labels = (("app", "a"), ("target", live.address))
    assert got[("rawproxy_connect_duration_seconds_count", live_labels)] == 3
    assert got[("rawproxy_connect_attempts_total", live_labels)] == 3
    assert got[("rawproxy_process_start_time_seconds", ())] > 1.7e9
    assert got[("rawproxy_config_reloads_total", (("result", "success"),))] == 0


def test_healthz_config_and_draining(proxies: ProxyFactory, backend: BackendFactory) -> None:
    live = backend("echo")
    proxy, ports = proxies.start([{"Name": "a", "Ports": 1, "Targets": [live.address]}],
                                 "--admin", f"{HOST}:0")
    port = admin_port(proxy)
    assert get(port, "/healthz")[0] == 200
    assert get(port, "/nope")[0] == 404
    status, content_type, body = get(port, "/config")
    assert status == 200 and content_type == "application/json"
    view = json.loads(body)
    app = view["Apps"][0]
    assert app["Name"] == "a" and app["Targets"] == [{"Address": live.address, "Weight": 1}]
    assert app["Status"] == {"ActiveConnections": 0, "QueueLength": 0, "Targets": [{
        "Address": live.address, "Up": True, "ConsecutiveFailures": 0,
        "LastFailure": None, "HealthCheckFailing": False, "OpenConnections": 0,
        "State": "up"}]}
    with connect(ports["a"][0]) as sock:
        sock.sendall(b"x")
        assert recv_exactly(sock, 1) == b"x"
        proxy.signal(signal.SIGTERM)
        proxy.wait_for_line("draining 1 connections")
        assert get(port, "/healthz")[0] == 503


def test_a_silent_admin_client_does_not_stall_the_proxy(proxies: ProxyFactory,
                                                        backend: BackendFactory) -> None:
    proxy, ports = proxies.start([{"Name": "a", "Ports": 1, "Targets": [backend().address]}],
                                 "--admin", f"{HOST}:0")
    port = admin_port(proxy)
    with socket.create_connection((HOST, port), timeout=10) as silent:
        silent.sendall(b"GET /metrics HTTP/1.1\r\n")  # and never the rest
        assert echo(ports["a"][0]) == b"ping"
        assert get(port, "/healthz")[0] == 200
        huge = socket.create_connection((HOST, port), timeout=10)
        with huge:
            huge.sendall(b"GET /" + b"a" * 9000 + b" HTTP/1.1\r\n\r\n")
            assert recv_until_eof(huge).startswith(b"HTTP/1.1 431")


# -- limits and PROXY protocol --------------------------------------------------

def test_max_connections_makes_the_third_client_wait(proxies: ProxyFactory,
                                                     backend: BackendFactory) -> None:
    _, ports = proxies.start([
        {"Name": "limited", "Ports": 1, "MaxConnections": 2, "Targets": [backend().address]},
        {"Name": "other", "Ports": 1, "Targets": [backend().address]}])
    port = ports["limited"][0]
    first, second = connect(port), connect(port)
    for sock in (first, second):
        sock.sendall(b"in")
        assert recv_exactly(sock, 2) == b"in"
    third = connect(port)  # the kernel's backlog takes it; the proxy does not
    third.sendall(b"waiting")
    third.settimeout(0.5)
    with pytest.raises(socket.timeout):
        third.recv(7)
    assert echo(ports["other"][0]) == b"ping"  # another app still serves
    first.close()
    third.settimeout(10)
    assert recv_exactly(third, 7) == b"waiting"
    for sock in (second, third):
        sock.close()


@pytest.fixture
def header_target() -> Iterator[tuple[str, list[bytes]]]:
    """A target that records everything a connection sent, until EOF."""
    listener = socket.socket()
    listener.bind((HOST, 0))
    listener.listen(8)
    received: list[bytes] = []

    def serve() -> None:
        listener.settimeout(15)
        try:
            conn, _ = listener.accept()
        except OSError:
            return
        with conn:
            conn.settimeout(15)
            received.append(recv_until_eof(conn))

    thread = threading.Thread(target=serve)
    thread.start()
    yield f"{HOST}:{listener.getsockname()[1]}", received
    thread.join(20)
    listener.close()


@pytest.mark.parametrize("version", ["v1", "v2"])
def test_proxy_protocol_header_names_the_real_client(
        proxies: ProxyFactory, header_target: tuple[str, list[bytes]], version: str) -> None:
    address, received = header_target
    _, ports = proxies.start([{"Name": "a", "Ports": 1, "ProxyProtocol": version,
                               "Targets": [address]}])
    port = ports["a"][0]
    with connect(port) as client:
        client_port = client.getsockname()[1]
        client.sendall(b"payload")
        client.shutdown(socket.SHUT_WR)
        recv_until_eof(client)
    wait_until(lambda: bool(received), message="the target to receive the stream")
    data = received[0]
    if version == "v1":
        expected = f"PROXY TCP4 127.0.0.1 127.0.0.1 {client_port} {port}\r\n".encode()
        assert data == expected + b"payload"
    else:
        signature = b"\r\n\r\n\x00\r\nQUIT\n"
        assert data[:12] == signature
        ver_cmd, family, length = struct.unpack("!BBH", data[12:16])
        assert (ver_cmd, family, length) == (0x21, 0x11, 12)
        src, dst, sport, dport = struct.unpack("!4s4sHH", data[16:28])
        assert socket.inet_ntoa(src) == "127.0.0.1" and socket.inet_ntoa(dst) == "127.0.0.1"
        assert (sport, dport) == (client_port, port)
        assert data[28:] == b"payload"


def test_allow_from_resets_other_clients(proxies: ProxyFactory, backend: BackendFactory) -> None:
    proxy, ports = proxies.start([
        {"Name": "private", "Ports": 1, "AllowFrom": ["10.0.0.0/8", "::1/128"],
         "Targets": [backend().address]},
        {"Name": "loopback", "Ports": 1, "AllowFrom": ["127.0.0.0/8"],
         "Targets": [backend().address]}])
    try:
        with connect(ports["private"][0]) as sock:
            assert sock.recv(1) == b""
    except ConnectionResetError:
        pass  # the reset can arrive before connect() has even returned
    proxy.wait_for_line(r"app=private .* end=denied")
    assert echo(ports["loopback"][0]) == b"ping"


def test_health_check_marks_a_dead_target_down_and_back_up(
        proxies: ProxyFactory, backend: BackendFactory) -> None:
    live = backend("name", name="live")
    (revived_port,) = stable_ports(1)  # bound again later: keep it out of the ephemeral range
    revived = f"{HOST}:{revived_port}"
    proxy, ports = proxies.start([{"Name": "a", "Ports": 1,
                                   "HealthCheck": {"Interval": 0.2, "Timeout": 0.5},
                                   "Targets": [live.address,
                                               {"Address": revived, "Weight": FIRST_PICK}]}])
    proxy.wait_for_line(rf"target {revived} is down \(health check: refused\)")
    # Down by the check alone: clients go to the live target without a failed try.
    assert {name_of(ports["a"][0]) for _ in range(5)} == {"live"}
    assert proxy.count_lines(r"connect failed") == 0
    listener = socket.socket()
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    listener.bind((HOST, revived_port))
    listener.listen(8)
    try:
        proxy.wait_for_line(rf"target {revived} is up \(health check passed\)")
    finally:
        listener.close()


# -- logs and the single-file build ---------------------------------------------

def test_json_log_format(proxies: ProxyFactory, backend: BackendFactory) -> None:
    proxy, ports = proxies.start([{"Name": "a", "Ports": 1, "Targets": [backend().address]}],
                                 "--log-format", "json")
    assert echo(ports["a"][0]) == b"ping"
    line = proxy.wait_for_line(r'"logger": "rawproxy.access"')
    entry = json.loads(line)
    assert entry["app"] == "a" and entry["end"] == "done"
    assert entry["bytes_in"] == 4 and entry["bytes_out"] == 4
    assert all(json.loads(raw) for raw in proxy.lines)


def test_zipapp_runs_the_same_proxy(tmp_path: Path, proxies: ProxyFactory,
                                    backend: BackendFactory) -> None:
    subprocess.run(["make", "-s", "dist", f"DIST_DIR={tmp_path}"], cwd=str(REPO),
                   check=True, capture_output=True, timeout=60)
    pyz = tmp_path / "rawproxy.pyz"
    check = subprocess.run([sys.executable, str(pyz), "--check", "--config",
                            str(REPO / "config.json")], capture_output=True, text=True,
                           timeout=30)
    assert check.returncode == 0 and "3 apps, 12 ports, 7 targets" in check.stdout
    proxy, ports = proxies.start([{"Name": "a", "Ports": 1, "Targets": [backend().address]}],
                                 launcher=pyz)
    try:
        assert echo(ports["a"][0], b"from the zipapp") == b"from the zipapp"
    finally:
        assert proxy.stop() == 0
