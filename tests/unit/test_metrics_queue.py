"""Unit tests for the load metrics of SPEC 9: open connections per target,
queue length and queue wait per app, read back with prometheus_client's
parser.  Stats and snapshots are built by hand; no sockets.
"""

from __future__ import annotations

from prometheus_client.parser import text_string_to_metric_families

from rawproxy.metrics import Snapshot, TargetView, render
from rawproxy.stats import QUEUE_WAIT_BUCKETS_S, Stats


def sample_values(text: str, family_name: str) -> dict[tuple[str, tuple[tuple[str, str], ...]],
                                                       float]:
    out = {}
    for family in text_string_to_metric_families(text):
        if family.name == family_name:
            for sample in family.samples:
                out[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return out


def snapshot() -> Snapshot:
    stats = Stats(start_time=0.0)
    web = stats.app("web")
    for seconds in (0.002, 0.3, 5.0, 40.0):
        web.queue_wait.observe(seconds)
    stats.app("db")
    targets = {"web": [TargetView("10.0.0.1:80", True, 0, 3), TargetView("10.0.0.2:80", False, 2)],
               "db": [TargetView("10.0.0.3:5432", True, 0, 1)]}
    return Snapshot(stats, {"web": 5, "db": 1}, {}, {}, targets, False, queued={"web": 2})


def test_open_connections_per_target() -> None:
    found = sample_values(render(snapshot()), "rawproxy_target_connections_active")
    assert found == {
        ("rawproxy_target_connections_active", (("app", "db"), ("target", "10.0.0.3:5432"))): 1,
        ("rawproxy_target_connections_active", (("app", "web"), ("target", "10.0.0.1:80"))): 3,
        ("rawproxy_target_connections_active", (("app", "web"), ("target", "10.0.0.2:80"))): 0,
    }


def test_queue_length_per_app_zero_when_none_waits() -> None:
    found = sample_values(render(snapshot()), "rawproxy_queue_length")
    assert found == {("rawproxy_queue_length", (("app", "db"),)): 0,
                     ("rawproxy_queue_length", (("app", "web"),)): 2}


def test_queue_wait_histogram() -> None:
    found = sample_values(render(snapshot(), (("worker", "1"),)), "rawproxy_queue_wait_seconds")
    labels = (("app", "web"), ("worker", "1"))
    buckets = {dict(k[1])["le"]: v for k, v in found.items()
               if k[0] == "rawproxy_queue_wait_seconds_bucket" and dict(k[1])["app"] == "web"}
    assert len(buckets) == len(QUEUE_WAIT_BUCKETS_S) + 1
    assert (buckets["0.001"], buckets["0.005"], buckets["0.25"], buckets["0.5"]) == (0, 1, 1, 2)
    assert (buckets["5"], buckets["30"], buckets["+Inf"]) == (3, 3, 4)
    assert found[("rawproxy_queue_wait_seconds_count", labels)] == 4
    assert abs(found[("rawproxy_queue_wait_seconds_sum", labels)] - 45.302) < 1e-9
    assert found[("rawproxy_queue_wait_seconds_count", (("app", "db"), ("worker", "1")))] == 0
