"""A proxy fed by one real etcd member (SPEC 11): start, changes, registrations,
an etcd that goes away and comes back, the cache, compaction."""

from __future__ import annotations

import os
import re
import signal
import subprocess
from pathlib import Path
from typing import Any, Callable, Iterator

import pytest

from tests.etcd_fixtures import (EtcdCluster, FleetFactory, needs_etcd,
                                 reconfigure, register_argv, serve)
from tests.support import (HOST, REPO, Backend, connect, dead_port, free_ports, recv_exactly,
                           run_cli, wait_until)

pytestmark = needs_etcd

Apps = Callable[[list[int]], list[dict[str, Any]]]


@pytest.fixture
def etcd(tmp_path: Path) -> Iterator[EtcdCluster]:
    cluster = EtcdCluster(tmp_path / "etcd").start()
    yield cluster
    cluster.close()


@pytest.fixture
def backends() -> Iterator[Callable[[str], Backend]]:
    started: list[Backend] = []

    def start(name: str) -> Backend:
        server = Backend("name", name=name)
        started.append(server)
        return server

    yield start
    for server in started:
        server.close()


def web(*targets: Backend) -> Apps:
    """One app "web" on the ports given, relaying to ``targets``."""
    return lambda ports: [{"Name": "web", "Ports": ports,
                           "Targets": [f"{HOST}:{t.port}" for t in targets]}]


def greeting(port: int) -> bytes:
    """Connect through the proxy; the name backend says its name first."""
    with connect(port) as sock:
        return sock.recv(64).strip()


def echoes(sock: Any, payload: bytes = b"ping") -> bool:
    sock.sendall(payload)
    return recv_exactly(sock, len(payload)) == payload


def refused(port: int) -> bool:
    try:
        connect(port, timeout_s=2.0).close()
    except ConnectionRefusedError:
        return True
    return False


def closed_at_once(port: int) -> bool:
    """A client of an app with no target is closed without a byte."""
    with connect(port) as sock:
        try:
            return sock.recv(1) == b""
        except ConnectionResetError:
            return True


def test_serves_the_config_it_reads_from_etcd(etcd: EtcdCluster, fleet: FleetFactory,
                                              backends: Callable[[str], Backend]) -> None:
    proxy, ports = serve(etcd, fleet, web(backends("a")), 2)
    assert greeting(ports[0]).startswith(b"a") and greeting(ports[1]).startswith(b"a")
    view = proxy.config()
    assert view["Source"] == "etcd:/rawproxy/config"
    assert proxy.metric("rawproxy_etcd_connected") == 1
    assert proxy.metric("rawproxy_config_revision") == view["Revision"] > 0


def test_a_put_reaches_new_connections_and_leaves_open_ones(
        etcd: EtcdCluster, fleet: FleetFactory, backends: Callable[[str], Backend]) -> None:
    a, b = backends("a"), backends("b")
    proxy, (old_port,) = serve(etcd, fleet, web(a), 1)
    with connect(old_port) as open_conn:
        assert open_conn.recv(64).startswith(b"a")
        revision, (new_port,) = reconfigure(etcd, proxy, web(b), 1)
        assert greeting(new_port).startswith(b"b")  # the new port listens, to the new target
        wait_until(lambda: refused(old_port), message="the removed port closed")
        assert echoes(open_conn)  # the open connection is untouched
    proxy.process.wait_for_line(rf"etcd revision {revision} applied: 1 apps")


def test_an_invalid_put_is_rejected_like_an_invalid_file(
        etcd: EtcdCluster, fleet: FleetFactory, backends: Callable[[str], Backend]) -> None:
    proxy, (port,) = serve(etcd, fleet, web(backends("a")), 1)
    revision = etcd.put_config([{"Name": "web", "Ports": [70000], "Targets": []}])
    line = proxy.process.wait_for_line(rf"reload \(etcd revision {revision}\) rejected")
    assert line.endswith('rejected, the old config keeps serving: etcd:/rawproxy/config: '
                         'Apps[0] "web" Ports[0]: 70000 is not a port (1-65535)')
    assert greeting(port).startswith(b"a")
    assert proxy.revision() < revision
    assert proxy.metric("rawproxy_config_last_reload_successful") == 0


def test_a_registered_target_joins_and_leaves_with_its_lease(
        etcd: EtcdCluster, fleet: FleetFactory, backends: Callable[[str], Backend]) -> None:
    machine = backends("m1")
    proxy, (port,) = serve(etcd, fleet, web(), 1)
    assert closed_at_once(port)
    proxy.process.wait_for_line(r"end=no-target")
    register = subprocess.Popen(
        register_argv(etcd.endpoints, "web", f"{HOST}:{machine.port}", "m1", 2),
        cwd=str(REPO), stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE)
    try:
        wait_until(lambda: proxy.targets("web") == [f"{HOST}:{machine.port}"],
                   message="the registered target in /config")
        with connect(port) as open_conn:
            assert open_conn.recv(64).startswith(b"m1")
            os.kill(register.pid, signal.SIGKILL)  # the keep-alive stops; the lease runs out
            register.wait(10)
            wait_until(lambda: proxy.targets("web") == [], timeout_s=15.0,
                       message="the target gone after its TTL")
            assert closed_at_once(port)
            assert echoes(open_conn)  # open connections are untouched
    finally:
        if register.poll() is None:
            register.kill()
        register.wait(10)
        assert register.stderr is not None
        register.stderr.close()


def test_register_revokes_its_lease_when_stopped(
        etcd: EtcdCluster, fleet: FleetFactory, backends: Callable[[str], Backend]) -> None:
    machine = backends("m2")
    proxy, (port,) = serve(etcd, fleet, web(), 1)
    register = subprocess.Popen(
        register_argv(etcd.endpoints, "web", f"{HOST}:{machine.port}", "m2", 60,
                      "--weight", "3"),
        cwd=str(REPO), stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE, text=True)
    try:
        wait_until(lambda: proxy.targets("web") == [f"{HOST}:{machine.port}"],
                   message="the registered target in /config")
        assert proxy.config()["Apps"][0]["Targets"][0]["Weight"] == 3
        register.send_signal(signal.SIGTERM)
        _out, err = register.communicate(timeout=15)
        assert register.returncode == 0, err
        assert "revoked lease" in err
        # Gone well before its 60 s lease would have run out.
        wait_until(lambda: proxy.targets("web") == [], timeout_s=10.0,
                   message="the target gone at once")
    finally:
        if register.poll() is None:
            register.kill()
            register.communicate(timeout=10)


def test_keeps_serving_while_etcd_is_down_then_catches_up(
        etcd: EtcdCluster, fleet: FleetFactory, backends: Callable[[str], Backend]) -> None:
    proxy, (port,) = serve(etcd, fleet, web(backends("a")), 1)
    member = etcd.members[0]
    member.kill()
    proxy.process.wait_for_line(r"etcd: lost .*; switching to ")
    wait_until(lambda: proxy.metric("rawproxy_etcd_connected") == 0, message="disconnected")
    assert greeting(port).startswith(b"a")
    etcd.restart(member)
    wait_until(lambda: proxy.metric("rawproxy_etcd_connected") == 1, message="reconnected")
    revision, (new_port,) = reconfigure(etcd, proxy, web(backends("b")), 1)
    assert greeting(new_port).startswith(b"b")
    assert proxy.metric("rawproxy_etcd_watch_restarts_total") >= 1


def test_a_compaction_while_disconnected_means_reading_everything_again(
        etcd: EtcdCluster, fleet: FleetFactory, backends: Callable[[str], Backend]) -> None:
    proxy, _ports = serve(etcd, fleet, web(backends("a")), 1)
    proxy.process.signal(signal.SIGSTOP)  # it cannot see etcd die, change and compact
    try:
        etcd.members[0].kill()
        etcd.restart(etcd.members[0])
        new_port = free_ports(1)[0]
        for _ in range(3):
            revision = etcd.put_config(web(backends("b"))([new_port]))
        etcd.compact(revision)
    finally:
        proxy.process.signal(signal.SIGCONT)
    proxy.process.wait_for_line(r"was compacted .*reading everything again")
    proxy.wait_revision(revision)
    assert greeting(new_port).startswith(b"b")


def test_sighup_reads_etcd_again(etcd: EtcdCluster, fleet: FleetFactory,
                                 backends: Callable[[str], Backend]) -> None:
    proxy, (port,) = serve(etcd, fleet, web(backends("a")), 1)
    proxy.process.signal(signal.SIGHUP)
    proxy.process.wait_for_line(r"SIGHUP, etcd revision \d+ applied: 1 apps")
    assert greeting(port).startswith(b"a")


def test_starts_from_the_cache_while_etcd_is_down(
        tmp_path: Path, etcd: EtcdCluster, fleet: FleetFactory,
        backends: Callable[[str], Backend]) -> None:
    cache = tmp_path / "cache.json"
    first, (port,) = serve(etcd, fleet, web(backends("a")), 1, "--etcd-cache", str(cache))
    wait_until(cache.exists, message="the cache written")
    assert first.process.stop() == 0
    etcd.members[0].kill()
    proxy = fleet.start(etcd.endpoints, "--etcd-cache", str(cache), "--etcd-timeout", "0.5")
    proxy.process.wait_for_line(r"serving the cached config from .*cache\.json \(revision \d+\)")
    assert greeting(port).startswith(b"a")
    assert proxy.metric("rawproxy_etcd_connected") == 0
    etcd.restart(etcd.members[0])
    revision, (new_port,) = reconfigure(etcd, proxy, web(backends("b")), 1)
    assert greeting(new_port).startswith(b"b")


def test_without_etcd_or_a_cache_it_exits_1_saying_why() -> None:
    url = f"http://{HOST}:{dead_port()}"
    result = run_cli("--etcd", url, "--etcd-timeout", "0.3")
    assert result.returncode == 1
    assert result.stderr == (f"rawproxy: error: etcd: no etcd endpoint answered within 0.3s "
                             f"(last: {url}: connection refused); no --etcd-cache to start "
                             "from\n")


def test_an_invalid_config_in_etcd_at_start_exits_2(etcd: EtcdCluster) -> None:
    etcd.put_config([{"Name": "web", "Ports": [1], "Target": []}])
    result = run_cli("--etcd", etcd.endpoints, "--check")
    assert result.returncode == 2
    assert re.fullmatch(r'rawproxy: error: etcd:/rawproxy/config: Apps\[0\] "web": unknown '
                        r'key "Target".*\n', result.stderr)


def test_check_reads_the_config_and_registrations(etcd: EtcdCluster) -> None:
    etcd.put_config([{"Name": "web", "Ports": [8080], "Targets": []}])
    etcd.put("/rawproxy/targets/web/m1", f"{HOST}:9001")
    etcd.put("/rawproxy/targets/nope/m1", f"{HOST}:9002")
    result = run_cli("--etcd", etcd.endpoints, "--check")
    assert result.returncode == 0, result.stderr
    assert f"target {HOST}:9001 weight 1" in result.stdout
    assert "etcd:/rawproxy/config: OK, 1 app, 1 port, 1 target" in result.stdout


def test_bad_etcd_options_exit_2() -> None:
    result = run_cli("--etcd", "ftp://x", "--check")
    assert (result.returncode, result.stderr) == (
        2, "rawproxy: error: --etcd: 'ftp://x' is not an etcd URL "
           "(http://HOST:PORT or https://...)\n")
    result = run_cli("--etcd", f"http://{HOST}:1", "--etcd-user", "root", "--check")
    assert (result.returncode, result.stderr) == (
        2, "rawproxy: error: --etcd-user and --etcd-password-file go together\n")



def test_every_worker_follows_etcd(etcd: EtcdCluster, fleet: FleetFactory,
                                   backends: Callable[[str], Backend]) -> None:
    proxy, _ports = serve(etcd, fleet, web(backends("a")), 1, "--workers", "2")
    revision, (new_port,) = reconfigure(etcd, proxy, web(backends("b")), 1)
    wait_until(lambda: proxy.process.count_lines(rf"etcd revision {revision} applied") == 2,
               message="both workers applied it")
    assert greeting(new_port).startswith(b"b")


def test_register_checks_its_target_before_any_put() -> None:
    result = subprocess.run(
        register_argv(f"http://{HOST}:{dead_port()}", "web", "no-port", "m1", 10),
        cwd=str(REPO), capture_output=True, text=True, timeout=30)
    assert (result.returncode, result.stderr) == (
        2, 'rawproxy.register: error: etcd:/rawproxy/targets/web/m1: "no-port" is not '
           '"host:port"\n')
    result = subprocess.run(
        register_argv(f"http://{HOST}:{dead_port()}", "web", f"{HOST}:1", "m1", 10,
                      "--etcd-timeout", "0.3"),
        cwd=str(REPO), capture_output=True, text=True, timeout=30)
    assert result.returncode == 1
    assert result.stderr.endswith(
        "rawproxy.register: error: no etcd endpoint answered within 0.3s\n")
