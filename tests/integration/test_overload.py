"""Overload and abuse through the real command line (SPEC 13, 1, 3):
--max-connections, PerClient counted in /metrics, and their usage and
config errors."""

from __future__ import annotations

import json
import socket
from pathlib import Path
from typing import Iterator

import pytest

from tests.integration.test_cli import assert_one_line_error
from tests.integration.test_operations import admin_port, get
from tests.support import HOST, ProxyFactory, connect, recv_exactly, run_cli, wait_until
from tests.unit.test_server_limits import CountingEcho

PAYLOAD = b"ping"


@pytest.fixture
def counting_echo() -> Iterator[CountingEcho]:
    backend = CountingEcho()
    yield backend
    backend.close()


@pytest.mark.parametrize("workers", ["1", "2"])
def test_max_connections_3_lets_5_clients_through_3_at_a_time(
        proxies: ProxyFactory, counting_echo: CountingEcho, workers: str) -> None:
    # With --workers 2 the kernel spreads the clients over both: the limit
    # is one count for both, and a worker paused at it is woken by the other.
    _, ports = proxies.start([
        {"Name": "a", "Ports": 1, "Targets": [counting_echo.address]},
        {"Name": "b", "Ports": 1, "Targets": [counting_echo.address]}],
        "--max-connections", "3", "--workers", workers)
    order = [ports["a"][0], ports["b"][0], ports["a"][0], ports["b"][0], ports["a"][0]]
    clients = [connect(port) for port in order]  # none refused: the backlog holds them
    try:
        for sock in clients:
            sock.sendall(PAYLOAD)
        wait_until(lambda: counting_echo.open == 3, message="three backend connections")
        served = []
        for sock in clients:
            sock.settimeout(0.3)
            try:
                served.append(recv_exactly(sock, len(PAYLOAD)) == PAYLOAD)
            except socket.timeout:
                served.append(False)
        assert served.count(True) == 3
        assert counting_echo.open == 3
        for sock, done in zip(clients, served):
            if done:
                sock.close()  # make room: the other two are served now
        for sock, done in zip(clients, served):
            if not done:
                sock.settimeout(10)
                assert recv_exactly(sock, len(PAYLOAD)) == PAYLOAD
        assert counting_echo.max_open == 3
    finally:
        for sock in clients:
            sock.close()


def test_per_client_resets_are_counted_in_metrics(proxies: ProxyFactory,
                                                  counting_echo: CountingEcho) -> None:
    proxy, ports = proxies.start([
        {"Name": "a", "Ports": 1, "Targets": [counting_echo.address],
         "PerClient": {"MaxConnections": 1, "Rate": 1000}}], "--admin", f"{HOST}:0")
    port = ports["a"][0]
    with connect(port) as kept:
        kept.sendall(PAYLOAD)
        assert recv_exactly(kept, len(PAYLOAD)) == PAYLOAD
        with pytest.raises((ConnectionResetError, BrokenPipeError)):  # at connect, or after
            with connect(port) as second:
                second.sendall(PAYLOAD)
                second.recv(1)
        proxy.wait_for_line(r"end=client-limit why=\"127\.0\.0\.1 over PerClient MaxConnections 1\"")
        text = get(admin_port(proxy), "/metrics")[2]
        assert 'rawproxy_connections_client_limited_total{app="a"} 1' in text
        assert 'rawproxy_connections_ended_total{app="a",end="client-limit"} 1' in text


@pytest.mark.parametrize("value", ["0", "-1", "x", "1.5", "٣"])
def test_max_connections_must_be_an_integer_of_at_least_1(tmp_path: Path, value: str) -> None:
    result = run_cli("--max-connections", value, "--config", str(tmp_path / "none.json"))
    assert result.returncode == 2
    assert_one_line_error(result.stderr, "--max-connections", "is not a connection limit")


@pytest.mark.parametrize("per_client, fragment", [
    ({}, 'PerClient: needs at least one of "MaxConnections", "Rate"'),
    ({"MaxConnections": 0}, "PerClient MaxConnections: 0 is not a connection limit"),
    ({"MaxConnections": 2.5}, "PerClient MaxConnections: 2.5 is not a connection limit"),
    ({"Rate": 0}, "PerClient Rate: 0 is not a rate"),
    ({"Rate": -3}, "PerClient Rate: -3 is not a rate"),
    ({"Rate": "5"}, 'PerClient Rate: "5" is not a rate'),
    ({"Rate": 1, "Burst": 5}, 'PerClient: unknown key "Burst" (allowed: MaxConnections, Rate)'),
    ([1], "PerClient: must be an object like"),
])
def test_bad_per_client_values_are_one_line_errors(tmp_path: Path, per_client: object,
                                                   fragment: str) -> None:
    path = tmp_path / "c.json"
    path.write_text(json.dumps({"Apps": [{"Name": "a", "Ports": [1], "Targets": ["h:1"],
                                          "PerClient": per_client}]}))
    result = run_cli("--check", "--config", str(path))
    assert result.returncode == 2
    assert_one_line_error(result.stderr, f'{path}: Apps[0] "a" {fragment}')


def test_check_summarises_per_client(tmp_path: Path) -> None:
    path = tmp_path / "c.json"
    path.write_text(json.dumps({"Apps": [{"Name": "a", "Ports": [1], "Targets": ["h:1"],
                                          "PerClient": {"MaxConnections": 4, "Rate": 2.5}}]}))
    result = run_cli("--check", "--config", str(path))
    assert result.returncode == 0, result.stderr
    assert "per client: max connections 4, 2.5 new connections/s" in result.stdout


def test_an_endless_config_file_is_refused_at_16_mib() -> None:
    result = run_cli("--check", "--config", "/dev/zero")
    assert result.returncode == 2
    assert_one_line_error(result.stderr, "/dev/zero: larger than 16777216 bytes (16 MiB)")
