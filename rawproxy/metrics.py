"""Prometheus text exposition format 0.0.4, rendered only when scraped.

``render(snapshot)`` turns a :class:`Snapshot` (counters plus the gauges that
need the live server: open connections, bytes of open connections, target
health) into the text a Prometheus server parses.  Every metric is named
``rawproxy_*`` and labelled by ``app`` (and ``target`` where it applies).

The exposition is the table :data:`FAMILIES`, in order: each row names a
family and says how to read its samples from a snapshot, so a new per-app
counter is one field of :class:`~rawproxy.stats.AppStats` and one row.
"""

from __future__ import annotations

from operator import attrgetter
from typing import Callable, Iterable, Iterator, Mapping, Optional

from .stats import AppStats, Stats, TargetStats

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"


class TargetView:
    __slots__ = ("address", "up", "consecutive_failures", "open_connections", "state")

    def __init__(self, address: str, up: bool, consecutive_failures: int,
                 open_connections: int = 0, state: str = "") -> None:
        self.address = address
        # up, down, starting or stopped (SPEC 10); derived from ``up`` if not given
        self.state = state or ("up" if up else "down")
        self.up = up
        self.consecutive_failures = consecutive_failures
        self.open_connections = open_connections  # from this process (worker)


class Snapshot:
    """What the metrics need from the running server, at scrape time."""

    __slots__ = ("stats", "active", "live_bytes_in", "live_bytes_out", "targets", "draining",
                 "log_lines_dropped", "queued", "counter_slots_used")

    def __init__(self, stats: Stats, active: Mapping[str, int],
                 live_bytes_in: Mapping[str, int], live_bytes_out: Mapping[str, int],
                 targets: Mapping[str, list[TargetView]], draining: bool,
                 log_lines_dropped: int = 0, queued: Optional[Mapping[str, int]] = None) -> None:
        self.queued = queued or {}  # clients waiting for a slot, by app
        self.stats = stats
        self.active = active
        self.live_bytes_in = live_bytes_in
        self.live_bytes_out = live_bytes_out
        self.targets = targets
        self.draining = draining
        # A process-wide count (the log sink's), filled in by whoever owns it.
        self.log_lines_dropped = log_lines_dropped
        # Shared counter slots taken (process-wide, never given back: see
        # rawproxy.counters), filled in by whoever holds the counters.
        self.counter_slots_used = 0


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def _labels(pairs: Iterable[tuple[str, str]]) -> str:
    inner = ",".join(f'{key}="{_escape(value)}"' for key, value in pairs)
    return "{" + inner + "}" if inner else ""


def _number(value: float) -> str:
    if value == float("inf"):
        return "+Inf"
    if isinstance(value, int) or float(value).is_integer():
        return str(int(value))
    return repr(float(value))


Labels = tuple[tuple[str, str], ...]
# (name suffix, labels, value): the suffix is "" but for histogram series.
Sample = tuple[str, Labels, float]


class Family:
    """One metric family: its name (after ``rawproxy_``), type, help text and
    the samples it reads from a snapshot."""

    __slots__ = ("name", "kind", "help_text", "samples")

    def __init__(self, name: str, kind: str, help_text: str,
                 samples: Callable[[Snapshot], Iterator[Sample]]) -> None:
        self.name = name
        self.kind = kind
        self.help_text = help_text
        self.samples = samples


def _per_app(value: Callable[[Snapshot, str, AppStats], float]
             ) -> Callable[[Snapshot], Iterator[Sample]]:
    def samples(snap: Snapshot) -> Iterator[Sample]:
        for name, app in sorted(snap.stats.apps.items()):
            yield "", (("app", name),), value(snap, name, app)
    return samples


def _app_field(field: str) -> Callable[[Snapshot], Iterator[Sample]]:
    """A plain per-app counter: the ``AppStats`` attribute ``field``."""
    get = attrgetter(field)
    return _per_app(lambda snap, name, app: get(app))


def _per_target(snap: Snapshot) -> Iterator[tuple[Labels, TargetStats]]:
    for name, app in sorted(snap.stats.apps.items()):
        for address, target in sorted(app.targets.items()):
            yield (("app", name), ("target", address)), target


def _ends(snap: Snapshot) -> Iterator[Sample]:
    for name, app in sorted(snap.stats.apps.items()):
        for end, count in sorted(app.ends.items()):
            yield "", (("app", name), ("end", end)), count


def _attempts(snap: Snapshot) -> Iterator[Sample]:
    for labels, target in _per_target(snap):
        yield "", labels, target.attempts


def _failures(snap: Snapshot) -> Iterator[Sample]:
    for labels, target in _per_target(snap):
        for reason, count in sorted(target.failures.items()):
            yield "", labels + (("reason", reason),), count


def _latency(snap: Snapshot) -> Iterator[Sample]:
    for labels, target in _per_target(snap):
        hist = target.latency
        for bound, count in hist.cumulative():
            yield "_bucket", labels + (("le", _number(bound)),), count
        yield "_sum", labels, hist.total
        yield "_count", labels, hist.count


def _target_up(snap: Snapshot) -> Iterator[Sample]:
    for name, views in sorted(snap.targets.items()):
        for view in views:
            yield "", (("app", name), ("target", view.address)), 1 if view.up else 0


def _target_open(snap: Snapshot) -> Iterator[Sample]:
    for name, views in sorted(snap.targets.items()):
        for view in views:
            yield "", (("app", name), ("target", view.address)), view.open_connections


TARGET_STATES = ("up", "down", "starting", "stopped")


def _target_state(snap: Snapshot) -> Iterator[Sample]:
    for name, views in sorted(snap.targets.items()):
        for view in views:
            for state in TARGET_STATES:
                labels = (("app", name), ("target", view.address), ("state", state))
                yield "", labels, 1 if view.state == state else 0


def _app_histogram(field: str) -> Callable[[Snapshot], Iterator[Sample]]:
    """A per-app histogram: the ``AppStats`` attribute ``field``."""
    get = attrgetter(field)

    def samples(snap: Snapshot) -> Iterator[Sample]:
        for name, app in sorted(snap.stats.apps.items()):
            labels, hist = (("app", name),), get(app)
            for bound, count in hist.cumulative():
                yield "_bucket", labels + (("le", _number(bound)),), count
            yield "_sum", labels, hist.total
            yield "_count", labels, hist.count
    return samples


def _results(field: str) -> Callable[[Snapshot], Iterator[Sample]]:
    """Per app and ``result``: the ``AppStats`` dict ``field``."""
    get = attrgetter(field)

    def samples(snap: Snapshot) -> Iterator[Sample]:
        for name, app in sorted(snap.stats.apps.items()):
            for result, count in sorted(get(app).items()):
                yield "", (("app", name), ("result", result)), count
    return samples


_queue_wait = _app_histogram("queue_wait")


def _reloads(snap: Snapshot) -> Iterator[Sample]:
    yield "", (("result", "success"),), snap.stats.reloads_ok
    yield "", (("result", "failure"),), snap.stats.reloads_failed


def _one(value: Callable[[Snapshot], float]) -> Callable[[Snapshot], Iterator[Sample]]:
    """A family of one unlabelled sample."""
    def samples(snap: Snapshot) -> Iterator[Sample]:
        yield "", (), value(snap)
    return samples


def _etcd(value: Callable[[Stats], float]) -> Callable[[Snapshot], Iterator[Sample]]:
    """A family of one unlabelled sample, exported only under --etcd."""
    def samples(snap: Snapshot) -> Iterator[Sample]:
        if snap.stats.etcd_connected is not None:
            yield "", (), value(snap.stats)
    return samples


# The exposition, in order.  A new per-app counter is a field of AppStats
# and one _app_field row here.
FAMILIES = (
    Family("connections_accepted_total", "counter", "Client connections accepted.",
           _app_field("accepted")),
    Family("connections_denied_total", "counter", "Client connections refused by AllowFrom.",
           _app_field("denied")),
    Family("connections_client_limited_total", "counter",
           "Client connections reset at accept by the app's PerClient limits.",
           _app_field("client_limited")),
    Family("connections_closed_total", "counter", "Client connections closed.",
           _app_field("closed")),
    Family("connections_active", "gauge", "Client connections open now.",
           _per_app(lambda snap, name, app: snap.active.get(name, 0))),
    Family("bytes_in_total", "counter", "Bytes relayed from clients to targets.",
           _per_app(lambda snap, name, app: app.bytes_in + snap.live_bytes_in.get(name, 0))),
    Family("bytes_out_total", "counter", "Bytes relayed from targets to clients.",
           _per_app(lambda snap, name, app: app.bytes_out + snap.live_bytes_out.get(name, 0))),
    Family("connections_ended_total", "counter", "Closed connections by how they ended.",
           _ends),
    Family("connect_attempts_total", "counter", "Connect attempts to targets.", _attempts),
    Family("connect_failures_total", "counter",
           "Failed connect attempts to targets, by reason.", _failures),
    Family("connect_duration_seconds", "histogram",
           "Time from choosing a target to its connection being established.", _latency),
    Family("target_up", "gauge",
           "1 if the target is eligible for new connections, 0 while marked down.",
           _target_up),
    Family("target_connections_active", "gauge",
           "Connections open (or being connected) to the target now.", _target_open),
    Family("queue_length", "gauge",
           "Clients waiting in the app's queue for a target below its HardLimit.",
           _per_app(lambda snap, name, app: snap.queued.get(name, 0))),
    Family("queue_wait_seconds", "histogram",
           "Time clients waited in the app's queue, however the wait ended.", _queue_wait),
    Family("target_state", "gauge",
           "1 for the target's state (up, down, starting, stopped), 0 for the others.",
           _target_state),
    Family("machine_starts_total", "counter",
           "Machine starts (Machines), by result: ok, failed (hook), timeout.",
           _results("machine_starts")),
    Family("machine_stops_total", "counter",
           "Machine stops after StopAfter idle (Machines), by result: ok, failed.",
           _results("machine_stops")),
    Family("machine_start_wait_seconds", "histogram",
           "Time clients waited for a machine to start, however the wait ended.",
           _app_histogram("start_wait")),
    Family("config_reloads_total", "counter", "Config reloads, by result.", _reloads),
    Family("config_last_reload_successful", "gauge",
           "1 if the last reload succeeded (or none was tried).",
           _one(lambda snap: 1 if snap.stats.last_reload_ok else 0)),
    Family("config_revision", "gauge",
           "The etcd revision the running config reflects (--etcd).",
           _etcd(lambda stats: stats.config_revision or 0)),
    Family("etcd_connected", "gauge", "1 while the etcd watch is up (--etcd).",
           _etcd(lambda stats: 1 if stats.etcd_connected else 0)),
    Family("etcd_watch_restarts_total", "counter",
           "Times an etcd endpoint was lost and the watch set up again (--etcd).",
           _etcd(lambda stats: stats.etcd_watch_restarts)),
    Family("draining", "gauge", "1 while draining for shutdown.",
           _one(lambda snap: 1 if snap.draining else 0)),
    Family("log_lines_dropped_total", "counter",
           "Log lines dropped because stderr was not taking them.",
           _one(lambda snap: snap.log_lines_dropped)),
    Family("counter_slots_used", "gauge",
           "Slots taken in the shared connection counters, of 16384; never freed "
           "before a restart, and a reload needing more is rejected.",
           _one(lambda snap: snap.counter_slots_used)),
    Family("process_start_time_seconds", "gauge",
           "Start time of the process since the Unix epoch, in seconds.",
           _one(lambda snap: snap.stats.start_time)),
)


def render(snap: Snapshot, const_labels: Labels = ()) -> str:
    """The exposition; ``const_labels`` (e.g. ``worker``) go on every sample."""
    lines: list[str] = []
    for family in FAMILIES:
        name = "rawproxy_" + family.name
        lines.append(f"# HELP {name} {family.help_text}")
        lines.append(f"# TYPE {name} {family.kind}")
        for suffix, labels, value in family.samples(snap):
            lines.append(f"{name}{suffix}{_labels((*const_labels, *labels))} {_number(value)}")
    return "\n".join(lines) + "\n"
