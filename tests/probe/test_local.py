"""Local mode against the real rawproxy: it passes, fails over, and cleans up."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any, Optional

import pytest

from probe.checks import Options, Planner
from probe.config import App
from probe.echo import EchoServer
from probe.framing import encode
from probe.scenario import run_local
from tests.support import REPO, pid_running, recv_until_eof, wait_until

TIMEOUT_S = 90.0   # below pytest's own timeout, so stop_probe() gets to run


def run_probe(*args: str) -> subprocess.CompletedProcess[str]:
    argv = [sys.executable, "-m", "probe", *args]
    probe = subprocess.Popen(argv, cwd=str(REPO), stdin=subprocess.DEVNULL,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        out, err = probe.communicate(timeout=TIMEOUT_S)
    finally:
        stop_probe(probe)
    return subprocess.CompletedProcess(argv, probe.returncode, out, err)


def stop_probe(probe: subprocess.Popen[str]) -> None:
    """Stop a probe that is still running, and what it started.  Not with
    SIGKILL first (subprocess.run's way on a timeout): that leaves its proxy
    running for good.  SIGTERM makes it stop everything; only if it does not
    exit, SIGKILL to it and then to its proxy."""
    if probe.poll() is not None:
        return
    found = proxy_of(probe.pid)
    probe.send_signal(signal.SIGTERM)
    try:
        probe.communicate(timeout=30)
    except subprocess.TimeoutExpired:
        found = proxy_of(probe.pid) or found
        probe.kill()
        probe.communicate(timeout=10)
    if found is not None and pid_running(found[0]):
        os.kill(found[0], signal.SIGKILL)


def test_make_probe_passes_on_the_shipped_config() -> None:
    done = run_probe("--local", "--config", str(REPO / "config.json"),
                     "--down", "bad.target.for.testing:6003", "--json")
    assert done.returncode == 0, done.stdout + done.stderr
    report = json.loads(done.stdout)
    assert report["ok"] is True
    config = json.loads((REPO / "config.json").read_text())
    ports = [p for app in config["Apps"] for p in app["Ports"]]
    assert sorted(map(int, report["port_map"])) == sorted(ports)
    assert len(set(report["port_map"].values())) == len(ports)
    assert len(report["phases"]) == 3
    for phase in report["phases"][:2]:
        assert [p["port"] for p in phase["ports"]] == ports
        assert all(p["passed"] and p["connections"] == 4 for p in phase["ports"])
        assert all(p["bytes_verified"] > 1 << 20 for p in phase["ports"])
    spread = {row["target"]: row for row in report["spread"]}
    assert spread["bad.target.for.testing:6003"]["counts"] == [0, 0]
    assert spread["bad.target.for.testing:6003"]["state"] == "down: nothing listens"
    stopped = [row for row in report["spread"] if row["state"] == "stopped after phase 1"]
    assert sorted(row["app"] for row in stopped) == sorted(a["Name"] for a in config["Apps"])
    for app in config["Apps"]:
        rows = [row for row in report["spread"] if row["app"] == app["Name"]]
        assert sum(row["counts"][0] for row in rows) == 4 * len(app["Ports"])
        assert sum(row["counts"][1] for row in rows if row["state"] == "up") == 4 * len(
            app["Ports"])
    assert [(c["name"], c["passed"]) for c in report["checks"]] == [
        ("isolation", True), ("failover", True), ("autostart", True), ("proxy", True)]
    # Phase 3: the autostart app, whose machine the first connection started.
    [autostart] = report["phases"][2]["ports"]
    assert autostart["app"] == "probe-autostart" and autostart["passed"]
    assert "1 Start hook call" in report["phases"][2]["title"]


def test_local_mode_keeps_optional_keys_and_resolves_no_name(
        monkeypatch: pytest.MonkeyPatch) -> None:
    asked: list[Any] = []
    real = socket.getaddrinfo

    def spy(host: Any, *args: Any, **kwargs: Any) -> Any:
        asked.append(host)
        return real(host, *args, **kwargs)

    monkeypatch.setattr(socket, "getaddrinfo", spy)
    raw = {"Apps": [{"Name": "w", "Ports": [5001, 5002], "ConnectTimeout": 1,
                     "IdleTimeout": 30, "MaxConnections": 50,
                     "Targets": ["a.invalid:1", {"Address": "b.invalid:2", "Weight": 3},
                                 "[2001:db8::1]:3"]}]}
    apps = [App("w", (5001, 5002), ("a.invalid:1", "b.invalid:2", "[2001:db8::1]:3"))]
    report = run_local(apps, raw, frozenset({"[2001:db8::1]:3"}), REPO / "rawproxy.py",
                       Options(connections=2, frames=3, max_frame=4096), Planner(7))
    assert report.ok, ([r.reason for r in report.results if not r.passed]
                       + [str(c) for c in report.checks if not c.passed])
    assert set(asked) == {"127.0.0.1"}
    assert [row.state for row in report.spread] == [
        "stopped after phase 1", "up", "down: nothing listens"]
    assert sum(report.spread[1].counts) + report.spread[0].counts[0] == 8


def test_a_proxy_that_does_not_start_is_an_error(tmp_path: Path) -> None:
    launcher = tmp_path / "broken.py"
    launcher.write_text("import sys\nsys.exit('broken: cannot start')\n")
    done = run_probe("--local", "--config", str(REPO / "config.json"), "--proxy", str(launcher))
    assert done.returncode == 1
    assert "probe: error: rawproxy did not start" in done.stderr
    assert "broken: cannot start" in done.stderr


def children(pid: int) -> list[int]:
    found: list[int] = []
    if not os.path.isdir("/proc"):
        return found
    for entry in os.listdir("/proc"):
        try:
            with open(f"/proc/{entry}/stat") as stat:
                fields = stat.read().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue
        if int(fields[1]) == pid:
            found.append(int(entry))
    return found


def proxy_of(pid: int) -> Optional[tuple[int, Path]]:
    """The rawproxy child of ``pid`` and its config, once it runs rawproxy (a
    child just forked still runs a copy of the probe, with the probe's argv)."""
    for child in children(pid):
        try:
            cmdline = Path(f"/proc/{child}/cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if any(arg.endswith(b"rawproxy.py") for arg in cmdline) and b"--config" in cmdline:
            return child, Path(cmdline[cmdline.index(b"--config") + 1].decode())
    return None


@pytest.mark.skipif(not os.path.isdir("/proc"), reason="needs /proc")
@pytest.mark.parametrize("inherited", ["default", "ignored"])
def test_ctrl_c_stops_everything_it_started(inherited: str) -> None:
    # "ignored": started as `probe &` from a script is (SIGINT inherited
    # ignored); the probe used to stay deaf to it and run its 60 s.
    argv = [sys.executable, "-m", "probe", "--local", "--config", str(REPO / "config.json"),
            "--duration", "60", "--json"]
    if inherited == "ignored":
        argv = ["sh", "-c", "trap '' INT; exec \"$@\"", "sh", *argv]
    probe = subprocess.Popen(argv, cwd=str(REPO), stdin=subprocess.DEVNULL,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    proxy = None
    try:
        wait_until(lambda: proxy_of(probe.pid) is not None, timeout_s=60,
                   message="the proxy to start")
        found = proxy_of(probe.pid)
        assert found is not None
        proxy, config_path = found

        def serving() -> bool:
            try:
                port = json.loads(config_path.read_text())["Apps"][0]["Ports"][0]
                with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
                    sock.sendall(encode(1, 0, 1))
                    sock.shutdown(socket.SHUT_WR)
                    return recv_until_eof(sock) == encode(1, 0, 1)
            except (OSError, ValueError):
                return False

        wait_until(serving, timeout_s=60, message="the proxy to serve")
        probe.send_signal(signal.SIGINT)
        _, err = probe.communicate(timeout=30)
        assert probe.returncode == 130, err
        assert "interrupted" in err
        assert not pid_running(proxy)
        assert not config_path.exists()
    finally:   # never leave anything to outlive the test
        stop_probe(probe)
        if proxy is not None and pid_running(proxy):
            os.kill(proxy, signal.SIGKILL)


def test_echo_backends_echo_until_eof_and_count() -> None:
    server = EchoServer()
    try:
        first, second = server.add(), server.add()
        with socket.create_connection(("127.0.0.1", first.port), timeout=5) as sock:
            frame = encode(0xABCDEF, 0, 100_000)
            sock.sendall(frame)
            sock.shutdown(socket.SHUT_WR)
            sock.settimeout(5)
            assert recv_until_eof(sock) == frame
        socket.create_connection(("127.0.0.1", second.port), timeout=5).close()
        wait_until(lambda: server.snapshot(first) == (1, (0xABCDEF,)))
        assert server.snapshot(second) == (0, ())   # no byte: not counted as served
        server.stop(first)
        with pytest.raises(ConnectionRefusedError):
            socket.create_connection(("127.0.0.1", first.port), timeout=5)
    finally:
        server.close()
