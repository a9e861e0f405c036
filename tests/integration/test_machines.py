"""Machines that start and stop (SPEC 10), against a real proxy and a real
machines API (tests.machines_api) starting echo processes on loopback."""

from __future__ import annotations

import json
import os
import signal
import sys
import threading
import time
from pathlib import Path
from typing import Any, Iterator

import pytest

from tests.machines_api import MachinesAPI
from tests.support import (HOST, REPO, Backend, ProxyFactory, ProxyProcess, admin_body, connect,
                           recv_exactly, stable_ports, wait_until)


@pytest.fixture
def apis() -> Iterator[list[MachinesAPI]]:
    started: list[MachinesAPI] = []
    yield started
    for api in started:
        api.close()



def states(admin: int, app: int = 0) -> list[str]:
    view: dict[str, Any] = json.loads(admin_body(admin, "/config"))["Apps"][app]
    return [t["State"] for t in view["Status"]["Targets"]]


def start_proxy(proxies: ProxyFactory, machines: dict[str, Any], targets: list[str],
                *extra_apps: dict[str, Any]) -> tuple[ProxyProcess, int, int]:
    (admin,) = stable_ports(1)
    proxy, ports = proxies.start(
        [{"Name": "m", "Ports": 1, "Targets": targets, "ConnectTimeout": 1,
          "Machines": machines}, *extra_apps], "--admin", f"{HOST}:{admin}")
    return proxy, ports["m"][0], admin


def echo_once(port: int, payload: bytes) -> bytes:
    with connect(port) as sock:
        sock.sendall(payload)  # at once: the bytes wait in the kernel meanwhile
        return recv_exactly(sock, len(payload))


def test_first_client_of_a_stopped_app_is_served_with_every_early_byte(
        proxies: ProxyFactory, apis: list[MachinesAPI]) -> None:
    api = MachinesAPI(listen_delay_s=0.1)
    apis.append(api)
    (target,) = stable_ports(1)
    proxy, port, admin = start_proxy(proxies, {"Start": {"URL": api.url("start")}},
                                     [f"{HOST}:{target}"])
    payload = os.urandom(100_000)
    assert echo_once(port, payload) == payload
    assert api.count("start") == 1
    assert api.bodies[0] == {"app": "m", "target": f"{HOST}:{target}"}
    assert states(admin) == ["up"]
    metrics = admin_body(admin, "/metrics")
    assert 'rawproxy_machine_starts_total{app="m",result="ok"} 1' in metrics
    assert 'rawproxy_machine_start_wait_seconds_count{app="m"} 1' in metrics
    assert f'rawproxy_target_state{{app="m",target="{HOST}:{target}",state="up"}} 1' in metrics


def test_fifty_clients_during_one_start_make_one_hook_call(
        proxies: ProxyFactory, apis: list[MachinesAPI]) -> None:
    api = MachinesAPI(listen_delay_s=0.5)
    apis.append(api)
    (target,) = stable_ports(1)
    proxy, port, admin = start_proxy(proxies, {"Start": {"URL": api.url("start")}},
                                     [f"{HOST}:{target}"])
    results: list[bool] = []

    def client(index: int) -> None:
        payload = f"client {index} ".encode() * 50
        results.append(echo_once(port, payload) == payload)

    threads = [threading.Thread(target=client, args=(i,)) for i in range(50)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)
    assert results == [True] * 50
    assert api.count("start") == 1


def closed_with(proxy: ProxyProcess, port: int, end: str) -> None:
    with connect(port) as sock:
        sock.sendall(b"hello")
        # Closed with its bytes unread (the kernel then resets), nothing relayed.
        try:
            assert sock.recv(10) == b""
        except ConnectionResetError:
            pass
    proxy.wait_for_line(rf"end={end}")


@pytest.mark.parametrize("mode,end,result", [
    ("500", "start-failed", "failed"),
    ("dead", "start-timeout", "timeout"),
])
def test_a_start_that_fails_closes_its_clients(
        proxies: ProxyFactory, apis: list[MachinesAPI], mode: str, end: str,
        result: str) -> None:
    api = MachinesAPI(mode=mode)
    apis.append(api)
    (target,) = stable_ports(1)
    proxy, port, admin = start_proxy(
        proxies, {"Start": {"URL": api.url("start")}, "StartTimeout": 0.5},
        [f"{HOST}:{target}"])
    closed_with(proxy, port, end)
    metrics = admin_body(admin, "/metrics")
    assert f'rawproxy_machine_starts_total{{app="m",result="{result}"}} 1' in metrics
    assert f'rawproxy_connections_ended_total{{app="m",end="{end}"}} 1' in metrics
    assert states(admin) == ["stopped"]


def test_a_hanging_hook_times_out_and_the_loop_keeps_serving(
        proxies: ProxyFactory, apis: list[MachinesAPI], backend: Any) -> None:
    api = MachinesAPI(mode="hang")
    apis.append(api)
    other: Backend = backend()
    (target,) = stable_ports(1)
    proxy, port, admin = start_proxy(
        proxies, {"Start": {"URL": api.url("start")}, "StartTimeout": 3},
        [f"{HOST}:{target}"], {"Name": "other", "Ports": 1, "Targets": [other.address]})
    other_port = json.loads(admin_body(admin, "/config"))["Apps"][1]["Ports"][0]
    stuck = connect(port)
    stuck.sendall(b"waiting")
    wait_until(lambda: api.count("start") == 1)
    worst_s = 0.0
    with connect(other_port) as sock:
        for _ in range(50):  # while the hook hangs
            began = time.monotonic()
            sock.sendall(b"ping")
            assert recv_exactly(sock, 4) == b"ping"
            worst_s = max(worst_s, time.monotonic() - began)
    # A loop blocked by the hook would stall the first ping for most of the
    # hook's 3 s; a busy shared host costs tens of milliseconds at worst.
    assert worst_s < 1.0
    assert api.count("start") == 1 and proxy.count_lines("end=start-timeout") == 0
    try:
        assert stuck.recv(10) == b""
    except ConnectionResetError:
        pass  # closed with its bytes unread
    stuck.close()
    proxy.wait_for_line(r"end=start-timeout")


def test_a_command_hook_exiting_1_fails_the_start(
        proxies: ProxyFactory, tmp_path: Path) -> None:
    (target,) = stable_ports(1)
    proxy, port, admin = start_proxy(
        proxies, {"Start": {"Command": [sys.executable, "-c", "raise SystemExit(1)"]}},
        [f"{HOST}:{target}"])
    closed_with(proxy, port, "start-failed")
    proxy.wait_for_line(r"start hook failed: exit status 1")


COMMAND_HOOK = """
import subprocess, sys
sys.path.insert(0, %r)
from tests.machines_api import ECHO
port = sys.argv[1].rsplit(":", 1)[1]
proc = subprocess.Popen([sys.executable, "-c", ECHO, port, "0.05"], start_new_session=True,
                        stdin=subprocess.DEVNULL)
open(sys.argv[2], "w").write(str(proc.pid))
"""


def test_a_command_hook_starts_the_machine(proxies: ProxyFactory, tmp_path: Path) -> None:
    (target,) = stable_ports(1)
    pidfile = tmp_path / "echo.pid"
    script = tmp_path / "start_hook.py"
    script.write_text(COMMAND_HOOK % str(REPO))
    proxy, port, admin = start_proxy(
        proxies, {"Start": {"Command": [sys.executable, str(script), "{target}",
                                         str(pidfile)]}},
        [f"{HOST}:{target}"])
    try:
        assert echo_once(port, b"started by a command") == b"started by a command"
    finally:
        wait_until(pidfile.exists)
        os.kill(int(pidfile.read_text()), signal.SIGKILL)


def test_autostop_after_stop_after_keeps_min_running(
        proxies: ProxyFactory, apis: list[MachinesAPI]) -> None:
    api = MachinesAPI()
    apis.append(api)
    first, second = stable_ports(2)
    for target in (first, second):
        api.start(target)
    proxy, port, admin = start_proxy(
        proxies, {"Start": {"URL": api.url("start")}, "Stop": {"URL": api.url("stop")},
                  "StopAfter": 0.4, "MinRunning": 1},
        [f"{HOST}:{first}", f"{HOST}:{second}"])
    wait_until(lambda: sorted(states(admin)) == ["stopped", "up"])
    wait_until(lambda: len(api.running()) == 1)  # the stop hook may still be on its way
    assert api.count("stop") == 1
    # And the proxy still serves, through the one left running.
    assert echo_once(port, b"still here") == b"still here"
    wait_until(lambda: 'rawproxy_machine_stops_total{app="m",result="ok"} 1'
               in admin_body(admin, "/metrics"))


def test_a_client_racing_a_stop_waits_and_the_machine_starts_again(
        proxies: ProxyFactory, apis: list[MachinesAPI]) -> None:
    api = MachinesAPI(stop_delay_s=0.5)
    apis.append(api)
    (target,) = stable_ports(1)
    api.start(target)
    proxy, port, admin = start_proxy(
        proxies, {"Start": {"URL": api.url("start")}, "Stop": {"URL": api.url("stop")},
                  "StopAfter": 0.3},
        [f"{HOST}:{target}"])
    wait_until(lambda: api.count("stop") == 1, timeout_s=10)
    # The stop is in flight (its answer takes 0.5 s): the client waits for
    # it, then for a start, and nothing is lost.
    payload = os.urandom(10_000)
    assert echo_once(port, payload) == payload
    assert api.count("start") == 1
    proxy.wait_for_line(r"machine stopped")
    proxy.stop()
    assert not proxy.count_lines(r"end=(start-failed|start-timeout|connect-failed)")


def test_a_stopped_target_fails_over_to_a_running_one_without_a_start(
        proxies: ProxyFactory, apis: list[MachinesAPI], backend: Any) -> None:
    api = MachinesAPI()
    apis.append(api)
    running: Backend = backend()
    (stopped,) = stable_ports(1)
    proxy, port, admin = start_proxy(proxies, {"Start": {"URL": api.url("start")}},
                                     [f"{HOST}:{stopped}", running.address])
    for _ in range(10):
        assert echo_once(port, b"x") == b"x"
    assert api.count("start") == 0


def test_workers_make_one_start_for_the_whole_process(
        proxies: ProxyFactory, apis: list[MachinesAPI]) -> None:
    api = MachinesAPI(listen_delay_s=0.5)
    apis.append(api)
    (target,) = stable_ports(1)
    proxy, ports = proxies.start(
        [{"Name": "m", "Ports": 1, "Targets": [f"{HOST}:{target}"],
          "Machines": {"Start": {"URL": api.url("start")}}}], "--workers", "4")
    wait_until(lambda: proxy.count_lines("supervising 4 workers") == 1, timeout_s=30)
    port = ports["m"][0]
    results: list[bool] = []

    def client(index: int) -> None:
        payload = f"worker client {index}".encode()
        results.append(echo_once(port, payload) == payload)

    threads = [threading.Thread(target=client, args=(i,)) for i in range(40)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    assert results == [True] * 40
    assert api.count("start") == 1
    assert proxy.count_lines(r"start hook accepted") == 1
    # More than one worker had clients waiting (SO_REUSEPORT spreads 40
    # connections over 4 listeners), and they all waited on the one start.
    assert proxy.count_lines(r"starting its machine") >= 2


def test_a_reload_that_removes_a_starting_target_closes_its_clients(
        proxies: ProxyFactory, apis: list[MachinesAPI]) -> None:
    """Nothing would ever finish that start: its clients (and the app's later
    ones, which join a start in progress) must not wait on it."""
    api = MachinesAPI(mode="hang")
    apis.append(api)
    old_target, new_target = stable_ports(2)
    proxy, port, _ = start_proxy(proxies, {"Start": {"URL": api.url("start")},
                                           "StartTimeout": 60}, [f"{HOST}:{old_target}"])
    waiting = connect(port)
    waiting.sendall(b"early")
    wait_until(lambda: api.count("start") == 1)
    document = json.loads(proxy.config_path.read_text())
    document["Apps"][0]["Targets"] = [f"{HOST}:{new_target}"]
    proxy.config_path.write_text(json.dumps(document))
    proxy.signal(signal.SIGHUP)
    waiting.settimeout(10)  # far below StartTimeout: only the reload can end it
    try:
        assert waiting.recv(10) == b""
    except ConnectionResetError:
        pass
    finally:
        waiting.close()
    proxy.wait_for_line(r"removed by a reload while starting")
    proxy.wait_for_line(r"end=start-failed")


def test_a_client_waiting_across_a_reload_is_served_when_the_machine_is_up(
        proxies: ProxyFactory, apis: list[MachinesAPI]) -> None:
    """A reload gives the app a new balancer; the client, accepted before it,
    still holds the old one, which must learn the machine is up too."""
    api = MachinesAPI(listen_delay_s=1.5)
    apis.append(api)
    (target,) = stable_ports(1)
    proxy, port, _ = start_proxy(proxies, {"Start": {"URL": api.url("start")}},
                                 [f"{HOST}:{target}"])
    with connect(port) as sock:
        sock.sendall(b"across a reload")
        wait_until(lambda: api.count("start") == 1)
        proxy.signal(signal.SIGHUP)
        proxy.wait_for_line(r"config reloaded")
        assert recv_exactly(sock, len(b"across a reload")) == b"across a reload"
    assert api.count("start") == 1
