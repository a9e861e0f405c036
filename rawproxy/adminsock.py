"""Where the admin endpoint listens, and who may ask it.

* :class:`AdminAddress` -- ``--admin HOST:PORT`` or ``--admin unix:/path``;
* :func:`open_listener` -- the listening socket for it.  A unix socket is
  created with mode 0600 (the umask is narrowed around ``bind``, so the
  file never exists with wider permissions); a stale socket file left by a
  process that died is replaced, a live one or any other file is an error;
* :func:`read_token_file` -- the bearer token of ``--admin-token-file``;
* :func:`is_authorized` -- the ``Authorization`` header against that token,
  compared in constant time.

Pure except for the socket and file calls; nothing here knows HTTP beyond
the one header.
"""

from __future__ import annotations

import errno
import hmac
import os
import socket
import stat
from typing import Optional

from . import netio

UNIX_PREFIX = "unix:"
# sun_path is 108 bytes on Linux, one of them the terminating NUL.
MAX_UNIX_PATH_BYTES = 107


class AdminAddress:
    """A TCP host and port, or a unix socket path (``path`` not None)."""

    __slots__ = ("host", "port", "path")

    def __init__(self, host: str = "", port: int = 0, path: Optional[str] = None) -> None:
        self.host = host
        self.port = port
        self.path = path

    @classmethod
    def parse_unix(cls, text: str) -> AdminAddress:
        """``unix:/path`` -> the address; ValueError with a reason otherwise."""
        path = text[len(UNIX_PREFIX):]
        if not path:
            raise ValueError(f"{text!r} names no socket path")
        if "\0" in path:
            raise ValueError(f"{text!r}: a socket path cannot contain NUL")
        if len(os.fsencode(path)) > MAX_UNIX_PATH_BYTES:
            raise ValueError(f"{text!r}: socket path longer than {MAX_UNIX_PATH_BYTES} bytes")
        return cls(path=path)

    def with_port(self, port: int) -> AdminAddress:
        return AdminAddress(self.host, port, self.path)

    def __str__(self) -> str:
        if self.path is not None:
            return UNIX_PREFIX + self.path
        return netio.format_sockaddr((self.host, self.port))

    def url(self) -> str:
        return str(self) if self.path is not None else f"http://{self}/"


def open_listener(address: AdminAddress, backlog: int = 64) -> socket.socket:
    """A bound, listening, non-blocking socket (raises OSError)."""
    if address.path is None:
        return netio.open_listener(address.host, address.port, backlog)
    _remove_stale_socket(address.path)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        # umask is process-wide, but this runs at start-up before anything
        # else creates files.  No chmod after bind: by path it would follow
        # a symlink swapped in meanwhile (Linux's bind honours the umask).
        old_umask = os.umask(0o177)
        try:
            sock.bind(address.path)
        finally:
            os.umask(old_umask)
        sock.listen(backlog)
        sock.setblocking(False)
    except BaseException:
        sock.close()
        raise
    return sock


def _remove_stale_socket(path: str) -> None:
    """Unlink ``path`` if it is a socket nobody listens on; raise if in use."""
    try:
        mode = os.lstat(path).st_mode
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(mode):
        raise OSError(errno.EEXIST, "exists and is not a socket")
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        probe.setblocking(False)
        err = probe.connect_ex(path)
    finally:
        probe.close()
    if err == errno.ECONNREFUSED:
        os.unlink(path)  # left by a process that is gone
    elif err != errno.ENOENT:
        raise OSError(errno.EADDRINUSE, os.strerror(errno.EADDRINUSE))


SocketFile = tuple[str, tuple[int, int, int]]  # path, (device, inode, ctime in ns)


def socket_identity(sock: socket.socket) -> Optional[SocketFile]:
    """A unix listener's file, to unlink it at close only if it is still
    ours (the inode alone is not enough: a file made after ours was
    removed may get its number); None for TCP or an unnamed socket."""
    if sock.family != socket.AF_UNIX:
        return None
    path = sock.getsockname()
    if not isinstance(path, str) or not path:
        return None
    try:
        info = os.stat(path)
    except OSError:
        return None
    return path, _file_key(info)


def _file_key(info: os.stat_result) -> tuple[int, int, int]:
    return info.st_dev, info.st_ino, info.st_ctime_ns


def remove_socket_file(identity: Optional[SocketFile]) -> None:
    if identity is None:
        return
    path, key = identity
    try:
        if _file_key(os.stat(path)) == key:
            os.unlink(path)
    except OSError:
        pass  # gone already, or its directory is not ours to write (after --user)


class TokenError(Exception):
    """The token file is unreadable, empty or holds an unusable token."""


def read_token_file(path: str) -> str:
    """The token in ``path``, surrounding whitespace stripped."""
    try:
        with open(path, "rb") as handle:
            raw = handle.read(65537)
    except OSError as exc:
        raise TokenError(f"cannot read admin token file {path}: "
                         f"{exc.strerror or exc}") from None
    if len(raw) > 65536:
        raise TokenError(f"admin token file {path} is larger than 64 KiB")
    token = raw.strip()
    if not token:
        raise TokenError(f"admin token file {path} is empty")
    # What a client can put after "Bearer " in a header: visible ASCII.
    if any(byte < 0x21 or byte > 0x7E for byte in token):
        raise TokenError(f"admin token file {path}: the token must be printable ASCII "
                         "without spaces")
    return token.decode("ascii")


def is_authorized(authorization: Optional[str], token: str) -> bool:
    """True if the header is ``Bearer <token>`` (scheme in any case)."""
    if authorization is None:
        return False
    scheme, _, credentials = authorization.strip().partition(" ")
    if scheme.lower() != "bearer":
        return False
    given = credentials.strip().encode("latin-1", "replace")
    # compare_digest's time depends on the length only, not on where the
    # first difference is.
    return hmac.compare_digest(given, token.encode("ascii"))
