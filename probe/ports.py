"""Loopback ports for local mode, from below the kernel's ephemeral range.

Local mode needs ports for its echo backends, its down targets and the
proxy.  The proxy binds its own, so for those the probe can only pick
ports that are free and let go of them: until the proxy binds, anyone may
take them.  In the ephemeral range (where port 0 binds come from) that is
everyone: every connect() on the machine picks its source port there, and
one that closes first leaves its port in TIME_WAIT for a minute, which
blocks even an SO_REUSEADDR bind.  A benchmark's connection churn leaves
thousands of those, enough to use the range up so that a port 0 bind fails.
Below the range the kernel hands out nothing by itself: only a program
binding that very port can take it (the proxy then exits on its bind
error, and local mode starts it again on other ports).

The probe takes the lower half of the 16384 ports below the range;
tests.support.stable_ports, for test backends that restart on their port,
takes the upper half, so the two never pick the same port.

A down target keeps a bound socket that never listens for the whole run:
connects to it are refused, and no one else can bind its port or pick it
as a source port meanwhile.
"""

from __future__ import annotations

import errno
import random
import socket
from typing import Iterable, Iterator, Optional

HOST = "127.0.0.1"
_RANGE_FILE = "/proc/sys/net/ipv4/ip_local_port_range"
_BELOW = 16384
_TAKEN = frozenset({errno.EADDRINUSE, errno.EACCES})


def ephemeral_low(path: str = _RANGE_FILE) -> int:
    """The first port of the kernel's ephemeral range (Linux's default where unknown)."""
    try:
        with open(path) as ranges:
            return int(ranges.read().split()[0])
    except (OSError, ValueError, IndexError):
        return 32768


def probe_candidates(low: int) -> list[int]:
    """The probe's half of the ports below ``low`` (none when the range starts too low)."""
    start = max(1024, low - _BELOW)
    return list(range(start, start + (low - start) // 2))


class PortPool:
    """Candidate ports in random order, each handed out at most once, so a
    retry after a bind failure gets other ports.  When they run out, the
    kernel chooses (port 0)."""

    __slots__ = ("_candidates",)

    def __init__(self, candidates: Optional[Iterable[int]] = None) -> None:
        if candidates is None:
            shuffled = probe_candidates(ephemeral_low())
            random.shuffle(shuffled)
            candidates = shuffled
        self._candidates: Iterator[int] = iter(candidates)

    def bind(self, listen: bool) -> socket.socket:
        """A socket bound to a free port of 127.0.0.1, listening if asked."""
        for port in self._candidates:
            try:
                return _bound(port, listen)
            except OSError as exc:
                if exc.errno not in _TAKEN:   # not about the port (out of descriptors...)
                    raise
        return _bound(0, listen)

    def free(self, count: int) -> list[int]:
        """``count`` ports nobody holds right now, let go for the caller to bind."""
        socks: list[socket.socket] = []
        try:
            for _ in range(count):
                socks.append(self.bind(listen=False))
            return [sock.getsockname()[1] for sock in socks]
        finally:
            for sock in socks:
                sock.close()


def _bound(port: int, listen: bool) -> socket.socket:
    # No SO_REUSEADDR: a port with a connection in TIME_WAIT counts as taken.
    sock = socket.socket()
    try:
        sock.bind((HOST, port))
        if listen:
            sock.listen(1024)
    except BaseException:
        sock.close()
        raise
    return sock
