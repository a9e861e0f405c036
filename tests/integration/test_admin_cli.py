"""The admin endpoint's options on a real proxy process: ``--admin unix:PATH``
and ``--admin-token-file``, for one process and for the ``--workers``
supervisor, their usage errors, and the admin listener out of descriptors
(issue #18: it used to spin at a full core logging a warning per turn)."""

from __future__ import annotations

import http.client
import os
import re
import resource
import shutil
import socket
import stat
import tempfile
from pathlib import Path
from typing import Callable, Iterator, Optional

import pytest

from tests.support import (HOST, Backend, ProxyFactory, ProxyProcess, proxy_argv, run_cli,
                           wait_until, write_config)

BackendFactory = Callable[..., Backend]
TOKEN = "t0ken-for-the-admin"


@pytest.fixture
def socket_dir() -> Iterator[Path]:
    path = Path(tempfile.mkdtemp(prefix="rpx-", dir="/tmp"))  # short: sun_path is 108 bytes
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def token_file(tmp_path: Path) -> Path:
    path = tmp_path / "admin-token"
    path.write_text(f"\n  {TOKEN}  \n")
    return path


def unix_get(path: Path, target: str, token: Optional[str] = None) -> tuple[int, bytes]:
    """HTTP over AF_UNIX with a plain socket: (status, body)."""
    header = f"Authorization: Bearer {token}\r\n" if token else ""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(10)
        sock.connect(str(path))
        sock.sendall(f"GET {target} HTTP/1.1\r\nHost: localhost\r\n{header}\r\n".encode())
        data = b""
        while True:
            chunk = sock.recv(65536)
            if not chunk:
                break
            data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    return int(head.split(b" ", 2)[1]), body


def tcp_get(port: int, target: str, token: Optional[str] = None) -> tuple[int, str]:
    conn = http.client.HTTPConnection(HOST, port, timeout=10)
    try:
        conn.request("GET", target, headers={"Authorization": f"Bearer {token}"} if token else {})
        response = conn.getresponse()
        return response.status, response.getheader("WWW-Authenticate") or ""
    finally:
        conn.close()


def assert_one_line_error(stderr: str, fragment: str) -> None:
    lines = stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("rawproxy: error: "), stderr
    assert fragment in lines[0], stderr


@pytest.mark.parametrize("content, fragment", [
    ("", "is empty"), ("  \n\n", "is empty"), ("two words", "printable ASCII without spaces")])
def test_unusable_token_files_are_usage_errors(tmp_path: Path, content: str,
                                               fragment: str) -> None:
    path = tmp_path / "token"
    path.write_text(content)
    result = run_cli("--check", "--admin", f"{HOST}:0", "--admin-token-file", str(path))
    assert result.returncode == 2
    assert_one_line_error(result.stderr, f"admin token file {path} {fragment}"
                          if "empty" in fragment else fragment)


def test_an_unreadable_token_file_is_a_usage_error(tmp_path: Path) -> None:
    missing = tmp_path / "missing"
    result = run_cli("--check", "--admin", f"{HOST}:0", "--admin-token-file", str(missing))
    assert result.returncode == 2
    assert_one_line_error(result.stderr, f"cannot read admin token file {missing}: "
                                         "No such file or directory")


def test_a_token_file_without_admin_is_a_usage_error(token_file: Path) -> None:
    result = run_cli("--check", "--admin-token-file", str(token_file))
    assert result.returncode == 2
    assert_one_line_error(result.stderr, "--admin-token-file needs --admin")


@pytest.mark.parametrize("value, fragment", [
    ("unix:", "names no socket path"), ("unix:/" + "a" * 200, "longer than 107 bytes")])
def test_bad_unix_admin_addresses_are_usage_errors(value: str, fragment: str) -> None:
    result = run_cli("--check", "--admin", value)
    assert result.returncode == 2
    assert_one_line_error(result.stderr, fragment)


@pytest.mark.parametrize("workers", ["1", "2"])
def test_unix_socket_with_a_token(proxies: ProxyFactory, backend: BackendFactory,
                                  socket_dir: Path, token_file: Path, workers: str) -> None:
    path = socket_dir / "admin.sock"
    proxy, _ = proxies.start([{"Name": "a", "Ports": 1, "Targets": [backend().address]}],
                             "--workers", workers, "--admin", f"unix:{path}",
                             "--admin-token-file", str(token_file))
    proxy.wait_for_line(re.escape(f"admin endpoint on unix:{path}"))
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    assert unix_get(path, "/healthz") == (200, b"ok\n")
    assert unix_get(path, "/metrics")[0] == 401
    assert unix_get(path, "/config", "wrong")[0] == 401
    status, body = unix_get(path, "/metrics", TOKEN)
    assert status == 200 and b'rawproxy_connections_accepted_total{' in body
    assert unix_get(path, "/", TOKEN)[1].startswith(b"<!doctype html>")
    assert proxy.stop() == 0
    assert not path.exists()  # removed at exit


def test_a_live_unix_socket_is_not_taken_over(proxies: ProxyFactory, backend: BackendFactory,
                                              socket_dir: Path) -> None:
    path = socket_dir / "admin.sock"
    apps = [{"Name": "a", "Ports": 1, "Targets": [backend().address]}]
    first, _ = proxies.start(apps, "--admin", f"unix:{path}")
    config = socket_dir / "second.json"
    write_config(config, apps)
    second = ProxyProcess(proxy_argv(config, "--admin", f"unix:{path}"), config)
    try:
        assert second.wait() == 1
        assert any(line == f"rawproxy: error: cannot listen on unix:{path} (admin endpoint): "
                           "Address already in use" for line in second.lines), second.lines
    finally:
        second.stop()
    assert unix_get(path, "/healthz") == (200, b"ok\n")  # the first still serves
    assert first.stop() == 0


def test_tcp_admin_with_a_token(proxies: ProxyFactory, backend: BackendFactory,
                                token_file: Path) -> None:
    proxy, _ = proxies.start([{"Name": "a", "Ports": 1, "Targets": [backend().address]}],
                             "--admin", f"{HOST}:0", "--admin-token-file", str(token_file))
    line = proxy.wait_for_line(r"admin endpoint on http://")
    port = int(re.search(r":(\d+)/", line).group(1))  # type: ignore[union-attr]
    assert tcp_get(port, "/healthz") == (200, "")
    assert tcp_get(port, "/config") == (401, 'Bearer realm="rawproxy"')
    assert tcp_get(port, "/config", TOKEN)[0] == 200


def _low_descriptor_limit() -> None:
    resource.setrlimit(resource.RLIMIT_NOFILE, (48, 48))


def test_admin_out_of_descriptors_pauses_instead_of_spinning(
        proxies: ProxyFactory, backend: BackendFactory) -> None:
    proxy, _ = proxies.start([{"Name": "a", "Ports": 1, "Targets": [backend().address]}],
                             "--admin", f"{HOST}:0", preexec_fn=_low_descriptor_limit)
    held: list[socket.socket] = []
    try:
        line = proxy.wait_for_line(r"admin endpoint on http://")
        port = int(re.search(r":(\d+)/", line).group(1))  # type: ignore[union-attr]
        for _ in range(60):  # idle clients: more than 48 descriptors' worth
            held.append(socket.create_connection((HOST, port), timeout=10))
        proxy.wait_for_line(r"admin accept failed: Too many open files")
        # Three more failed tries, each after a pause: time passed in the
        # failing state, and it said so once.
        wait_until(lambda: proxy.count_lines(r"admin accept still failing") >= 3,
                   message="accepts retried after pauses")
        assert proxy.count_lines(r"admin accept failed") == 1
        assert proxy.count_lines(r"WARNING") == 1
        for sock in held:
            sock.close()
        held.clear()
        wait_until(lambda: _healthz_ok(port), message="the admin endpoint to recover")
        proxy.wait_for_line(r"admin accept resumed")
    finally:
        for sock in held:
            sock.close()
        assert proxy.stop() == 0


def _healthz_ok(port: int) -> bool:
    try:
        return tcp_get(port, "/healthz")[0] == 200
    except OSError:
        return False
