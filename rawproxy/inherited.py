"""Listening sockets a process was given instead of binding them itself.

Two givers, one shape: systemd's socket activation (``systemd.listen_fds``)
and the process an upgrade replaces (``upgrade``), which hands down every
listening socket it has.  Either way the new process gets descriptors, and
each is matched to what it serves by the address it is bound to
(``getsockname``), never by its number:

* :meth:`InheritedSockets.take` -- the socket for app port ``port``: an
  inherited TCP listener bound to that port, one bound to ``host`` exactly
  first (systemd's ``ListenStream=`` decides the address; an upgrade
  hands down sockets bound to ``--listen-host`` anyway);
* :meth:`InheritedSockets.take_unix` -- the one bound to a unix path
  (``--admin unix:PATH``);
* :meth:`InheritedSockets.share` -- under ``--workers``, in worker
  ``index`` just after the fork: the worker keeps its part and closes its
  copies of the rest.  The sockets of one port (one per old worker, an
  ``SO_REUSEPORT`` group) go one to a worker; where there are fewer than
  workers (systemd's one socket), workers share them: none could bind the
  port beside a socket systemd bound as another user;
* :meth:`InheritedSockets.close_rest` -- once serving: what no port took is
  closed; the supervisor keeps what its workers share, for a worker it
  restarts.  The listen queue of a socket lives as long as any process
  holds it, so closing a copy here never drops a client queued on it.

Anything inherited that is not a listening stream socket is closed with a
warning.
"""

from __future__ import annotations

import ipaddress
import logging
import os
import socket
from typing import Iterable, Optional, Union

log = logging.getLogger("rawproxy.inherited")

Key = Union[int, str]  # a TCP port, or a unix socket path


class _Entry:
    __slots__ = ("sock", "key", "address")

    def __init__(self, sock: socket.socket, key: Key, address: str) -> None:
        self.sock = sock
        self.key = key
        self.address = address


def _describe(sock: socket.socket) -> Optional[tuple[Key, str]]:
    """(port or path, printable address) of a listening stream socket, else None."""
    if sock.type != socket.SOCK_STREAM or not sock.getsockopt(socket.SOL_SOCKET,
                                                             socket.SO_ACCEPTCONN):
        return None
    name = sock.getsockname()
    if sock.family == socket.AF_UNIX:
        return (name, f"unix:{name}") if isinstance(name, str) and name else None
    if sock.family in (socket.AF_INET, socket.AF_INET6):
        host, port = name[0], name[1]
        return port, (f"[{host}]:{port}" if ":" in host else f"{host}:{port}")
    return None


def _same_ip(a: str, b: str) -> bool:
    try:
        return ipaddress.ip_address(a.split("%", 1)[0]) == ipaddress.ip_address(b)
    except ValueError:
        return False


class InheritedSockets:
    def __init__(self) -> None:
        self._entries: list[_Entry] = []

    @classmethod
    def from_fds(cls, fds: Iterable[int]) -> InheritedSockets:
        pool = cls()
        for fd in fds:
            pool._adopt_fd(fd)
        return pool

    def _adopt_fd(self, fd: int) -> None:
        try:
            sock = socket.socket(fileno=fd)  # family and type read from the descriptor
        except OSError as exc:
            log.warning("inherited descriptor %d is not a socket (%s): closed", fd,
                        exc.strerror or exc)
            try:
                os.close(fd)
            except OSError:
                pass
            return
        try:
            described = _describe(sock)
        except OSError:
            described = None
        if described is None:
            log.warning("inherited descriptor %d is not a listening stream socket: closed", fd)
            sock.close()
            return
        key, address = described
        self._entries.append(_Entry(sock, key, address))

    def __len__(self) -> int:
        return len(self._entries)

    def take(self, host: str, port: int) -> Optional[socket.socket]:
        """The inherited listener for ``port`` (non-blocking), or None: bind one."""
        candidates = [entry for entry in self._entries if entry.key == port]
        if not candidates:
            return None
        exact = [e for e in candidates if _same_ip(e.sock.getsockname()[0], host)]
        return self._hand_out((exact or candidates)[0], f"port {port}")

    def take_unix(self, path: str) -> Optional[socket.socket]:
        for entry in self._entries:
            if entry.key == path:
                return self._hand_out(entry, path)
        return None

    def take_admin(self, host: str, port: int, path: Optional[str]) -> Optional[socket.socket]:
        """The socket for ``--admin`` (port 0, a port the kernel picks: none)."""
        if path is not None:
            return self.take_unix(path)
        return self.take(host, port) if port else None

    def _hand_out(self, entry: _Entry, what: str) -> socket.socket:
        self._entries.remove(entry)
        entry.sock.setblocking(False)
        log.info("%s: serving the inherited socket on %s (fd %d), not binding", what,
                 entry.address, entry.sock.fileno())
        return entry.sock

    def _groups(self) -> dict[Key, list[_Entry]]:
        groups: dict[Key, list[_Entry]] = {}
        for entry in self._entries:
            groups.setdefault(entry.key, []).append(entry)
        return groups

    def share(self, index: int) -> None:
        """In worker ``index``, just after the fork: keep this worker's part,
        close its copies of the rest (see the module doc)."""
        kept = [group[index % len(group)] for group in self._groups().values()]
        for entry in self._entries:
            if entry not in kept:
                entry.sock.close()
        self._entries = kept

    def close_rest(self, workers: int = 0) -> None:
        """Close what no port took.  In the supervisor of ``workers`` workers,
        which took their parts in their own processes: keep the sockets they
        share (fewer than workers for a port), for a worker restarted later."""
        shared = {key for key, group in self._groups().items() if len(group) < workers}
        kept: list[_Entry] = []
        for entry in self._entries:
            if entry.key in shared:
                kept.append(entry)
                continue
            if not workers:
                log.info("closing the inherited socket on %s: no port of the config "
                         "is on it", entry.address)
            entry.sock.close()
        self._entries = kept

    def close(self) -> None:
        for entry in self._entries:
            entry.sock.close()
        self._entries = []
