"""Unit tests for the etcd source's pure parts: endpoints, the key space,
the config made of it (rawproxy.fleet), the endpoint cycle and the reports
of the watch thread (rawproxy.fleetwatch), and the loop side that applies
them (rawproxy.fleetsource.EtcdReloader) against a fake server.  No etcd
and no sockets: the integration tests run the real thing."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Iterator, List, Mapping, Optional, cast

import pytest

from rawproxy.config import Config, ConfigError, parse_config
from rawproxy.etcd import Client, Endpoint, Event, KeyValue, parse_endpoints, prefix_end
from rawproxy.fleet import FleetState, compose, load_cache, parse_target, save_cache
from rawproxy.fleetsource import EtcdReloader, FleetStart
from rawproxy.fleetwatch import (MAX_PAUSE_S, Applied, EndpointCycle, Link, Rejected, Report,
                                 Unchanged, Watcher)
from rawproxy.loop import EventLoop
from rawproxy.metrics import Snapshot, render
from rawproxy.server import Server
from rawproxy.stats import Stats

PREFIX = b"/rawproxy/"


def config_bytes(*apps: Mapping[str, object]) -> bytes:
    return json.dumps({"Apps": list(apps)}).encode()


WEB: dict[str, object] = {"Name": "web", "Ports": [8080], "Targets": []}


def state(config: Optional[bytes] = None, revision: int = 7,
          **registrations: str) -> FleetState:
    values = {PREFIX + b"config": config if config is not None else config_bytes(WEB)}
    for key, value in registrations.items():
        values[PREFIX + b"targets/" + key.replace("__", "/").encode()] = value.encode()
    return FleetState(PREFIX, revision, values)


# -- endpoints and keys -----------------------------------------------------------

def test_endpoints_parse_and_print_back() -> None:
    endpoints = parse_endpoints("http://127.0.0.1:2379, https://[::1]:2380,http://localhost")
    assert [str(e) for e in endpoints] == [
        "http://127.0.0.1:2379", "https://[::1]:2380", "http://localhost:80"]


@pytest.mark.parametrize("text", ["", "127.0.0.1:2379", "ftp://h:1", "http://h:99999",
                                  "http://h:1/v3", "http://u:p@h:1", "http://:1"])
def test_bad_endpoints_are_refused_in_one_line(text: str) -> None:
    with pytest.raises(ValueError, match="is not an etcd URL"):
        parse_endpoints(text)


def test_prefix_end_covers_exactly_the_prefix() -> None:
    assert prefix_end(b"/rawproxy/") == b"/rawproxy0"
    assert prefix_end(b"a\xff\xff") == b"b"
    assert prefix_end(b"\xff") == b"\0"  # every key


def test_state_follows_events_and_resumes_after_the_last_seen() -> None:
    s = FleetState(PREFIX, 10)
    s.apply([Event(False, KeyValue(PREFIX + b"config", b"{}", 11, 0)),
             Event(False, KeyValue(PREFIX + b"targets/web/a", b'"h:1"', 12, 5)),
             Event(True, KeyValue(PREFIX + b"targets/web/a", b"", 13, 0))])
    assert s.values == {PREFIX + b"config": b"{}"}
    assert (s.revision, s.resume_from) == (13, 14)


# -- the config made of the keys -----------------------------------------------------

def test_registered_targets_join_their_app_in_key_order() -> None:
    composed = compose(state(web__b='"10.0.0.2:80"', web__a='"10.0.0.1:80"',
                             web__c='{"Address": "10.0.0.3:80", "Weight": 5}'))
    (app,) = composed.config.apps
    assert [(t.address, t.weight) for t in app.targets] == [
        ("10.0.0.1:80", 1), ("10.0.0.2:80", 1), ("10.0.0.3:80", 5)]
    assert composed.registered == 3 and composed.skipped == ()
    assert composed.config.source == "etcd:/rawproxy/config"


def test_a_listed_target_is_not_added_twice() -> None:
    listed = dict(WEB, Targets=["10.0.0.1:80"])
    composed = compose(state(config_bytes(listed), web__a='"10.0.0.1:80"', web__b='"10.0.0.2:80"'))
    assert [t.address for t in composed.config.apps[0].targets] == ["10.0.0.1:80", "10.0.0.2:80"]


def test_bad_registrations_are_left_out_and_said_so() -> None:
    composed = compose(state(web__a='"10.0.0.1:80"', web__bad='"nope"', other__x='"h:1"',
                             noid='"h:2"', web__json='"h:1"], 1'))
    assert [t.address for t in composed.config.apps[0].targets] == ["10.0.0.1:80"]
    assert composed.skipped == (
        'etcd:/rawproxy/targets/noid: not /rawproxy/targets/APP/ID',
        'etcd:/rawproxy/targets/other/x: no app "other" in the config',
        'etcd:/rawproxy/targets/web/bad: "nope" is not "host:port"',
        'etcd:/rawproxy/targets/web/json: invalid JSON at line 1 column 6: Extra data')


def test_an_invalid_config_key_is_the_file_message_with_the_key_for_a_name() -> None:
    bad = config_bytes({"Name": "web", "Ports": [70000], "Targets": ["h:1"]})
    with pytest.raises(ConfigError) as from_file:
        parse_config(bad, "config.json")
    with pytest.raises(ConfigError) as from_etcd:
        compose(state(bad))
    assert str(from_etcd.value) == str(from_file.value).replace(
        "config.json", "etcd:/rawproxy/config")


def test_empty_targets_only_under_etcd() -> None:
    assert compose(state()).config.apps[0].targets == ()
    with pytest.raises(ConfigError, match="must be a non-empty list of targets"):
        parse_config(config_bytes(WEB), "config.json")


def test_no_config_key_is_an_error() -> None:
    with pytest.raises(ConfigError, match="^etcd:/rawproxy/config: no such key"):
        compose(FleetState(PREFIX, 3))


def test_parse_target_names_the_key() -> None:
    with pytest.raises(ConfigError) as caught:
        parse_target(b'{"Address": "h:1", "Weight": 0}', "etcd:/k")
    assert str(caught.value).startswith("etcd:/k")
    assert "Weight" in str(caught.value) and "Apps[0]" not in str(caught.value)


# -- the cache ----------------------------------------------------------------------

def test_cache_round_trip_keeps_the_served_config(tmp_path: Path) -> None:
    config = compose(state(web__a='"10.0.0.1:80"')).config
    path = tmp_path / "cache.json"
    save_cache(str(path), 42, config)
    revision, loaded = load_cache(str(path))
    assert revision == 42 and loaded.apps == config.apps and loaded.source == str(path)
    assert [p.name for p in tmp_path.iterdir()] == ["cache.json"]  # no temporary left


@pytest.mark.parametrize("text, message", [
    ("{", "not a cache file"),
    ('{"Apps": []}', 'no "Revision" and "Config"'),
    ('{"Revision": 1, "Config": {"Apps": [{"Name": "x"}]}}', "missing"),
])
def test_a_bad_cache_says_what_is_wrong(tmp_path: Path, text: str, message: str) -> None:
    path = tmp_path / "cache.json"
    path.write_text(text)
    with pytest.raises(ConfigError, match=message):
        load_cache(str(path))


# -- the endpoint cycle and the watch thread's reports ---------------------------------

def test_the_cycle_pauses_only_after_every_endpoint_failed() -> None:
    cycle = EndpointCycle(3)
    assert [cycle.failed() for _ in range(3)] == [0.0, 0.0, 0.1]
    assert cycle.index == 0
    pauses = [cycle.failed() for _ in range(30)]
    assert max(pauses) == MAX_PAUSE_S and pauses[2] == 0.2
    cycle.succeeded()
    assert [cycle.failed() for _ in range(3)] == [0.0, 0.0, 0.1]


def make_watcher(start: FleetState) -> tuple[Watcher, List[Report]]:
    reports: List[Report] = []
    client = Client(Endpoint("http", "127.0.0.1", 1), 1.0)  # never called
    return Watcher([client], start, reports.append), reports


def test_reports_carry_only_changes() -> None:
    watcher, reports = make_watcher(state())
    watcher._state = state(revision=8)  # an event elsewhere under the prefix
    watcher._report("etcd revision 8", False)
    watcher._state = state(revision=9, web__a='"10.0.0.1:80"')
    watcher._report("etcd revision 9", False)
    watcher._state = state(config_bytes({"Name": "web"}), revision=10)
    watcher._report("etcd revision 10", False)
    watcher._state = state(config_bytes({"Name": "web"}), revision=11)
    watcher._report("etcd revision 11", False)  # still invalid: nothing to say
    watcher._report("SIGHUP, etcd revision 11", True)
    assert [type(r).__name__ for r in reports] == [
        "Unchanged", "Applied", "Rejected", "Rejected"]
    assert [r.revision for r in reports if not isinstance(r, Link)] == [8, 9, 10, 11]


# -- the loop side ----------------------------------------------------------------------

class FakeServer:
    def __init__(self) -> None:
        self.stats = Stats()
        self.configs: List[Config] = []

    def reload(self, config: Config) -> None:
        self.configs.append(config)


@pytest.fixture
def loop() -> Iterator[EventLoop]:
    event_loop = EventLoop()
    yield event_loop
    event_loop.close()


def make_reloader(loop: EventLoop) -> tuple[EtcdReloader, FakeServer]:
    start = state(revision=5)
    client = Client(Endpoint("http", "127.0.0.1", 1), 1.0)
    fleet = FleetStart((client,), start, compose(start).config, 0, None)
    fake = FakeServer()
    return EtcdReloader(loop, cast(Server, fake), fleet), fake


def applied(revision: int, port: int) -> Applied:
    composed = compose(state(config_bytes(dict(WEB, Ports=[port])), revision))
    return Applied(revision, f"etcd revision {revision}", composed)


def test_a_burst_is_applied_once_with_its_newest_config(loop: EventLoop) -> None:
    reloader, fake = make_reloader(loop)
    assert (fake.stats.config_revision, fake.stats.etcd_connected) == (5, True)
    for report in (applied(6, 1), Link(connected=False, restarted=True), applied(7, 2),
                   Rejected(8, "etcd revision 8", ConfigError("etcd:/x: bad")), Link(True)):
        reloader._hand_off(report)
    loop.run_once(0)
    assert [c.apps[0].ports for c in fake.configs] == [(2,)]
    stats = fake.stats
    assert (stats.config_revision, stats.reloads_ok, stats.reloads_failed) == (7, 1, 1)
    assert (stats.etcd_connected, stats.etcd_watch_restarts) == (True, 1)
    reloader._hand_off(Unchanged(9))
    loop.run_once(0)
    assert stats.config_revision == 9 and len(fake.configs) == 1


def test_etcd_metrics_only_under_etcd() -> None:
    stats = Stats(start_time=0.0)
    samples = [line for line in render(Snapshot(stats, {}, {}, {}, {}, False)).splitlines()
               if not line.startswith("#")]
    assert not [line for line in samples if "etcd" in line or "config_revision" in line]
    stats.config_revision, stats.etcd_connected, stats.etcd_watch_restarts = 12, False, 3
    text = render(Snapshot(stats, {}, {}, {}, {}, False))
    assert "\nrawproxy_config_revision 12\n" in text
    assert "\nrawproxy_etcd_connected 0\n" in text
    assert "\nrawproxy_etcd_watch_restarts_total 3\n" in text
