"""``--workers N``: processes sharing the ports under a supervisor."""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable

from prometheus_client.parser import text_string_to_metric_families

from rawproxy.supervisor import CONTROL_TIMEOUT_S
from tests.support import (HOST, Backend, ProxyFactory, ProxyProcess, admin_body, connect,
                           dead_port, free_ports, recv_exactly, recv_until_eof, stable_ports,
                           wait_until)

BackendFactory = Callable[..., Backend]


def echo(port: int, payload: bytes = b"ping") -> bytes:
    with connect(port) as sock:
        sock.sendall(payload)
        sock.shutdown(socket.SHUT_WR)
        return recv_until_eof(sock)


def worker_pids(proxy: ProxyProcess) -> dict[int, int]:
    pids: dict[int, int] = {}
    for line in list(proxy.lines):
        match = re.search(r"worker (\d+) started \(pid (\d+)\)", line)
        if match:
            pids[int(match.group(1))] = int(match.group(2))
    return pids



def test_two_workers_share_the_ports_and_the_metrics(proxies: ProxyFactory,
                                                     backend: BackendFactory) -> None:
    (admin,) = stable_ports(1)
    proxy, ports = proxies.start([{"Name": "a", "Ports": 2, "Targets": [backend().address]}],
                                 "--workers", "2", "--admin", f"{HOST}:{admin}")
    wait_until(lambda: len(worker_pids(proxy)) == 2)
    wait_until(lambda: proxy.count_lines("supervising 2 workers") == 1)
    for index in range(200):
        assert echo(ports["a"][index % 2], b"%d" % index) == b"%d" % index
    accepted: dict[str, float] = {}
    slots: dict[str, float] = {}
    for family in text_string_to_metric_families(admin_body(admin, "/metrics")):
        for sample in family.samples:
            if sample.name == "rawproxy_connections_accepted_total":
                accepted[sample.labels["worker"]] = sample.value
            if sample.name == "rawproxy_counter_slots_used":
                slots[sample.labels["worker"]] = sample.value
    assert slots == {"0": 2, "1": 2}  # one block: the app and its target
    assert set(accepted) == {"0", "1"}
    assert sum(accepted.values()) == 200
    assert min(accepted.values()) > 0, f"one worker took every connection: {accepted}"
    views = json.loads(admin_body(admin, "/config"))["Workers"]
    assert [view["Apps"][0]["Name"] for view in views] == ["a", "a"]


def test_signals_reach_every_worker(proxies: ProxyFactory, backend: BackendFactory) -> None:
    proxy, ports = proxies.start([{"Name": "a", "Ports": 1, "Targets": [backend().address]}],
                                 "--workers", "2")
    wait_until(lambda: proxy.count_lines("supervising 2 workers") == 1)
    proxy.signal(signal.SIGHUP)
    wait_until(lambda: proxy.count_lines("config reloaded") == 2,
               message="both workers to reload")
    assert echo(ports["a"][0]) == b"ping"
    proxy.signal(signal.SIGTERM)
    assert proxy.wait() == 0
    assert proxy.count_lines(r"draining \d+ connections") == 2
    for pid in worker_pids(proxy).values():
        assert not os.path.exists(f"/proc/{pid}"), "a worker outlived the supervisor"


def test_a_dead_worker_is_restarted(proxies: ProxyFactory, backend: BackendFactory) -> None:
    proxy, ports = proxies.start([{"Name": "a", "Ports": 1, "Targets": [backend().address]}],
                                 "--workers", "2")
    wait_until(lambda: len(worker_pids(proxy)) == 2)
    victim = worker_pids(proxy)[0]
    os.kill(victim, signal.SIGKILL)
    proxy.wait_for_line(r"worker 0 exited unexpectedly")
    wait_until(lambda: worker_pids(proxy)[0] != victim, message="worker 0 to be restarted")
    for _ in range(20):
        assert echo(ports["a"][0]) == b"ping"


def test_workers_report_a_busy_port_once_and_exit_1(tmp_path: Path) -> None:
    squatter = socket.socket()
    squatter.bind((HOST, 0))
    squatter.listen(1)
    try:
        path = tmp_path / "c.json"
        path.write_text(json.dumps({"Apps": [{"Name": "a", "Ports": [squatter.getsockname()[1]],
                                              "Targets": ["127.0.0.1:9"]}]}))
        result = subprocess.run([sys.executable, "rawproxy.py", "--config", str(path),
                                 "--listen-host", HOST, "--workers", "3",
                                 "--log-level", "error"],
                                cwd=str(Path(__file__).resolve().parents[2]),
                                capture_output=True, text=True, timeout=60)
        assert result.returncode == 1
        errors = [line for line in result.stderr.splitlines() if "rawproxy: error:" in line]
        assert len(errors) == 1 and "Address already in use" in errors[0]
    finally:
        squatter.close()


def test_a_restarted_worker_serves_the_reloaded_config(proxies: ProxyFactory,
                                                       backend: BackendFactory) -> None:
    (admin,) = stable_ports(1)
    target = backend().address
    proxy, ports = proxies.start([{"Name": "a", "Ports": 1, "Targets": [target]}],
                                 "--workers", "2", "--admin", f"{HOST}:{admin}")
    wait_until(lambda: proxy.count_lines("supervising 2 workers") == 1)
    (added,) = stable_ports(1)  # bound by the reload, later
    proxy.config_path.write_text(json.dumps({"Apps": [
        {"Name": "a", "Ports": [ports["a"][0], added], "Targets": [target]}]}))
    proxy.signal(signal.SIGHUP)
    wait_until(lambda: proxy.count_lines("config reloaded") == 2)
    victim = worker_pids(proxy)[0]
    os.kill(victim, signal.SIGKILL)
    wait_until(lambda: worker_pids(proxy)[0] != victim and
               proxy.count_lines(r"worker 0 started") == 2)

    def ports_of_each_worker() -> list[object]:
        views = json.loads(admin_body(admin, "/config"))["Workers"]
        return [view and view["Apps"][0]["Ports"] for view in views]

    wait_until(lambda: ports_of_each_worker() == [[ports["a"][0], added]] * 2,
               message="both workers to serve the reloaded ports")


def test_a_busy_admin_port_is_one_error_before_any_worker(tmp_path: Path) -> None:
    squatter = socket.socket()
    squatter.bind((HOST, 0))
    squatter.listen(1)
    try:
        (port,) = free_ports(1)
        path = tmp_path / "c.json"
        path.write_text(json.dumps({"Apps": [{"Name": "a", "Ports": [port],
                                              "Targets": ["127.0.0.1:9"]}]}))
        result = subprocess.run([sys.executable, "rawproxy.py", "--config", str(path),
                                 "--listen-host", HOST, "--workers", "2", "--log-level", "error",
                                 "--admin", f"{HOST}:{squatter.getsockname()[1]}"],
                                cwd=str(Path(__file__).resolve().parents[2]),
                                capture_output=True, text=True, timeout=60)
        assert result.returncode == 1
        assert result.stderr.strip().splitlines() == [
            f"rawproxy: error: cannot listen on {HOST}:{squatter.getsockname()[1]} "
            "(admin endpoint): Address already in use"]
    finally:
        squatter.close()


def test_a_target_one_worker_finds_dead_is_skipped_by_the_others(
        proxies: ProxyFactory, backend: BackendFactory) -> None:
    live = backend().address
    dead = f"{HOST}:{dead_port()}"

    def sibling_marked_it_down(admin: int) -> bool:
        views = json.loads(admin_body(admin, "/config"))["Workers"]
        targets = [next(t for t in view["Apps"][0]["Status"]["Targets"]
                        if t["Address"] == dead)
                   for view in views]
        # Down in a worker that never failed to reach it: told, not tried.
        return any(not t["Up"] and t["ConsecutiveFailures"] == 0 for t in targets)

    # The passive back-off after one failure is 1 s: the sibling must be seen
    # to know within it.  A fresh proxy per attempt, in case a loaded machine
    # stalls this test past the window.
    for _attempt in range(3):
        (admin,) = stable_ports(1)
        # The dead target is the first pick of every worker, until one learns.
        proxy, ports = proxies.start(
            [{"Name": "a", "Ports": 1,
              "Targets": [{"Address": dead, "Weight": 1_000_000}, live]}],
            "--workers", "2", "--admin", f"{HOST}:{admin}")
        wait_until(lambda: proxy.count_lines("supervising 2 workers") == 1)
        assert echo(ports["a"][0]) == b"ping"  # one worker fails over, then tells
        try:
            wait_until(lambda: sibling_marked_it_down(admin), timeout_s=1.0, interval_s=0.01)
            return
        except AssertionError:
            assert proxy.stop() == 0
    raise AssertionError("no worker learnt of the dead target from its sibling")


def test_a_stop_signal_to_the_process_group_drains(proxies: ProxyFactory,
                                                   backend: BackendFactory) -> None:
    # Ctrl-C and systemd's KillMode=control-group signal every process of the
    # group: the workers must not take the supervisor's relay for a second one.
    proxy, ports = proxies.start([{"Name": "a", "Ports": 1, "Targets": [backend().address]}],
                                 "--workers", "2", wrapper=["setsid"])
    wait_until(lambda: proxy.count_lines("supervising 2 workers") == 1)
    assert os.getpgid(proxy.pid) == proxy.pid != os.getpgrp()  # its own group, not ours
    with connect(ports["a"][0]) as sock:
        sock.sendall(b"before")
        assert recv_exactly(sock, 6) == b"before"
        os.killpg(proxy.pid, signal.SIGTERM)
        wait_until(lambda: proxy.count_lines(r"draining \d+ connections") == 2,
                   message="both workers to drain")
        sock.sendall(b"during the drain")
        sock.shutdown(socket.SHUT_WR)
        assert recv_until_eof(sock) == b"during the drain"
    assert proxy.wait() == 0
    assert proxy.count_lines("second stop signal") == 0


def test_a_restarted_worker_keeps_the_last_accepted_config_after_a_rejected_edit(
        proxies: ProxyFactory, backend: BackendFactory) -> None:
    (admin,) = stable_ports(1)
    target = backend().address
    proxy, ports = proxies.start([{"Name": "a", "Ports": 1, "Targets": [target]}],
                                 "--workers", "2", "--admin", f"{HOST}:{admin}")
    wait_until(lambda: proxy.count_lines("supervising 2 workers") == 1)
    (added,) = stable_ports(1)
    accepted = [ports["a"][0], added]
    proxy.config_path.write_text(json.dumps({"Apps": [
        {"Name": "a", "Ports": accepted, "Targets": [target]}]}))
    proxy.signal(signal.SIGHUP)
    wait_until(lambda: proxy.count_lines("config reloaded") == 2)
    proxy.config_path.write_text('{"Apps": [')  # a bad edit: rejected by both
    proxy.signal(signal.SIGHUP)
    wait_until(lambda: proxy.count_lines("reload .* rejected") == 2)
    victim = worker_pids(proxy)[0]
    os.kill(victim, signal.SIGKILL)
    wait_until(lambda: proxy.count_lines(r"worker 0 started") == 2)

    def ports_of_each_worker() -> list[object]:
        views = json.loads(admin_body(admin, "/config"))["Workers"]
        return [view and view["Apps"][0]["Ports"] for view in views]

    wait_until(lambda: ports_of_each_worker() == [accepted] * 2,
               message="the restarted worker to serve the last accepted config")


def test_metrics_answer_within_one_deadline_when_workers_are_stuck(
        proxies: ProxyFactory, backend: BackendFactory) -> None:
    (admin,) = stable_ports(1)
    proxy, _ = proxies.start([{"Name": "a", "Ports": 1, "Targets": [backend().address]}],
                             "--workers", "4", "--admin", f"{HOST}:{admin}")
    wait_until(lambda: proxy.count_lines("supervising 4 workers") == 1)
    pids = worker_pids(proxy)
    stuck = [pids[1], pids[3]]
    for pid in stuck:
        os.kill(pid, signal.SIGSTOP)
    try:
        started = time.monotonic()
        text = admin_body(admin, "/metrics")
        elapsed = time.monotonic() - started
    finally:
        for pid in stuck:
            os.kill(pid, signal.SIGCONT)
    assert elapsed < CONTROL_TIMEOUT_S + 1.5 < 2 * CONTROL_TIMEOUT_S
    workers = {sample.labels["worker"]
               for family in text_string_to_metric_families(text)
               for sample in family.samples if "worker" in sample.labels}
    assert workers == {"0", "2"}


def _cpu_seconds(pids: list[int]) -> float:
    total = 0
    for pid in pids:
        with open(f"/proc/{pid}/stat") as stat:
            fields = stat.read().rsplit(")", 1)[1].split()
        total += int(fields[11]) + int(fields[12])  # utime, stime
    return total / os.sysconf("SC_CLK_TCK")


def test_workers_at_max_connections_sleep_while_clients_wait(
        proxies: ProxyFactory, backend: BackendFactory) -> None:
    proxy, ports = proxies.start([{"Name": "a", "Ports": 1, "MaxConnections": 1,
                                   "Targets": [backend().address]}], "--workers", "2")
    wait_until(lambda: len(worker_pids(proxy)) == 2)
    wait_until(lambda: proxy.count_lines("supervising 2 workers") == 1)
    port = ports["a"][0]
    held = connect(port)
    held.sendall(b"held")
    assert recv_exactly(held, 4) == b"held"
    waiting = [connect(port) for _ in range(20)]
    try:
        for sock in waiting:
            sock.sendall(b"w")
        pids = list(worker_pids(proxy).values())
        before = _cpu_seconds(pids)
        time.sleep(2.0)  # a measuring window, not a wait for a condition
        spent = _cpu_seconds(pids) - before
        assert spent < 0.3, f"workers spun while clients waited: {spent:.2f} CPU-s in 2 s"
        for sock in waiting:  # each is done as soon as it is served
            sock.shutdown(socket.SHUT_WR)
        held.close()
        for sock in waiting:  # served one at a time as slots free
            assert recv_until_eof(sock) == b"w"
            sock.close()
    finally:
        held.close()
        for sock in waiting:
            sock.close()
