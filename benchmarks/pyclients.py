"""The clients written here (run inside the harness, on CPU 1), against an echo backend.

* :func:`idle` opens connections one after another through the proxy,
  proves each is relayed with a one-byte echo, and holds them; it reads the
  proxy's RSS before and after, then times new echo round trips (connect,
  send 64 bytes, read them back) while they are held.
* :func:`integrity` streams ``total_bytes`` of seeded pseudo-random data
  through the proxy to the echo backend and reads the echo back at the
  same time (two threads), checking the echo byte for byte and its length.

Both return ``(metrics, problem)``: ``problem`` is None when the
measurement is clean, else a short reason that marks the row.
"""

from __future__ import annotations

import random
import socket
import statistics
import threading
import time
from typing import Callable, Optional

from .procs import BenchError

Metrics = dict[str, float]
Outcome = tuple[Metrics, Optional[str]]

ECHO_PAYLOAD = bytes(range(64))
CHUNK_BYTES = 1024 * 1024
IO_TIMEOUT_S = 10.0


def _connect(port: int) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", port), timeout=IO_TIMEOUT_S)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return sock


def _recv_exactly(sock: socket.socket, nbytes: int) -> bytes:
    parts = bytearray()
    while len(parts) < nbytes:
        chunk = sock.recv(nbytes - len(parts))
        if not chunk:
            raise BenchError(f"echo: EOF after {len(parts)} of {nbytes} bytes")
        parts += chunk
    return bytes(parts)


def echo_round_trip_ms(port: int) -> float:
    """A new connection, 64 bytes there and back; milliseconds."""
    started = time.perf_counter()
    with _connect(port) as sock:
        sock.sendall(ECHO_PAYLOAD)
        if _recv_exactly(sock, len(ECHO_PAYLOAD)) != ECHO_PAYLOAD:
            raise BenchError("echo: wrong bytes came back")
    return (time.perf_counter() - started) * 1e3


def idle(port: int, count: int, rss_kib: Optional[Callable[[], int]],
         timeout_s: float, echo_samples: int = 21) -> Outcome:
    echo_round_trip_ms(port)  # warm-up: imports, pools, the first accept
    before = rss_kib() if rss_kib else None
    held: list[socket.socket] = []
    problem: Optional[str] = None
    deadline = time.monotonic() + timeout_s
    started = time.monotonic()
    try:
        for _ in range(count):
            if time.monotonic() > deadline:
                problem = f"only {len(held)} of {count} held after {timeout_s:.0f} s"
                break
            try:
                sock = _connect(port)
            except OSError as exc:
                problem = f"connection {len(held) + 1} of {count} failed: {exc}"
                break
            try:
                sock.sendall(b"x")
                if _recv_exactly(sock, 1) != b"x":
                    raise BenchError("wrong byte echoed")
            except (OSError, BenchError) as exc:
                sock.close()
                problem = f"connection {len(held) + 1} of {count} not relayed: {exc}"
                break
            held.append(sock)
        open_s = time.monotonic() - started
        after = rss_kib() if rss_kib else None
        samples = [echo_round_trip_ms(port) for _ in range(echo_samples)]
    finally:
        for sock in held:
            sock.close()
    metrics: Metrics = {"held": float(len(held)), "open_s": open_s,
                        "echo_ms": statistics.median(samples)}
    if before is not None and after is not None:
        metrics["rss_before_kib"] = float(before)
        metrics["rss_after_kib"] = float(after)
        if held:
            metrics["kib_per_conn"] = (after - before) / len(held)
    return metrics, problem


def _chunk(base: bytes, index: int) -> bytes:
    """The ``index``-th MiB of the stream: the random base stamped with ``index``."""
    return index.to_bytes(8, "big") + base[8:]


def integrity(port: int, total_bytes: int, timeout_s: float, seed: int = 6) -> Outcome:
    """Send ``total_bytes`` through the proxy to the echo backend; check the echo.

    The stream is one seeded random MiB repeated, each copy stamped with its
    sequence number, so a lost, repeated or reordered chunk is caught.  The
    echo is compared byte for byte with the stream as it arrives -- exact,
    and cheaper than hashing both directions (sha256 runs at ~50 MiB/s on a
    slow core, which would make the client, not the proxy, the limit).
    """
    base = random.Random(seed).randbytes(CHUNK_BYTES)
    failure: list[str] = []

    def send_all(sock: socket.socket) -> None:
        try:
            remaining = total_bytes
            index = 0
            while remaining > 0:
                chunk = _chunk(base, index)[:remaining]
                sock.sendall(chunk)
                remaining -= len(chunk)
                index += 1
            sock.shutdown(socket.SHUT_WR)
        except OSError as exc:
            failure.append(f"send: {exc}")

    received = 0
    mismatch_at: Optional[int] = None
    started = time.perf_counter()
    with socket.create_connection(("127.0.0.1", port), timeout=timeout_s) as sock:
        sender = threading.Thread(target=send_all, args=(sock,), daemon=True)
        sender.start()
        buffer = bytearray(CHUNK_BYTES)
        expected_index = -1
        expected = b""
        try:
            while True:
                nbytes = sock.recv_into(buffer)
                if nbytes == 0:
                    break
                pos = 0
                while pos < nbytes and mismatch_at is None:
                    index, within = divmod(received + pos, CHUNK_BYTES)
                    if index != expected_index:
                        expected_index, expected = index, _chunk(base, index)
                    take = min(nbytes - pos, CHUNK_BYTES - within)
                    # bytearray == bytes is a memcmp; memoryview == would go per byte.
                    if buffer[pos:pos + take] != expected[within:within + take]:
                        mismatch_at = received + pos
                    pos += take
                received += nbytes
                if received > total_bytes:
                    break
        except OSError as exc:
            failure.append(f"recv: {exc}")
        sender.join(timeout_s)
    elapsed = time.perf_counter() - started
    metrics: Metrics = {"mb_s": total_bytes / 1e6 / elapsed, "bytes": float(received),
                        "ok": 0.0}
    if failure:
        return metrics, "FAIL: " + "; ".join(failure)
    if mismatch_at is not None:
        return metrics, f"FAIL: the echo differs from what was sent at byte {mismatch_at}"
    if received != total_bytes:
        return metrics, f"FAIL: {received} of {total_bytes} bytes came back"
    metrics["ok"] = 1.0
    return metrics, None
