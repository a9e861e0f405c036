"""Unit tests for rawproxy.stats and rawproxy.metrics: counters rendered in
the Prometheus text format 0.0.4.

The text is read back with prometheus_client's own parser, so a malformed
line, a wrong type or a badly escaped label fails here rather than in a
scraper.  Stats are built by hand; no sockets, no clock.
"""

from __future__ import annotations

import math
from typing import Dict, FrozenSet, Tuple

import pytest
from prometheus_client.metrics_core import Metric
from prometheus_client.parser import text_string_to_metric_families

from rawproxy.metrics import CONTENT_TYPE, FAMILIES, Snapshot, TargetView, render
from rawproxy.stats import CONNECT_LATENCY_BUCKETS_S, AppStats, Histogram, Stats

SampleKey = Tuple[str, FrozenSet[Tuple[str, str]]]

WEB_TARGET = "127.0.0.1:8080"
OTHER_TARGET = "[::1]:9000"


def parse(text: str) -> Dict[str, Metric]:
    families = {family.name: family for family in text_string_to_metric_families(text)}
    assert len(families) == text.count("# TYPE ")  # no family merged or lost
    return families


def samples(family: Metric) -> Dict[SampleKey, float]:
    out: Dict[SampleKey, float] = {}
    for sample in family.samples:
        key = (sample.name, frozenset(sample.labels.items()))
        assert key not in out, f"duplicate sample {key}"
        out[key] = sample.value
    return out


def key(name: str, **labels: str) -> SampleKey:
    return (name, frozenset(labels.items()))


def build_stats() -> Stats:
    stats = Stats(start_time=1_700_000_000.5)
    web = stats.app("web")
    web.accepted = 10
    web.denied = 2
    web.client_limited = 5
    for end in ("client", "client", "target", "idle"):
        web.ended(end)
    web.bytes_in = 1_000
    web.bytes_out = 5_000
    target = web.target(WEB_TARGET)
    target.attempts = 7
    target.connected = 4
    target.failed("refused")
    target.failed("refused")
    target.failed("timeout")
    for seconds in (0.0005, 0.0007, 0.003, 10.0):
        target.latency.observe(seconds)
    web.target(OTHER_TARGET).attempts = 1
    stats.app("db")  # an app that has seen nothing yet
    stats.reloads_ok = 2
    stats.reloads_failed = 1
    stats.last_reload_ok = False
    return stats


def build_snapshot(stats: Stats, draining: bool = True) -> Snapshot:
    snap = Snapshot(stats, active={"web": 3}, live_bytes_in={"web": 24},
                    live_bytes_out={"web": 76},
                    targets={"web": [TargetView(WEB_TARGET, True, 0),
                                     TargetView(OTHER_TARGET, False, 3)],
                             "db": [TargetView("192.0.2.1:5432", True, 0)]},
                    draining=draining, log_lines_dropped=7)
    snap.counter_slots_used = 12  # process-wide, filled in by the caller (cli)
    return snap


@pytest.fixture
def families() -> Dict[str, Metric]:
    return parse(render(build_snapshot(build_stats())))


# -- the exposition as a whole ---------------------------------------------------

def test_content_type_is_text_format_0_0_4() -> None:
    assert CONTENT_TYPE == "text/plain; version=0.0.4; charset=utf-8"


def test_every_family_has_the_right_type(families: Dict[str, Metric]) -> None:
    # The parser names a counter family without its ``_total`` suffix.
    assert {name: family.type for name, family in families.items()} == {
        "rawproxy_connections_accepted": "counter",
        "rawproxy_connections_denied": "counter",
        "rawproxy_connections_client_limited": "counter",
        "rawproxy_connections_closed": "counter",
        "rawproxy_connections_active": "gauge",
        "rawproxy_bytes_in": "counter",
        "rawproxy_bytes_out": "counter",
        "rawproxy_connections_ended": "counter",
        "rawproxy_connect_attempts": "counter",
        "rawproxy_connect_failures": "counter",
        "rawproxy_connect_duration_seconds": "histogram",
        "rawproxy_target_up": "gauge",
        "rawproxy_target_connections_active": "gauge",
        "rawproxy_queue_length": "gauge",
        "rawproxy_queue_wait_seconds": "histogram",
        "rawproxy_target_state": "gauge",
        "rawproxy_machine_starts": "counter",
        "rawproxy_machine_stops": "counter",
        "rawproxy_machine_start_wait_seconds": "histogram",
        "rawproxy_config_reloads": "counter",
        "rawproxy_config_last_reload_successful": "gauge",
        "rawproxy_config_revision": "gauge",  # the --etcd families: no sample without it
        "rawproxy_etcd_connected": "gauge",
        "rawproxy_etcd_watch_restarts": "counter",
        "rawproxy_draining": "gauge",
        "rawproxy_log_lines_dropped": "counter",
        "rawproxy_counter_slots_used": "gauge",
        "rawproxy_process_start_time_seconds": "gauge",
    }
    assert all(family.documentation for family in families.values())


def test_text_ends_with_a_newline_and_has_no_blank_lines() -> None:
    text = render(build_snapshot(build_stats()))
    assert text.endswith("\n")
    assert "" not in text[:-1].split("\n")


# -- per-app counters and gauges ---------------------------------------------------

def test_per_app_counters(families: Dict[str, Metric]) -> None:
    expected = {
        "rawproxy_connections_accepted": ("rawproxy_connections_accepted_total", 10, 0),
        "rawproxy_connections_denied": ("rawproxy_connections_denied_total", 2, 0),
        "rawproxy_connections_client_limited": (
            "rawproxy_connections_client_limited_total", 5, 0),
        "rawproxy_connections_closed": ("rawproxy_connections_closed_total", 4, 0),
        "rawproxy_connections_active": ("rawproxy_connections_active", 3, 0),
    }
    for family_name, (sample_name, web, db) in expected.items():
        assert samples(families[family_name]) == {
            key(sample_name, app="web"): web,
            key(sample_name, app="db"): db,
        }, family_name


def test_live_bytes_of_open_connections_are_added_to_closed_totals(
        families: Dict[str, Metric]) -> None:
    assert samples(families["rawproxy_bytes_in"]) == {
        key("rawproxy_bytes_in_total", app="web"): 1_000 + 24,
        key("rawproxy_bytes_in_total", app="db"): 0,
    }
    assert samples(families["rawproxy_bytes_out"]) == {
        key("rawproxy_bytes_out_total", app="web"): 5_000 + 76,
        key("rawproxy_bytes_out_total", app="db"): 0,
    }


def test_ends_attempts_and_failures(families: Dict[str, Metric]) -> None:
    name = "rawproxy_connections_ended_total"
    assert samples(families["rawproxy_connections_ended"]) == {
        key(name, app="web", end="client"): 2,
        key(name, app="web", end="target"): 1,
        key(name, app="web", end="idle"): 1,
    }
    name = "rawproxy_connect_attempts_total"
    assert samples(families["rawproxy_connect_attempts"]) == {
        key(name, app="web", target=WEB_TARGET): 7,
        key(name, app="web", target=OTHER_TARGET): 1,
    }
    name = "rawproxy_connect_failures_total"
    assert samples(families["rawproxy_connect_failures"]) == {
        key(name, app="web", target=WEB_TARGET, reason="refused"): 2,
        key(name, app="web", target=WEB_TARGET, reason="timeout"): 1,
    }


def test_target_up_gauge(families: Dict[str, Metric]) -> None:
    assert samples(families["rawproxy_target_up"]) == {
        key("rawproxy_target_up", app="web", target=WEB_TARGET): 1,
        key("rawproxy_target_up", app="web", target=OTHER_TARGET): 0,
        key("rawproxy_target_up", app="db", target="192.0.2.1:5432"): 1,
    }


def test_process_wide_samples(families: Dict[str, Metric]) -> None:
    assert samples(families["rawproxy_config_reloads"]) == {
        key("rawproxy_config_reloads_total", result="success"): 2,
        key("rawproxy_config_reloads_total", result="failure"): 1,
    }
    assert samples(families["rawproxy_config_last_reload_successful"]) == {
        key("rawproxy_config_last_reload_successful"): 0}
    assert samples(families["rawproxy_draining"]) == {key("rawproxy_draining"): 1}
    assert samples(families["rawproxy_log_lines_dropped"]) == {
        key("rawproxy_log_lines_dropped_total"): 7}
    assert samples(families["rawproxy_counter_slots_used"]) == {
        key("rawproxy_counter_slots_used"): 12}
    assert samples(families["rawproxy_process_start_time_seconds"]) == {
        key("rawproxy_process_start_time_seconds"): 1_700_000_000.5}


def test_flags_flip_with_state() -> None:
    stats = build_stats()
    stats.last_reload_ok = True
    found = parse(render(build_snapshot(stats, draining=False)))
    assert samples(found["rawproxy_draining"]) == {key("rawproxy_draining"): 0}
    assert samples(found["rawproxy_config_last_reload_successful"]) == {
        key("rawproxy_config_last_reload_successful"): 1}


def test_no_apps_still_renders_every_family() -> None:
    found = parse(render(Snapshot(Stats(start_time=0.0), {}, {}, {}, {}, False)))
    assert len(found) == len(FAMILIES)
    assert samples(found["rawproxy_connections_accepted"]) == {}
    assert samples(found["rawproxy_draining"]) == {key("rawproxy_draining"): 0}


def test_every_counter_field_of_app_stats_is_exported() -> None:
    # A per-app counter is a field of AppStats plus one row of FAMILIES: a
    # field without its row fails here.
    stats = Stats(start_time=0.0)
    app = stats.app("x")
    fields = [name for name in AppStats.__slots__ if isinstance(getattr(app, name), int)]
    assert {"accepted", "denied", "closed", "bytes_in", "bytes_out"} <= set(fields)
    for index, name in enumerate(fields):
        setattr(app, name, 1_000_003 + index)
    exported = {
        sample.value for family in parse(render(Snapshot(stats, {}, {}, {}, {}, False))).values()
        for sample in family.samples if sample.labels == {"app": "x"}}
    missing = [name for name in fields if getattr(app, name) not in exported]
    assert missing == []


def test_const_labels_come_first_on_every_sample() -> None:
    text = render(build_snapshot(build_stats()), (("worker", "3"),))
    sample_lines = [line for line in text.split("\n") if line and not line.startswith("#")]
    assert sample_lines and all(line.split(" ")[0].split("{", 1)[1].startswith('worker="3"')
                                for line in sample_lines)
    assert len(parse(text)) == len(FAMILIES)


# -- the histogram -------------------------------------------------------------------

def test_histogram_buckets_are_cumulative_with_inf_sum_and_count(
        families: Dict[str, Metric]) -> None:
    found = samples(families["rawproxy_connect_duration_seconds"])
    labels = {"app": "web", "target": WEB_TARGET}
    buckets = {
        dict(k[1])["le"]: v for k, v in found.items()
        if k[0] == "rawproxy_connect_duration_seconds_bucket" and dict(k[1])["target"] == WEB_TARGET
    }
    # 0.0005 lies exactly on the first bound (le is <=); 10 s is above the last.
    assert buckets == {
        "0.0005": 1, "0.001": 2, "0.0025": 2, "0.005": 3, "0.01": 3, "0.025": 3,
        "0.05": 3, "0.1": 3, "0.25": 3, "0.5": 3, "1": 3, "2.5": 3, "5": 3, "+Inf": 4,
    }
    assert len(buckets) == len(CONNECT_LATENCY_BUCKETS_S) + 1
    assert math.isclose(found[key("rawproxy_connect_duration_seconds_sum", **labels)],
                        0.0005 + 0.0007 + 0.003 + 10.0)
    assert found[key("rawproxy_connect_duration_seconds_count", **labels)] == 4
    # The target with no observations still has its whole series, all zero.
    other = {"app": "web", "target": OTHER_TARGET}
    assert found[key("rawproxy_connect_duration_seconds_bucket", le="+Inf", **other)] == 0
    assert found[key("rawproxy_connect_duration_seconds_count", **other)] == 0
    assert found[key("rawproxy_connect_duration_seconds_sum", **other)] == 0


def test_histogram_bounds_parse_as_the_configured_floats(
        families: Dict[str, Metric]) -> None:
    bounds = sorted(float(s.labels["le"]) for s in families["rawproxy_connect_duration_seconds"].samples
                    if s.name.endswith("_bucket") and s.labels["target"] == WEB_TARGET)
    assert bounds == [*CONNECT_LATENCY_BUCKETS_S, math.inf]


def test_observe_exactly_on_a_bound_counts_in_that_bucket() -> None:
    hist = Histogram((1.0, 2.0, 4.0))
    hist.observe(2.0)
    assert hist.counts == [0, 1, 0]
    assert hist.cumulative() == [(1.0, 0), (2.0, 1), (4.0, 1), (math.inf, 1)]


def test_observe_above_the_last_bound_only_reaches_inf() -> None:
    hist = Histogram((1.0, 2.0))
    hist.observe(2.000001)
    hist.observe(1e9)
    assert hist.counts == [0, 0]
    assert hist.cumulative() == [(1.0, 0), (2.0, 0), (math.inf, 2)]
    assert hist.count == 2 and hist.total == pytest.approx(1e9 + 2.000001)


def test_observe_below_the_first_bound_and_zero() -> None:
    hist = Histogram((1.0, 2.0))
    hist.observe(0.0)
    hist.observe(0.999)
    hist.observe(1.5)
    assert hist.cumulative() == [(1.0, 2), (2.0, 3), (math.inf, 3)]
    assert hist.total == pytest.approx(2.499)


def test_empty_histogram() -> None:
    hist = Histogram()
    assert hist.cumulative() == [(b, 0) for b in CONNECT_LATENCY_BUCKETS_S] + [(math.inf, 0)]
    assert hist.total == 0.0 and hist.count == 0


# -- label escaping ---------------------------------------------------------------------

@pytest.mark.parametrize("name", [
    'say "hi"', "back\\slash", "new\nline", 'all\\"\n"\\', "trailing\\", "plain",
])
def test_app_names_are_escaped_and_parse_back(name: str) -> None:
    stats = Stats(start_time=0.0)
    app = stats.app(name)
    app.accepted = 5
    app.target(WEB_TARGET).latency.observe(0.01)
    found = parse(render(Snapshot(stats, {name: 1}, {}, {}, {}, False)))
    assert samples(found["rawproxy_connections_accepted"]) == {
        key("rawproxy_connections_accepted_total", app=name): 5}
    assert samples(found["rawproxy_connections_active"]) == {
        key("rawproxy_connections_active", app=name): 1}
    assert found["rawproxy_connect_duration_seconds"].samples[-1].labels["app"] == name


def test_escaping_is_the_text_format_one() -> None:
    stats = Stats(start_time=0.0)
    stats.app('a"b\\c\nd').accepted = 1
    text = render(Snapshot(stats, {}, {}, {}, {}, False))
    assert 'rawproxy_connections_accepted_total{app="a\\"b\\\\c\\nd"} 1\n' in text
    sample_lines = [line for line in text.split("\n") if line and not line.startswith("#")]
    assert all("\n" not in line for line in sample_lines)
