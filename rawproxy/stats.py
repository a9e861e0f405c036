"""Counters the proxy keeps for ``/metrics``: plain objects, no I/O.

Sessions bump fields directly (an attribute increment is the cheapest
thing Python does); rendering to the Prometheus text format happens only
when someone scrapes (``metrics.py``).  Statistics are kept per app name and
per target address, so they survive a reload that keeps the name.
"""

from __future__ import annotations

import bisect
import time
from typing import Optional

# Connect latency on loopback is ~100 us, across a region tens of ms; the
# buckets span both, HAProxy-style, in seconds as Prometheus wants.
CONNECT_LATENCY_BUCKETS_S = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05,
                             0.1, 0.25, 0.5, 1.0, 2.5, 5.0)
# Time in an app's queue for a slot (SPEC 9): a slot freed by a closing
# connection is handed on within a loop turn, a backlog drains in seconds,
# and QueueTimeout (default 5 s) ends the wait.
QUEUE_WAIT_BUCKETS_S = (0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5,
                        1.0, 2.5, 5.0, 10.0, 30.0)
# How long a client waited for a machine to start (SPEC 10): a machine
# that is a process listens within milliseconds, a VM within seconds, and
# StartTimeout (default 10 s) ends the wait.
START_WAIT_BUCKETS_S = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0,
                        10.0, 30.0)


class Histogram:
    __slots__ = ("bounds", "counts", "total", "count")

    def __init__(self, bounds: tuple[float, ...] = CONNECT_LATENCY_BUCKETS_S) -> None:
        self.bounds = bounds
        self.counts = [0] * len(bounds)  # per bucket, not cumulative
        self.total = 0.0
        self.count = 0

    def observe(self, value: float) -> None:
        index = bisect.bisect_left(self.bounds, value)
        if index < len(self.counts):
            self.counts[index] += 1
        self.total += value
        self.count += 1

    def cumulative(self) -> list[tuple[float, int]]:
        """(upper bound, observations <= bound) pairs, +Inf last."""
        out = []
        running = 0
        for bound, count in zip(self.bounds, self.counts):
            running += count
            out.append((bound, running))
        out.append((float("inf"), self.count))
        return out


class TargetStats:
    __slots__ = ("attempts", "connected", "failures", "latency")

    def __init__(self) -> None:
        self.attempts = 0
        self.connected = 0
        self.failures: dict[str, int] = {}
        self.latency = Histogram()

    def failed(self, reason: str) -> None:
        self.failures[reason] = self.failures.get(reason, 0) + 1


class AppStats:
    __slots__ = ("accepted", "denied", "client_limited", "closed", "bytes_in", "bytes_out",
                 "ends", "targets", "queue_wait", "machine_starts", "machine_stops",
                 "start_wait")

    def __init__(self) -> None:
        self.accepted = 0
        self.denied = 0
        self.client_limited = 0  # reset at accept by PerClient
        self.closed = 0
        self.bytes_in = 0    # client -> target, of closed connections
        self.bytes_out = 0   # target -> client, of closed connections
        self.ends: dict[str, int] = {}
        self.targets: dict[str, TargetStats] = {}
        self.queue_wait = Histogram(QUEUE_WAIT_BUCKETS_S)  # each wait for a slot, however it ended
        # Machine starts and stops by result ("ok", "failed", "timeout"), and
        # each client's wait for a start, however it ended (SPEC 10).
        self.machine_starts: dict[str, int] = {}
        self.machine_stops: dict[str, int] = {}
        self.start_wait = Histogram(START_WAIT_BUCKETS_S)

    def target(self, address: str) -> TargetStats:
        stats = self.targets.get(address)
        if stats is None:
            stats = self.targets[address] = TargetStats()
        return stats

    def ended(self, end: str) -> None:
        self.closed += 1
        self.ends[end] = self.ends.get(end, 0) + 1


class Stats:
    def __init__(self, start_time: Optional[float] = None) -> None:
        self.apps: dict[str, AppStats] = {}
        self.reloads_ok = 0
        self.reloads_failed = 0
        self.last_reload_ok = True
        self.start_time = time.time() if start_time is None else start_time
        # --etcd only (None otherwise, and then not exported): the store
        # revision the running config reflects, whether the watch is up, and
        # how often an endpoint was lost and the watch set up again.
        self.config_revision: Optional[int] = None
        self.etcd_connected: Optional[bool] = None
        self.etcd_watch_restarts = 0

    def app(self, name: str) -> AppStats:
        stats = self.apps.get(name)
        if stats is None:
            stats = self.apps[name] = AppStats()
        return stats
