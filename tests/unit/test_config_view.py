"""Unit tests for rawproxy.config.app_view: an app as its config keys.

The contract (brief, used by the admin ``/config`` view): JSON names,
defaults filled, optional keys that are "none" left out, and a round trip
through ``parse_config`` gives the same config back.
"""

from __future__ import annotations

import json
from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st

from rawproxy.config import (
    MAX_TIMEOUT_S,
    MAX_WEIGHT,
    MIN_CHECK_INTERVAL_S,
    MIN_CHECK_TIMEOUT_S,
    Config,
    app_view,
    parse_config,
)

SOURCE = "view.json"


def round_trip(config: Config) -> Config:
    text = json.dumps({"Apps": [app_view(a) for a in config.apps]}, allow_nan=False)
    return parse_config(text, config.source)


def assert_round_trips(document: dict[str, Any]) -> Config:
    config = parse_config(json.dumps(document), SOURCE)
    again = round_trip(config)
    assert again == config
    assert again.apps == config.apps
    # And the view of the round-tripped config is the same view.
    assert [app_view(a) for a in again.apps] == [app_view(a) for a in config.apps]
    return config


def test_defaults_are_filled_and_none_keys_left_out() -> None:
    config = assert_round_trips(
        {"Apps": [{"Name": "a", "Ports": [5001], "Targets": ["h:1"]}]})
    assert app_view(config.apps[0]) == {
        "Name": "a", "Ports": [5001],
        "Targets": [{"Address": "h:1", "Weight": 1}],
        "ConnectTimeout": 3.0, "QueueTimeout": 5.0, "Balance": "random",
    }


def test_every_key_exactly() -> None:
    config = assert_round_trips({"Apps": [{
        "Name": "every", "Ports": [80, 443],
        "Targets": ["[2001:DB8::1]:80", {"Address": "Web.Example:8080", "Weight": 7}],
        "ConnectTimeout": 1.5, "IdleTimeout": 300, "MaxConnections": 100,
        "ProxyProtocol": "v2", "HealthCheck": {"Interval": 5},
        "AllowFrom": ["10.1.2.3/8", "::1"],
        "Concurrency": {"HardLimit": 4}, "QueueTimeout": 2, "Balance": "least-connections",
    }]})
    assert app_view(config.apps[0]) == {
        "Name": "every", "Ports": [80, 443],
        "Targets": [{"Address": "[2001:db8::1]:80", "Weight": 1},
                    {"Address": "web.example:8080", "Weight": 7}],
        "ConnectTimeout": 1.5, "IdleTimeout": 300.0, "MaxConnections": 100,
        "ProxyProtocol": "v2",
        # The Timeout default (min(Interval, ConnectTimeout)) is filled in.
        "HealthCheck": {"Interval": 5.0, "Timeout": 1.5},
        "AllowFrom": ["10.0.0.0/8", "::1/128"],
        # SoftLimit defaults to HardLimit, and is shown.
        "Concurrency": {"SoftLimit": 4, "HardLimit": 4}, "QueueTimeout": 2.0,
        "Balance": "least-connections",
    }


def test_hand_made_configs_round_trip() -> None:
    documents: list[dict[str, Any]] = [
        {"Apps": [{"Name": "five-thousand", "Ports": [5001, 5200, 5300, 5400],
                   "Targets": ["tcp-echo.fly.dev:5001", "tcp-echo.fly.dev:5002"]}]},
        {"Apps": [
            {"Name": "v1", "Ports": [1], "Targets": ["127.0.0.1:9"],
             "ProxyProtocol": "v1", "HealthCheck": {"Interval": 2, "Timeout": 0.25}},
            {"Name": "scoped", "Ports": [65535],
             "Targets": ["[fe80::1%eth0]:22", "example.com.:443", "_srv.local:1"],
             "IdleTimeout": MAX_TIMEOUT_S, "ConnectTimeout": 1e-9,
             "MaxConnections": 1, "AllowFrom": ["0.0.0.0/0", "::/0"]},
            {"Name": "sn\u00f8w \u2603", "Ports": [2],
             "Targets": [{"Address": "h:1", "Weight": MAX_WEIGHT}]},
        ]},
    ]
    for document in documents:
        assert_round_trips(document)


# --- Property: every valid config round-trips ---------------------------------

NAMES = st.text(st.characters(blacklist_categories=("Cc", "Cs", "Zl", "Zp")),
                min_size=1, max_size=12).filter(str.isprintable)
SECONDS = st.floats(min_value=1e-6, max_value=MAX_TIMEOUT_S, allow_nan=False) | st.integers(1, 1000)
HOSTS = st.one_of(
    st.ip_addresses(v=4).map(str),
    st.ip_addresses(v=6).map(lambda a: f"[{a}]"),
    st.from_regex(r"[a-zA-Z_][a-zA-Z0-9_-]{0,10}(\.[a-z]{1,5}){0,2}", fullmatch=True),
)
TARGETS = st.tuples(HOSTS, st.integers(1, 65535), st.none() | st.integers(1, MAX_WEIGHT)).map(
    lambda t: f"{t[0]}:{t[1]}" if t[2] is None else {"Address": f"{t[0]}:{t[1]}", "Weight": t[2]})
NETWORKS = st.one_of(st.ip_addresses(v=4), st.ip_addresses(v=6)).flatmap(
    lambda a: st.integers(0, a.max_prefixlen).map(lambda n: f"{a}/{n}"))
HEALTH = st.fixed_dictionaries(
    {"Interval": st.floats(MIN_CHECK_INTERVAL_S, MAX_TIMEOUT_S)},
    optional={"Timeout": st.floats(MIN_CHECK_TIMEOUT_S, MAX_TIMEOUT_S)})
OPTIONAL_KEYS = {
    "ConnectTimeout": SECONDS, "IdleTimeout": SECONDS,
    "MaxConnections": st.integers(1, 10**12), "ProxyProtocol": st.sampled_from(["v1", "v2"]),
    "HealthCheck": HEALTH, "AllowFrom": st.lists(NETWORKS, min_size=1, max_size=3),
    "Concurrency": st.integers(1, 10**6).flatmap(lambda hard: st.fixed_dictionaries(
        {"HardLimit": st.just(hard)}, optional={"SoftLimit": st.integers(1, hard)})),
    "QueueTimeout": SECONDS, "Balance": st.sampled_from(["random", "least-connections"]),
}


def _address_of(target: object) -> str:
    address = target if isinstance(target, str) else target["Address"]  # type: ignore[index]
    return str(address).lower()


@st.composite
def configs(draw: st.DrawFn) -> dict[str, Any]:
    names = draw(st.lists(NAMES, min_size=1, max_size=3, unique=True))
    ports = iter(draw(st.lists(st.integers(1, 65535), min_size=len(names) * 3,
                               max_size=len(names) * 3, unique=True)))
    apps = []
    for name in names:
        app: dict[str, Any] = {
            "Name": name, "Ports": [next(ports) for _ in range(draw(st.integers(1, 3)))],
            "Targets": draw(st.lists(TARGETS, min_size=1, max_size=3,
                                     unique_by=_address_of)),
        }
        app.update(draw(st.fixed_dictionaries({}, optional=OPTIONAL_KEYS)))
        apps.append(app)
    return {"Apps": apps}


@settings(max_examples=200, deadline=None)
@given(configs())
def test_any_valid_config_round_trips(document: dict[str, Any]) -> None:
    config = parse_config(json.dumps(document), SOURCE)
    assert round_trip(config) == config
