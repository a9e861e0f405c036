"""Every socket call the proxy makes, and the one place errors are classified.

Errors fall into a few domain outcomes (trio's habit of translating at one
boundary):

* would block  -- ``BlockingIOError``/``InterruptedError``: try again on the
  next readiness event;
* connect failed -- :class:`ConnectFailed` with a short ``reason`` (refused,
  unreachable, timeout, reset, ...): fail over to another address or target;
* peer gone -- :class:`PeerGone`: reset, broken pipe, aborted; close the pair;
* anything else propagates, is logged with its traceback by the caller and
  closes that one session.
"""

from __future__ import annotations

import _socket
import errno
import os
import socket
import struct
import sys
from typing import TYPE_CHECKING, Optional, Tuple, Union

from . import outcomes

SockAddr = Union[Tuple[str, int], Tuple[str, int, int, int]]

WOULD_BLOCK = (BlockingIOError, InterruptedError)

# Connect errors worth a word of their own in logs and metrics; anything
# else is reported by its errno name.
_CONNECT_REASONS = {
    errno.ECONNREFUSED: outcomes.REFUSED,
    errno.ENETUNREACH: outcomes.UNREACHABLE,
    errno.EHOSTUNREACH: outcomes.UNREACHABLE,
    errno.EHOSTDOWN: outcomes.UNREACHABLE,
    errno.EADDRNOTAVAIL: outcomes.UNREACHABLE,
    errno.ENETDOWN: outcomes.UNREACHABLE,
    errno.EAFNOSUPPORT: outcomes.UNREACHABLE,  # e.g. IPv6 disabled on this host
    errno.ETIMEDOUT: outcomes.TIMEOUT,
    errno.ECONNRESET: outcomes.RESET,
    errno.ECONNABORTED: outcomes.RESET,
}

# After a connection is established, these mean the other end (or the path
# to it) is gone; the pair is closed, not the proxy.
_PEER_GONE_ERRNOS = frozenset({
    errno.ECONNRESET, errno.EPIPE, errno.ECONNABORTED, errno.ETIMEDOUT,
    errno.ENOTCONN, errno.EHOSTUNREACH, errno.ENETUNREACH, errno.ESHUTDOWN,
})

# accept() failures that say "no descriptors or memory right now": pause
# accepting rather than spin on a listener that stays readable.
ACCEPT_RESOURCE_ERRNOS = frozenset({
    errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM,
})

# accept() failures that concern only the one pending connection (it was
# reset while queued, or a network error surfaced): skip it and go on.
ACCEPT_TRANSIENT_ERRNOS = frozenset({
    errno.ECONNABORTED, errno.EPROTO, errno.EPERM, errno.ENETDOWN,
    errno.ENOPROTOOPT, errno.EHOSTDOWN, errno.ENONET, errno.EHOSTUNREACH,
    errno.EOPNOTSUPP, errno.ENETUNREACH,
})

_LINGER_RESET = struct.pack("ii", 1, 0)
# Created non-blocking in one call where the kernel can (no ioctl after).
_NONBLOCKING_STREAM = socket.SOCK_STREAM | getattr(socket, "SOCK_NONBLOCK", 0)


class StreamSocket(socket.socket):
    """A ``socket.socket`` made by the C initialiser alone.

    ``socket.socket.__init__`` is a Python function (twice per proxied
    connection) that fills in defaults, which every caller here passes, and
    sets two fields for ``close()`` and ``makefile()``.  ``_io_refs`` is
    what it would set, fixed at 0, and ``_closed`` is read off the
    descriptor, so ``close()``, ``with``, ``detach()``, ``dup()`` and
    ``repr`` behave as on any socket; ``makefile()`` does not (it counts
    its streams in ``_io_refs``), and no proxied socket has a stream.
    """

    __slots__ = ()
    if not TYPE_CHECKING:  # the same signature as socket.socket's, for mypy
        __init__ = _socket.socket.__init__
    _io_refs = 0

    @property
    def _closed(self) -> bool:
        return self.fileno() == -1

    @_closed.setter
    def _closed(self, value: bool) -> None:
        pass  # close() and detach() set it before the descriptor goes: read from it


# Linux copies a listener's TCP_NODELAY into each socket accept() returns.
_NODELAY_INHERITED = sys.platform.startswith("linux")


class ConnectFailed(Exception):
    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class LocalResourceError(Exception):
    """No descriptor or memory for a socket here: not the target's fault."""


class PeerGone(Exception):
    """The peer reset the connection or it broke; close both sides."""


def connect_reason(err: int) -> str:
    return _CONNECT_REASONS.get(err) or errno.errorcode.get(err, str(err)).lower()


def is_peer_gone(exc: OSError) -> bool:
    return exc.errno in _PEER_GONE_ERRNOS


def is_local_shortage(exc: BaseException) -> bool:
    """This process is out of descriptors or memory (not a peer's doing)."""
    if isinstance(exc, (LocalResourceError, MemoryError)):
        return True
    return isinstance(exc, OSError) and exc.errno in ACCEPT_RESOURCE_ERRNOS


def open_listener(host: str, port: int, backlog: int, reuse_port: bool = False) -> socket.socket:
    """A bound, listening, non-blocking socket (raises OSError).

    ``reuse_port`` (SO_REUSEPORT) lets the workers of ``--workers`` each bind
    the same port; the kernel then spreads new connections over them.
    """
    infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM,
                               flags=socket.AI_PASSIVE | socket.AI_NUMERICHOST)
    family, _, _, _, sockaddr = infos[0]
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if reuse_port:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        if family == socket.AF_INET6 and host in ("::", "::0"):
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
        sock.bind(sockaddr)
        sock.listen(backlog)
        sock.setblocking(False)
    except BaseException:
        sock.close()
        raise
    return sock


def start_connect(family: int, sockaddr: SockAddr) -> socket.socket:
    """A non-blocking socket whose connect is under way.

    Raises :class:`ConnectFailed` when the kernel refuses at once (loopback
    often answers ECONNREFUSED synchronously), :class:`LocalResourceError`
    when no socket or no local port (EADDRNOTAVAIL) can be had.
    """
    try:
        sock = StreamSocket(family, _NONBLOCKING_STREAM, 0)
    except OSError as exc:
        # EMFILE and friends: this client cannot be served now, but the
        # target did nothing wrong, so its health must not suffer.
        if exc.errno in ACCEPT_RESOURCE_ERRNOS:
            raise LocalResourceError(exc.strerror or str(exc)) from exc
        raise ConnectFailed(connect_reason(exc.errno or 0)) from exc
    if _NONBLOCKING_STREAM == socket.SOCK_STREAM:
        sock.setblocking(False)
    err = sock.connect_ex(sockaddr)
    if err not in (0, errno.EINPROGRESS, errno.EAGAIN, errno.EINTR):
        sock.close()
        if err == errno.EADDRNOTAVAIL:  # Linux: no ephemeral port left here
            raise LocalResourceError(os.strerror(err))
        raise ConnectFailed(connect_reason(err))
    return sock


def connect_next(addresses: list[tuple[int, SockAddr]],
                 reason: str = outcomes.NO_ADDRESS) -> tuple[Optional[socket.socket], str]:
    """Start connecting to the first address that does not fail at once.

    Tried addresses are popped from ``addresses``.  Returns the socket (or
    None when every address failed) and the latest failure's reason
    (``reason``, the caller's last one, if no address was left to try).
    Raises :class:`LocalResourceError` when no socket can be had at all.
    """
    while addresses:
        family, sockaddr = addresses.pop(0)
        try:
            return start_connect(family, sockaddr), reason
        except ConnectFailed as exc:
            reason = exc.reason
    return None, reason


def finish_connect(sock: socket.socket) -> bool:
    """After write readiness: True once connected, False if still connecting;
    raises :class:`ConnectFailed` when the connect failed.

    SO_ERROR is 0 both for "connected" and "still in progress", so the peer
    name settles it: a spurious wake-up must not pass for a connection.
    """
    err = sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
    if err:
        raise ConnectFailed(connect_reason(err))
    try:
        sock.getpeername()
    except OSError as exc:
        if exc.errno == errno.ENOTCONN:
            return False
        raise ConnectFailed(connect_reason(exc.errno or 0)) from exc
    return True


# Linux's TCP_INFO begins with the socket's state; 1 is TCP_ESTABLISHED.
_TCP_INFO = getattr(socket, "TCP_INFO", None)
_ESTABLISHED = b"\x01"


def established(sock: socket.socket) -> bool:
    """Whether a connect under way is over already (Linux; False elsewhere).

    A connect to this host's loopback usually is by the time ``connect()``
    returns EINPROGRESS: the handshake ran inside the call.  One
    ``getsockopt`` then saves the wake-up, the two ``epoll_ctl`` calls of
    watching for write, and the turn it costs; HAProxy gets the same by
    trying the send at once.  ESTABLISHED means no error is pending.
    """
    if _TCP_INFO is None:
        return False
    try:
        return sock.getsockopt(socket.IPPROTO_TCP, _TCP_INFO, 1) == _ESTABLISHED
    except OSError:
        return False  # let the usual path (write readiness) find out


def pending_error(sock: socket.socket) -> str:
    """The socket's pending error (SO_ERROR, read and cleared) as text; "" if none."""
    try:
        err = sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
    except OSError as exc:
        return exc.strerror or str(exc)
    return os.strerror(err) if err else ""


def set_nodelay(sock: socket.socket) -> None:
    try:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    except OSError:
        pass  # not TCP (a test's socketpair) or already reset: harmless


def nodelay_for_accepted(listener: socket.socket) -> bool:
    """Set TCP_NODELAY on a listener: True when every socket it accepts has
    it with no call of its own (Linux), False when each must set it."""
    if not _NODELAY_INHERITED:
        return False
    try:
        listener.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    except OSError:
        return False
    return True


def shutdown_write(sock: socket.socket) -> None:
    try:
        sock.shutdown(socket.SHUT_WR)
    except OSError as exc:
        if is_peer_gone(exc):
            raise PeerGone(str(exc)) from exc
        raise


_c_close = _socket.socket.close


def close(sock: socket.socket) -> None:
    # The C close: socket.socket's Python close() is two more calls, and
    # only matters for makefile() streams, which no proxied socket has.
    try:
        _c_close(sock)
    except OSError:
        pass


def abort(sock: socket.socket) -> None:
    """Close with RST rather than FIN, so the peer learns of the failure."""
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _LINGER_RESET)
    except OSError:
        pass
    close(sock)


def peer_name(sock: socket.socket) -> str:
    try:
        return format_sockaddr(sock.getpeername())
    except OSError:
        return "?"


def format_sockaddr(addr: object) -> str:
    if isinstance(addr, tuple) and len(addr) >= 2:
        host, port = addr[0], addr[1]
        if ":" in str(host):
            return f"[{host}]:{port}"
        return f"{host}:{port}"
    return str(addr)
