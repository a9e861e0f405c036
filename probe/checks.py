"""Checks through a proxy: connections that send frames and verify the echo.

One connection (``run_connection``) is: connect (timed) -> for each frame:
send it and wait for its whole echo (the frame's latency) -> after the last
frame, shut down the write side (half-close) while its echo is still on the
way -> expect the rest of the echo, then EOF.  It is driven by a selector
so a 1 MiB frame is sent and read back at the same time, and it gives up
with ``stalled`` when no byte moves either way for ``stall_s``.  Socket
errors are named here, once: refused, reset (ECONNRESET, EPIPE), stalled,
or error; defects in the echoed bytes come from framing.Decoder.

``check_port`` runs ``connections`` of these at once against one port
(again and again until ``duration_s`` when that is given) and sums them up
in a ``PortResult``.  ``run_checks`` checks many ports: one after another,
or all at once in load mode.
"""

from __future__ import annotations

import errno
import math
import random
import selectors
import socket
import threading
import time
from typing import Callable, NamedTuple, Optional, Sequence

from .framing import HEADER_SIZE, Decoder, Defect, Kind, encode

_CHUNK_BYTES = 256 * 1024
_SMALL_FRAME_BYTES = 64 * 1024


class Options(NamedTuple):
    connections: int = 4          # at once, per port
    frames: int = 8               # per connection
    max_frame: int = 1 << 20      # one frame this big on the first connection of a port
    stall_s: float = 5.0
    duration_s: Optional[float] = None   # load mode: keep reconnecting until then


class Target(NamedTuple):
    app: str
    port: int          # as in the config
    host: str
    probe_port: int    # where the probe connects (differs in local mode)


class ConnResult(NamedTuple):
    stream_id: int
    defect: Optional[Defect]
    connect_s: float
    latencies_s: tuple[float, ...]
    bytes_verified: int


class PortResult(NamedTuple):
    target: Target
    conns: tuple[ConnResult, ...]
    elapsed_s: float

    @property
    def passed(self) -> bool:
        return bool(self.conns) and all(c.defect is None for c in self.conns)

    @property
    def reason(self) -> str:
        failed = [c for c in self.conns if c.defect is not None]
        if not failed:
            return "" if self.conns else "no connection was made"
        more = f" (+{len(failed) - 1} more connections failed)" if len(failed) > 1 else ""
        return f"{failed[0].defect}{more}"


class Progress:
    """Counters the checks bump and a display reads, from any thread."""

    __slots__ = ("_lock", "connections", "failed", "bytes_verified")

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.connections = self.failed = self.bytes_verified = 0

    def add(self, result: ConnResult) -> None:
        with self._lock:
            self.connections += 1
            self.failed += result.defect is not None
            self.bytes_verified += result.bytes_verified

    def line(self) -> str:
        with self._lock:
            return (f"{self.connections} connections, {self.failed} failed, "
                    f"{self.bytes_verified / 2**20:.1f} MiB verified")


class Planner:
    """Hands out unique stream ids and frame sizes: 1 byte, then a log-uniform
    mix up to 64 KiB, plus one ``max_frame`` frame when ``big``."""

    __slots__ = ("_lock", "_rng", "_next_id")

    def __init__(self, seed: Optional[int]) -> None:
        self._lock = threading.Lock()
        self._rng = random.Random(seed)
        self._next_id = self._rng.getrandbits(32)

    def plan(self, frames: int, max_frame: int, big: bool) -> tuple[int, list[int]]:
        with self._lock:
            stream_id, self._next_id = self._next_id, (self._next_id + 1) & 0xFFFFFFFF
            top = min(max_frame, _SMALL_FRAME_BYTES)
            sizes = [1] + [max(1, int(top ** self._rng.random())) for _ in range(frames - 1)]
            if big and frames > 1:
                sizes[self._rng.randrange(1, frames)] = max_frame
            return stream_id, sizes[:frames]


# The peer tore an established connection down: ECONNRESET/EPIPE from recv
# or send, and ENOTCONN from shutdown(SHUT_WR) once a reset has arrived.
_RESET_ERRNOS = frozenset({errno.ECONNRESET, errno.EPIPE, errno.ECONNABORTED, errno.ENOTCONN})


def _socket_defect(exc: OSError, decoder: Decoder, total: int) -> Defect:
    where = f"after {decoder.bytes_ok} of {total} bytes echoed"
    if exc.errno in _RESET_ERRNOS:
        return Defect(Kind.RESET, f"connection reset {where}")
    return Defect(Kind.ERROR, f"{exc.strerror or exc} {where}")


class _Exchange:
    """The frames of one connection, sent one at a time (see the module doc)."""

    __slots__ = ("sock", "decoder", "sizes", "stall_s", "total", "latencies", "_out", "_sent",
                 "_seq", "_started")

    def __init__(self, sock: socket.socket, stream_id: int, sizes: Sequence[int],
                 stall_s: float) -> None:
        self.sock = sock
        self.decoder = Decoder(stream_id, len(sizes))
        self.sizes = sizes
        self.stall_s = stall_s
        self.total = sum(sizes) + len(sizes) * HEADER_SIZE
        self.latencies: list[float] = []
        self._seq = -1
        self._out = b""
        self._sent = 0
        self._started = 0.0

    def _next_frame(self) -> None:
        self._seq += 1
        self._out = encode(self.decoder.stream_id, self._seq, self.sizes[self._seq])
        self._sent = 0
        self._started = time.perf_counter()

    def run(self) -> Optional[Defect]:
        self.sock.setblocking(False)
        self._next_frame()
        with selectors.DefaultSelector() as sel:
            mask = selectors.EVENT_READ | selectors.EVENT_WRITE
            sel.register(self.sock, mask)
            while not self.decoder.done and self.decoder.defect is None:
                ready = sel.select(self.stall_s)
                if not ready:
                    return Defect(Kind.STALLED, f"no byte for {self.stall_s:g}s, waiting for "
                                  f"the echo of frame {self.decoder.frames_ok} "
                                  f"({self.decoder.bytes_ok} of {self.total} bytes echoed)")
                try:
                    if ready[0][1] & selectors.EVENT_WRITE:
                        self._on_writable()
                    if ready[0][1] & selectors.EVENT_READ:
                        self._on_readable()
                except BlockingIOError:
                    pass
                except OSError as exc:
                    return _socket_defect(exc, self.decoder, self.total)
                want = selectors.EVENT_READ | (
                    selectors.EVENT_WRITE if self._sent < len(self._out) else 0)
                if want != mask:
                    mask = want
                    sel.modify(self.sock, mask)
        return self.decoder.defect

    def _on_writable(self) -> None:
        end = self._sent + _CHUNK_BYTES
        self._sent += self.sock.send(memoryview(self._out)[self._sent:end])
        if self._sent == len(self._out) and self._seq == len(self.sizes) - 1:
            self.sock.shutdown(socket.SHUT_WR)

    def _on_readable(self) -> None:
        if self.decoder.feed(self.sock.recv(_CHUNK_BYTES)):
            # Only one frame is ever outstanding, so a completion is the current one.
            self.latencies.append(time.perf_counter() - self._started)
            if self._seq + 1 < len(self.sizes):
                self._next_frame()


def run_connection(host: str, port: int, stream_id: int, sizes: Sequence[int],
                   stall_s: float) -> ConnResult:
    started = time.perf_counter()
    try:
        sock = socket.create_connection((host, port), timeout=stall_s)
    except ConnectionRefusedError:
        return ConnResult(stream_id, Defect(Kind.REFUSED, f"{host}:{port} refused the "
                                            "connection"), 0.0, (), 0)
    except OSError as exc:
        return ConnResult(stream_id, Defect(Kind.ERROR, f"connect to {host}:{port}: "
                                            f"{exc.strerror or exc}"), 0.0, (), 0)
    connect_s = time.perf_counter() - started
    with sock:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        exchange = _Exchange(sock, stream_id, sizes, stall_s)
        defect = exchange.run()
    return ConnResult(stream_id, defect, connect_s, tuple(exchange.latencies),
                      exchange.decoder.bytes_ok)


def check_port(target: Target, options: Options, planner: Planner,
               progress: Optional[Progress] = None,
               cancel: Optional[threading.Event] = None) -> PortResult:
    """``cancel`` set: no new connection starts (the run is stopping)."""
    results: list[ConnResult] = []
    lock = threading.Lock()
    started = time.perf_counter()
    deadline = None if options.duration_s is None else started + options.duration_s

    def worker(index: int) -> None:
        # The first connection of a port carries the big frame.
        big = index == 0
        while cancel is None or not cancel.is_set():
            stream_id, sizes = planner.plan(options.frames, options.max_frame, big)
            big = False
            try:
                result = run_connection(target.host, target.probe_port, stream_id, sizes,
                                        options.stall_s)
            except Exception as exc:  # a bug of the probe's must fail the check, not vanish
                result = ConnResult(stream_id, Defect(Kind.ERROR, f"probe error: {exc!r}"),
                                    0.0, (), 0)
            with lock:
                results.append(result)
            if progress is not None:
                progress.add(result)
            if deadline is None or time.perf_counter() >= deadline:
                return

    _run_all(worker, options.connections)
    return PortResult(target, tuple(results), time.perf_counter() - started)


def run_checks(targets: Sequence[Target], options: Options, planner: Planner,
               progress: Optional[Progress] = None,
               cancel: Optional[threading.Event] = None) -> list[PortResult]:
    """Results in the order of ``targets``.  One port after another, so each
    row's latency and throughput are its own; in load mode every port at once
    for ``duration_s``, as load.  Once ``cancel`` is set, no connection starts."""
    results = [PortResult(t, (), 0.0) for t in targets]   # stays failed if a check dies

    def check(index: int) -> None:
        results[index] = check_port(targets[index], options, planner, progress, cancel)

    if options.duration_s is None:
        for index in range(len(targets)):
            if cancel is not None and cancel.is_set():
                break
            check(index)
    else:
        _run_all(check, len(targets))
    return results


def _run_all(job: Callable[[int], None], count: int) -> None:
    """``job(0) .. job(count - 1)`` on threads of their own; returns when all ended.
    Every blocking call inside has a timeout, so each ends."""
    threads = [threading.Thread(target=job, args=(i,), daemon=True) for i in range(count)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()


def percentile(sorted_values: Sequence[float], fraction: float) -> float:
    """Nearest-rank percentile of already sorted values (0.0 when empty)."""
    if not sorted_values:
        return 0.0
    rank = math.ceil(round(fraction * len(sorted_values), 9))
    return sorted_values[min(max(rank, 1), len(sorted_values)) - 1]
