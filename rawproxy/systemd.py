"""systemd's two process protocols, in the standard library only.

* :func:`listen_fds` (:func:`parse_listen_fds`) -- ``sd_listen_fds(3)``: a
  socket-activated process finds the sockets systemd opened for it as
  descriptors 3, 4, ... when ``LISTEN_PID`` is its own pid and
  ``LISTEN_FDS`` says how many.  The variables are removed from the
  environment once read, so no process started later takes them for its
  own; the descriptors get close-on-exec.
* :class:`Notifier` -- ``sd_notify(3)``: one datagram of ``KEY=value`` lines
  to the unix socket named by ``NOTIFY_SOCKET`` (a path, or ``@name`` for
  the abstract namespace) for ``READY=1``, ``RELOADING=1``,
  ``STOPPING=1`` and ``MAINPID=``.  Without the variable every call does
  nothing.  ``NOTIFY_SOCKET`` stays in the environment: the process an
  upgrade starts (``upgrade``) goes on notifying once it is the main one.
  A datagram that cannot be sent is dropped with a debug line: telling
  systemd must never stop the proxy.

Nothing here knows rawproxy.
"""

from __future__ import annotations

import logging
import os
import socket
import time
from typing import MutableMapping, Optional

log = logging.getLogger("rawproxy.systemd")

LISTEN_FDS_START = 3  # SD_LISTEN_FDS_START
_LISTEN_VARS = ("LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES")


def listen_fds(environ: Optional[MutableMapping[str, str]] = None) -> list[int]:
    """The descriptors systemd passed this process, now close-on-exec; the
    ``LISTEN_*`` variables are removed."""
    fds = parse_listen_fds(os.environ if environ is None else environ, os.getpid())
    for fd in fds:
        try:
            os.set_inheritable(fd, False)
        except OSError as exc:
            log.warning("LISTEN_FDS names descriptor %d, which is not open: %s", fd, exc)
    return fds


def parse_listen_fds(env: MutableMapping[str, str], pid: int) -> list[int]:
    """What ``LISTEN_PID``/``LISTEN_FDS`` in ``env`` give process ``pid``
    (nothing unless the pid is its own), the variables removed from ``env``."""
    wanted_pid = env.get("LISTEN_PID", "")
    count = env.get("LISTEN_FDS", "")
    for name in _LISTEN_VARS:
        env.pop(name, None)
    if not (wanted_pid.isascii() and wanted_pid.isdigit() and count.isascii()
            and count.isdigit()):
        return []
    if int(wanted_pid) != pid:
        return []  # meant for another process: a parent's, inherited by mistake
    return list(range(LISTEN_FDS_START, LISTEN_FDS_START + int(count)))


def notify_address(value: Optional[str]) -> Optional[str]:
    """``NOTIFY_SOCKET`` as an ``AF_UNIX`` address, or None if unusable."""
    if not value or (value[0] not in "/@"):
        return None  # unset, or a vsock address this stdlib client does not speak
    return "\0" + value[1:] if value[0] == "@" else value


class Notifier:
    """Tells systemd about this service; a no-op without ``NOTIFY_SOCKET``."""

    def __init__(self, address: Optional[str]) -> None:
        self.address = address
        self._sock: Optional[socket.socket] = None

    @classmethod
    def from_environment(cls, environ: Optional[MutableMapping[str, str]] = None) -> Notifier:
        env = os.environ if environ is None else environ
        return cls(notify_address(env.get("NOTIFY_SOCKET")))

    @property
    def enabled(self) -> bool:
        return self.address is not None

    def notify(self, *fields: str) -> bool:
        """Send ``fields`` (``KEY=value`` each) as one datagram; False if not sent."""
        if self.address is None:
            return False
        try:
            if self._sock is None:
                self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
                self._sock.setblocking(False)  # systemd busy: drop it, never wait
            self._sock.sendto("\n".join(fields).encode(), self.address)
        except OSError as exc:
            log.debug("sd_notify %s not sent: %s", " ".join(fields), exc)
            return False
        return True

    def ready(self) -> None:
        self.notify("READY=1", "STATUS=serving")

    def reloading(self) -> None:
        # MONOTONIC_USEC: systemd 253+ wants it to tell this reload from an
        # earlier one; CLOCK_MONOTONIC is the clock time.monotonic reads.
        self.notify("RELOADING=1", f"MONOTONIC_USEC={time.monotonic_ns() // 1000}")

    def stopping(self) -> None:
        self.notify("STOPPING=1")

    def main_pid(self, pid: int) -> None:
        """Another process (the one an upgrade started) is the service now."""
        self.notify(f"MAINPID={pid}", "READY=1", "STATUS=serving (upgraded)")

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None
