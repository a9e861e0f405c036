"""The command line contract: exit codes, one-line errors, --check (SPEC 1, 3)."""

from __future__ import annotations

import json
import re
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from rawproxy import __version__
from tests.support import HOST, REPO, ProxyFactory, proxy_argv, run_cli


def assert_one_line_error(stderr: str, *fragments: str) -> None:
    lines = stderr.strip().splitlines()
    assert len(lines) == 1, f"expected one line, got:\n{stderr}"
    assert lines[0].startswith("rawproxy: error: ")
    assert "Traceback" not in stderr
    for fragment in fragments:
        assert fragment in lines[0]


def test_check_accepts_the_shipped_config_and_binds_nothing() -> None:
    result = run_cli("--check")  # default path: config.json in the working directory
    assert result.returncode == 0, result.stderr
    assert "five-thousand" in result.stdout and "bad.target.for.testing:6003" in result.stdout
    assert "3 apps, 12 ports, 7 targets" in result.stdout
    assert result.stderr == ""


def test_config_and_etcd_together_are_a_usage_error() -> None:
    # --etcd replaces --config (SPEC 11): a file named as well would be ignored.
    result = run_cli("--check", "--config", "config.json", "--etcd", f"http://{HOST}:1")
    assert result.returncode == 2
    assert_one_line_error(result.stderr, "--config and --etcd cannot be used together")


def test_invalid_config_exits_2_with_the_spec_message(tmp_path: Path) -> None:
    config = json.loads((REPO / "config.json").read_text())
    config["Apps"][1]["Ports"][2] = 70000
    (tmp_path / "config.json").write_text(json.dumps(config))
    for extra in ([], ["--check"]):
        result = run_cli("--config", "config.json", *extra, cwd=tmp_path)
        assert result.returncode == 2
        assert_one_line_error(
            result.stderr,
            'config.json: Apps[1] "six-thousand" Ports[2]: 70000 is not a port (1-65535)')


@pytest.mark.parametrize("text, fragment", [
    ('{"Apps": [', "invalid JSON at line 1 column"),
    ('{"Apps": [{"Name": "a", "Ports": [1], "Target": ["h:1"]}]}', 'unknown key "Target"'),
    ('{"Apps": []}', "Apps"),
])
def test_bad_files_exit_2_without_traceback(tmp_path: Path, text: str, fragment: str) -> None:
    path = tmp_path / "c.json"
    path.write_text(text)
    result = run_cli("--config", str(path))
    assert result.returncode == 2
    assert_one_line_error(result.stderr, fragment)


def test_missing_config_file_exits_2(tmp_path: Path) -> None:
    result = run_cli("--config", str(tmp_path / "nope.json"))
    assert result.returncode == 2
    assert_one_line_error(result.stderr, "nope.json", "No such file")


@pytest.mark.parametrize("args", [["--bogus"], ["--log-level", "loud"],
                                  ["--drain-timeout", "soon"]])
def test_usage_errors_exit_2_on_one_line(args: list[str]) -> None:
    result = run_cli(*args)
    assert result.returncode == 2
    assert_one_line_error(result.stderr)


def test_version_and_help() -> None:
    version = run_cli("--version")
    assert version.returncode == 0 and version.stdout.strip() == f"rawproxy {__version__}"
    helptext = run_cli("--help")
    assert helptext.returncode == 0
    for option in ("--config", "--listen-host", "--drain-timeout", "--log-level",
                   "--check", "--version"):
        assert option in helptext.stdout


def test_python_dash_m_runs_the_same_cli() -> None:
    result = subprocess.run([sys.executable, "-m", "rawproxy", "--check"], cwd=str(REPO),
                            capture_output=True, text=True, timeout=30)
    assert result.returncode == 0
    assert "3 apps, 12 ports, 7 targets" in result.stdout


def test_port_in_use_exits_1_naming_port_and_app(tmp_path: Path) -> None:
    squatter = socket.socket()
    squatter.bind((HOST, 0))
    squatter.listen(1)
    busy = squatter.getsockname()[1]
    free = socket.socket()
    free.bind((HOST, 0))
    free_port = free.getsockname()[1]
    free.close()
    try:
        path = tmp_path / "c.json"
        path.write_text(json.dumps({"Apps": [
            {"Name": "first", "Ports": [free_port], "Targets": ["127.0.0.1:9"]},
            {"Name": "taken", "Ports": [busy], "Targets": ["127.0.0.1:9"]}]}))
        result = subprocess.run(proxy_argv(path), capture_output=True, text=True, timeout=30)
        assert result.returncode == 1
        last = result.stderr.strip().splitlines()[-1]
        assert last.startswith("rawproxy: error: ")
        assert f"port {busy}" in last and '"taken"' in last and "Address already in use" in last
        assert "Traceback" not in result.stderr
    finally:
        squatter.close()


def test_sigint_and_sigterm_exit_zero(proxies: ProxyFactory) -> None:
    for signum in (signal.SIGINT, signal.SIGTERM):
        proxy, _ = proxies.start([{"Name": "a", "Ports": 1, "Targets": ["127.0.0.1:9"]}])
        proxy.signal(signum)
        assert proxy.wait() == 0
        assert any("stopped" in line for line in proxy.lines)


def test_second_signal_exits_at_once(proxies: ProxyFactory) -> None:
    listener = socket.socket()
    listener.bind((HOST, 0))
    listener.listen(1)
    try:
        proxy, ports = proxies.start([{"Name": "a", "Ports": 1, "Targets": [
            f"{HOST}:{listener.getsockname()[1]}"]}], "--drain-timeout", "600")
        with socket.create_connection((HOST, ports["a"][0]), timeout=10) as client:
            client.sendall(b"x")
            listener.settimeout(10)
            conn, _ = listener.accept()
            with conn:
                proxy.signal(signal.SIGTERM)
                proxy.wait_for_line("draining 1 connections")
                proxy.signal(signal.SIGTERM)
                assert proxy.wait(10) == 0  # not the 600 s drain
    finally:
        listener.close()



def test_relay_path_is_chosen_and_logged(proxies: ProxyFactory) -> None:
    from rawproxy.pipes import splice_available
    proxy, _ = proxies.start([{"Name": "a", "Ports": 1, "Targets": ["127.0.0.1:9"]}])
    expected = "splice (zero-copy)" if splice_available() else "recv_into/send (copy)"
    proxy.wait_for_line(f"relaying with {re.escape(expected)}")
    copying, _ = proxies.start([{"Name": "a", "Ports": 1, "Targets": ["127.0.0.1:9"]}],
                               "--no-splice")
    copying.wait_for_line(r"relaying with recv_into/send \(copy\)")


# Issue #18: a timer past ~24.8 days overflows epoll's int of milliseconds and
# crashed the loop; the options are bounded like the config's timeouts (7 days).
@pytest.mark.parametrize("args, fragment", [
    (["--drain-timeout", "3000000"], "--drain-timeout: '3000000' must be"),
    (["--half-open-timeout", "3000000"], "--half-open-timeout: '3000000' must be"),
    (["--drain-timeout", "604800.5"], "at most 604800"),
    (["--half-open-timeout", "0"], "--half-open-timeout: '0' must be a number > 0"),
    (["--half-open-timeout", "1e400"], "--half-open-timeout"),
    (["--drain-timeout", "-0.5"], "--drain-timeout"),
    (["--drain-timeout", "nan"], "--drain-timeout"),
    (["--drain-timeout", ""], "--drain-timeout: '' is not a number of seconds"),
])
def test_timeouts_past_the_config_bound_are_usage_errors(args: list[str],
                                                         fragment: str) -> None:
    result = run_cli("--check", *args)
    assert result.returncode == 2, result.stdout
    assert_one_line_error(result.stderr, fragment)


def test_timeouts_up_to_seven_days_are_accepted() -> None:
    result = run_cli("--check", "--drain-timeout", "604800", "--half-open-timeout", "604800",
                     "--drain-timeout", "0")
    assert result.returncode == 0, result.stderr


@pytest.mark.parametrize("args, fragment", [
    (["--admin", ":0"], "--admin: ':0' is not HOST:PORT"),
    (["--admin", "[::1]:x"], "is not HOST:PORT"),
    (["--admin", f"{HOST}:70000"], "is not HOST:PORT"),
    (["--admin", f"{HOST}:"], "is not HOST:PORT"),
    (["--admin", f"{HOST}:-1"], "is not HOST:PORT"),
    (["--admin", f"{HOST}:\u00b2"], "is not HOST:PORT"),        # superscript two: isdigit()
    (["--admin", f"{HOST}:\u0663"], "is not HOST:PORT"),        # Arabic-Indic three
    (["--admin", "a..b:1"], "'a..b' is not an IP address"),     # was a UnicodeError traceback
    (["--admin", "[::1:80"], "is not an IP address"),
    (["--admin", "::1]:0"], "is not an IP address"),
    (["--admin", "localhost:0"], "is not an IP address"),       # bound numerically only
    (["--admin", "1.2.3.4.5:0"], "is not an IP address"),
    (["--listen-host", ""], "--listen-host: '' is not an IP address"),
    (["--listen-host", "a..b"], "is not an IP address"),
    (["--listen-host", "999.1.1.1"], "is not an IP address"),
    (["--listen-host", "[::1]"], "is not an IP address"),
    (["--workers", "\u00b2"], "is not a number of workers"),
    (["--workers", "\u0663"], "is not a number of workers"),
])
def test_hostile_option_values_are_usage_errors(args: list[str], fragment: str) -> None:
    result = run_cli("--check", *args)
    assert result.returncode == 2, result.stdout
    assert_one_line_error(result.stderr, fragment)


@pytest.mark.parametrize("value", [f"{HOST}:0", "[::1]:9100", "::1:9100", "0.0.0.0:65535",
                                   "[fe80::1%lo]:0"])
def test_admin_accepts_ip_literals(value: str) -> None:
    result = run_cli("--check", "--admin", value, "--listen-host", "::")
    assert result.returncode == 0, result.stderr


@pytest.mark.parametrize("args, fragment", [
    (["--user", "no-such-user-rawproxy"], "--user: no such user 'no-such-user-rawproxy'"),
    (["--group", "no-such-group-rawproxy"], "--group: no such group"),
    (["--etcd-prefix", "/other/"], "--etcd-prefix needs --etcd"),
    (["--etcd-cache", "cache.json"], "--etcd-cache needs --etcd"),
    (["--etcd-user", "u", "--etcd-password-file", "p"], "--etcd-user needs --etcd"),
    (["--etcd-timeout", "2"], "--etcd-timeout needs --etcd"),
])
def test_check_validates_identity_and_etcd_options(args: list[str], fragment: str) -> None:
    result = run_cli("--check", *args)
    assert result.returncode == 2, result.stdout
    assert_one_line_error(result.stderr, fragment)
