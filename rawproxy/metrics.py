"""Prometheus text exposition format 0.0.4, rendered only when scraped.

``render(snapshot)`` turns a :class:`Snapshot` (counters plus the gauges that
need the live server: open connections, bytes of open connections, target
health) into the text a Prometheus server parses.  Every metric is named
``rawproxy_*`` and labelled by ``app`` (and ``target`` where it applies).
"""

from __future__ import annotations

from typing import Iterable, Mapping

from .stats import Histogram, Stats

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"


class TargetView:
    __slots__ = ("address", "up", "consecutive_failures")

    def __init__(self, address: str, up: bool, consecutive_failures: int) -> None:
        self.address = address
        self.up = up
        self.consecutive_failures = consecutive_failures


class Snapshot:
    """What the metrics need from the running server, at scrape time."""

    __slots__ = ("stats", "active", "live_bytes_in", "live_bytes_out", "targets", "draining",
                 "log_lines_dropped")

    def __init__(self, stats: Stats, active: Mapping[str, int],
                 live_bytes_in: Mapping[str, int], live_bytes_out: Mapping[str, int],
                 targets: Mapping[str, list[TargetView]], draining: bool,
                 log_lines_dropped: int = 0) -> None:
        self.stats = stats
        self.active = active
        self.live_bytes_in = live_bytes_in
        self.live_bytes_out = live_bytes_out
        self.targets = targets
        self.draining = draining
        # A process-wide count (the log sink's), filled in by whoever owns it.
        self.log_lines_dropped = log_lines_dropped


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


class _Writer:
    def __init__(self, const_labels: tuple[tuple[str, str], ...] = ()) -> None:
        self.lines: list[str] = []
        self._const = const_labels

    def family(self, name: str, kind: str, help_text: str) -> None:
        self.lines.append(f"# HELP {name} {help_text}")
        self.lines.append(f"# TYPE {name} {kind}")

    def sample(self, name: str, labels: Iterable[tuple[str, str]], value: float) -> None:
        self.lines.append(f"{name}{_labels((*self._const, *labels))} {_number(value)}")

    def histogram(self, name: str, labels: tuple[tuple[str, str], ...], hist: Histogram) -> None:
        for bound, count in hist.cumulative():
            self.sample(f"{name}_bucket", labels + (("le", _number(bound)),), count)
        self.sample(f"{name}_sum", labels, hist.total)
        self.sample(f"{name}_count", labels, hist.count)


def render(snap: Snapshot, const_labels: tuple[tuple[str, str], ...] = ()) -> str:
    """The exposition; ``const_labels`` (e.g. ``worker``) go on every sample."""
    out = _Writer(const_labels)
    apps = sorted(snap.stats.apps.items())
    per_app = (
        ("connections_accepted_total", "counter", "Client connections accepted.",
         lambda name, a: a.accepted),
        ("connections_denied_total", "counter", "Client connections refused by AllowFrom.",
         lambda name, a: a.denied),
        ("connections_closed_total", "counter", "Client connections closed.",
         lambda name, a: a.closed),
        ("connections_active", "gauge", "Client connections open now.",
         lambda name, a: snap.active.get(name, 0)),
        ("bytes_in_total", "counter", "Bytes relayed from clients to targets.",
         lambda name, a: a.bytes_in + snap.live_bytes_in.get(name, 0)),
        ("bytes_out_total", "counter", "Bytes relayed from targets to clients.",
         lambda name, a: a.bytes_out + snap.live_bytes_out.get(name, 0)),
    )
    for suffix, kind, help_text, value in per_app:
        out.family(f"rawproxy_{suffix}", kind, help_text)
        for name, app in apps:
            out.sample(f"rawproxy_{suffix}", (("app", name),), value(name, app))

    out.family("rawproxy_connections_ended_total", "counter",
               "Closed connections by how they ended.")
    for name, app in apps:
        for end, count in sorted(app.ends.items()):
            out.sample("rawproxy_connections_ended_total", (("app", name), ("end", end)), count)

    out.family("rawproxy_connect_attempts_total", "counter", "Connect attempts to targets.")
    for name, app in apps:
        for address, target in sorted(app.targets.items()):
            out.sample("rawproxy_connect_attempts_total",
                       (("app", name), ("target", address)), target.attempts)
    out.family("rawproxy_connect_failures_total", "counter",
               "Failed connect attempts to targets, by reason.")
    for name, app in apps:
        for address, target in sorted(app.targets.items()):
            for reason, count in sorted(target.failures.items()):
                out.sample("rawproxy_connect_failures_total",
                           (("app", name), ("target", address), ("reason", reason)), count)
    out.family("rawproxy_connect_duration_seconds", "histogram",
               "Time from choosing a target to its connection being established.")
    for name, app in apps:
        for address, target in sorted(app.targets.items()):
            out.histogram("rawproxy_connect_duration_seconds",
                          (("app", name), ("target", address)), target.latency)

    out.family("rawproxy_target_up", "gauge",
               "1 if the target is eligible for new connections, 0 while marked down.")
    for name, views in sorted(snap.targets.items()):
        for view in views:
            out.sample("rawproxy_target_up", (("app", name), ("target", view.address)),
                       1 if view.up else 0)

    stats = snap.stats
    out.family("rawproxy_config_reloads_total", "counter", "Config reloads, by result.")
    out.sample("rawproxy_config_reloads_total", (("result", "success"),), stats.reloads_ok)
    out.sample("rawproxy_config_reloads_total", (("result", "failure"),), stats.reloads_failed)
    out.family("rawproxy_config_last_reload_successful", "gauge",
               "1 if the last reload succeeded (or none was tried).")
    out.sample("rawproxy_config_last_reload_successful", (), 1 if stats.last_reload_ok else 0)
    out.family("rawproxy_draining", "gauge", "1 while draining for shutdown.")
    out.sample("rawproxy_draining", (), 1 if snap.draining else 0)
    out.family("rawproxy_log_lines_dropped_total", "counter",
               "Log lines dropped because stderr was not taking them.")
    out.sample("rawproxy_log_lines_dropped_total", (), snap.log_lines_dropped)
    out.family("rawproxy_process_start_time_seconds", "gauge",
               "Start time of the process since the Unix epoch, in seconds.")
    out.sample("rawproxy_process_start_time_seconds", (), stats.start_time)
    return "\n".join(out.lines) + "\n"
