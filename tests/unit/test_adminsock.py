"""Unit tests for rawproxy.adminsock: the admin address, the unix socket
listener (mode 0600, stale files), the token file and the bearer check."""

from __future__ import annotations

import errno
import os
import shutil
import socket
import stat
import tempfile
from pathlib import Path
from typing import Iterator

import pytest

from rawproxy.adminsock import (MAX_UNIX_PATH_BYTES, AdminAddress, TokenError, is_authorized,
                                open_listener, read_token_file, remove_socket_file,
                                socket_identity)


@pytest.fixture
def short_dir() -> Iterator[Path]:
    """A directory whose path is short enough for a unix socket (pytest's
    tmp_path can pass the 107-byte limit)."""
    path = Path(tempfile.mkdtemp(prefix="rpx-", dir="/tmp"))
    yield path
    shutil.rmtree(path, ignore_errors=True)


# -- AdminAddress --------------------------------------------------------------------

def test_unix_address_parses_and_prints() -> None:
    address = AdminAddress.parse_unix("unix:/run/rawproxy/admin.sock")
    assert address.path == "/run/rawproxy/admin.sock"
    assert str(address) == "unix:/run/rawproxy/admin.sock"
    assert address.url() == "unix:/run/rawproxy/admin.sock"


@pytest.mark.parametrize("text, fragment", [
    ("unix:", "names no socket path"),
    ("unix:/a\0b", "NUL"),
    ("unix:/" + "a" * MAX_UNIX_PATH_BYTES, "longer than 107 bytes"),
])
def test_bad_unix_addresses(text: str, fragment: str) -> None:
    with pytest.raises(ValueError, match=fragment):
        AdminAddress.parse_unix(text)


@pytest.mark.parametrize("host, port, text", [
    ("127.0.0.1", 9100, "127.0.0.1:9100"), ("::1", 9100, "[::1]:9100")])
def test_tcp_address_prints_as_host_port(host: str, port: int, text: str) -> None:
    address = AdminAddress(host, port)
    assert str(address) == text
    assert address.url() == f"http://{text}/"
    assert str(address.with_port(1)) == text.rsplit(":", 1)[0] + ":1"


# -- the unix listener -----------------------------------------------------------------

def test_unix_listener_is_mode_0600_and_accepts(short_dir: Path) -> None:
    path = short_dir / "admin.sock"
    sock = open_listener(AdminAddress(path=str(path)))
    try:
        mode = os.stat(path).st_mode
        assert stat.S_ISSOCK(mode)
        assert stat.S_IMODE(mode) == 0o600
        client = socket.socket(socket.AF_UNIX)
        client.connect(str(path))
        client.close()
    finally:
        sock.close()


def test_umask_is_restored_after_bind(short_dir: Path) -> None:
    before = os.umask(0o022)
    try:
        open_listener(AdminAddress(path=str(short_dir / "a.sock"))).close()
        assert os.umask(0o022) == 0o022
    finally:
        os.umask(before)


def test_the_socket_file_is_never_chmodded_by_path(short_dir: Path,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    """A chmod by path after bind follows a symlink swapped in meanwhile:
    the mode comes from the umask alone."""
    calls: list[object] = []
    monkeypatch.setattr(os, "chmod", lambda *args, **kwargs: calls.append(args))
    sock = open_listener(AdminAddress(path=str(short_dir / "a.sock")))
    sock.close()
    assert calls == []
    assert stat.S_IMODE(os.stat(short_dir / "a.sock").st_mode) == 0o600


def test_a_stale_socket_file_is_replaced(short_dir: Path) -> None:
    path = str(short_dir / "admin.sock")
    dead = socket.socket(socket.AF_UNIX)
    dead.bind(path)  # bound, never listening: what a killed process leaves
    dead.close()
    sock = open_listener(AdminAddress(path=path))
    sock.close()


def test_a_live_socket_is_not_stolen(short_dir: Path) -> None:
    path = str(short_dir / "admin.sock")
    live = open_listener(AdminAddress(path=path))
    try:
        with pytest.raises(OSError) as info:
            open_listener(AdminAddress(path=path))
        assert info.value.errno == errno.EADDRINUSE
        assert os.path.exists(path)
    finally:
        live.close()


def test_a_regular_file_in_the_way_is_an_error_and_kept(short_dir: Path) -> None:
    path = short_dir / "admin.sock"
    path.write_text("precious")
    with pytest.raises(OSError) as info:
        open_listener(AdminAddress(path=str(path)))
    assert info.value.errno == errno.EEXIST
    assert path.read_text() == "precious"


def test_socket_file_is_removed_with_its_identity(short_dir: Path) -> None:
    path = str(short_dir / "admin.sock")
    sock = open_listener(AdminAddress(path=path))
    identity = socket_identity(sock)
    sock.close()
    assert identity is not None and identity[0] == path
    remove_socket_file(identity)
    assert not os.path.exists(path)
    remove_socket_file(identity)  # gone already: no error


def test_a_socket_file_that_is_no_longer_ours_is_kept(short_dir: Path) -> None:
    path = str(short_dir / "admin.sock")
    ours = open_listener(AdminAddress(path=path))
    identity = socket_identity(ours)
    # Someone else's socket takes the name while ours still exists.
    other = open_listener(AdminAddress(path=str(short_dir / "other.sock")))
    try:
        os.replace(short_dir / "other.sock", path)
        remove_socket_file(identity)
        assert os.path.exists(path)
    finally:
        ours.close()
        other.close()


def test_tcp_listener_has_no_socket_file() -> None:
    sock = open_listener(AdminAddress("127.0.0.1", 0))
    try:
        assert socket_identity(sock) is None
    finally:
        sock.close()


# -- the token ---------------------------------------------------------------------------

def test_token_file_whitespace_is_ignored(tmp_path: Path) -> None:
    path = tmp_path / "token"
    path.write_text("\n  s3cr3t-T0ken_~  \r\n\n")
    assert read_token_file(str(path)) == "s3cr3t-T0ken_~"


@pytest.mark.parametrize("content, fragment", [
    (b"", "is empty"),
    (b" \n\t\r\n", "is empty"),
    (b"two words", "printable ASCII without spaces"),
    ("caf\u00e9".encode(), "printable ASCII without spaces"),
    (b"a\x00b", "printable ASCII without spaces"),
    (b"a" * 70000, "larger than 64 KiB"),
])
def test_unusable_token_files(tmp_path: Path, content: bytes, fragment: str) -> None:
    path = tmp_path / "token"
    path.write_bytes(content)
    with pytest.raises(TokenError, match=fragment):
        read_token_file(str(path))


def test_unreadable_token_file(tmp_path: Path) -> None:
    with pytest.raises(TokenError, match="cannot read admin token file .*No such file"):
        read_token_file(str(tmp_path / "missing"))
    with pytest.raises(TokenError, match="cannot read admin token file .*directory"):
        read_token_file(str(tmp_path))


@pytest.mark.parametrize("header, ok", [
    ("Bearer s3cret", True),
    ("bearer s3cret", True),
    ("BEARER   s3cret  ", True),
    (None, False),
    ("", False),
    ("Bearer", False),
    ("Bearer ", False),
    ("Bearer s3cre", False),
    ("Bearer s3crett", False),
    ("Bearer S3CRET", False),
    ("Basic s3cret", False),
    ("s3cret", False),
    ("Bearer s3cret extra", False),
    ("Bearer s3cr\u00e9t", False),
])
def test_bearer_check(header: str, ok: bool) -> None:
    assert is_authorized(header, "s3cret") is ok
