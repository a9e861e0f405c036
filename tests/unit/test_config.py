"""Unit tests for rawproxy.config: the SPEC §2 contract and §3 messages.

No sockets; the file system only through ``tmp_path`` (and reading the
shipped ``config.json`` once, as the task's file).
"""

from __future__ import annotations

import copy
import dataclasses
import ipaddress
import json
from pathlib import Path
from typing import Any, Union

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from rawproxy.config import (
    DEFAULT_CONNECT_TIMEOUT_S,
    MAX_NAMES,
    App,
    Config,
    ConfigError,
    ConfigSource,
    FileConfigSource,
    HealthCheck,
    Target,
    format_summary,
    load_config,
    parse_config,
)

SHIPPED_CONFIG = Path(__file__).resolve().parents[2] / "config.json"
SHIPPED_DOCUMENT = json.loads(SHIPPED_CONFIG.read_text())
SOURCE = "config.json"


def parse(document: Union[str, bytes, object]) -> Config:
    """Parse a raw text/bytes document, or any other value as its JSON."""
    if isinstance(document, (str, bytes)):
        return parse_config(document, SOURCE)
    return parse_config(json.dumps(document), SOURCE)


def error_of(document: Union[str, bytes, object]) -> str:
    with pytest.raises(ConfigError) as info:
        parse(document)
    return str(info.value)


def app(**fields: Any) -> dict[str, Any]:
    """A valid app, with ``fields`` replacing or adding keys (None deletes)."""
    obj: dict[str, Any] = {"Name": "a", "Ports": [5001], "Targets": ["h:1"]}
    for key, value in fields.items():
        if value is None:
            obj.pop(key, None)
        else:
            obj[key] = value
    return obj


def one_app(**fields: Any) -> dict[str, Any]:
    return {"Apps": [app(**fields)]}


# --- The shipped config --------------------------------------------------------

def test_shipped_config_parses_to_exact_values() -> None:
    config = parse_config(SHIPPED_CONFIG.read_bytes(), SOURCE)

    def targets(*addresses: str) -> tuple[Target, ...]:
        return tuple(Target(host=a.rpartition(":")[0], port=int(a.rpartition(":")[2]))
                     for a in addresses)

    assert config == Config(source=SOURCE, apps=(
        App(name="five-thousand", ports=(5001, 5200, 5300, 5400),
            targets=targets("tcp-echo.fly.dev:5001", "tcp-echo.fly.dev:5002")),
        App(name="six-thousand", ports=(6001, 6200, 6300, 6400),
            targets=targets("tcp-echo.fly.dev:6001", "tcp-echo.fly.dev:6002",
                            "bad.target.for.testing:6003")),
        App(name="seven-thousand", ports=(7001, 7200, 7300, 7400),
            targets=targets("tcp-echo.fly.dev:7001", "tcp-echo.fly.dev:7002")),
    ))
    assert len(config.apps) == 3
    assert len(config.ports) == 12
    assert sum(len(a.targets) for a in config.apps) == 7
    assert config.app_for_port(6300) is config.apps[1]
    assert config.app_for_port(5002) is None
    assert config.apps[1].targets[2].address == "bad.target.for.testing:6003"


def test_shipped_config_summary() -> None:
    summary = format_summary(load_config(str(SHIPPED_CONFIG)))
    lines = summary.splitlines()
    assert lines[0] == 'app "five-thousand": ports 5001, 5200, 5300, 5400'
    assert "  target tcp-echo.fly.dev:5001 weight 1" in lines
    assert "  target bad.target.for.testing:6003 weight 1" in lines
    assert 'app "seven-thousand": ports 7001, 7200, 7300, 7400' in lines
    assert lines[-1] == f"{SHIPPED_CONFIG}: OK, 3 apps, 12 ports, 7 targets"
    assert "timeout" not in summary  # defaults are not shown
    assert len(lines) == 3 + 7 + 1


# --- Valid configs -------------------------------------------------------------

def test_defaults() -> None:
    only = parse(one_app()).apps[0]
    assert only == App(name="a", ports=(5001,), targets=(Target("h", 1),))
    assert only.connect_timeout_s == DEFAULT_CONNECT_TIMEOUT_S == 3.0
    assert only.idle_timeout_s is None
    assert only.max_connections is None
    assert only.proxy_protocol is None
    assert only.health_check is None
    assert only.allow_from == ()
    assert only.targets[0].weight == 1


def test_weighted_targets() -> None:
    targets = parse(one_app(Targets=[
        {"Address": "a.example:80", "Weight": 3},
        "b.example:80",
        {"Address": "c.example:80"},
        {"Weight": 2, "Address": "10.0.0.1:8080"},
    ])).apps[0].targets
    assert targets == (
        Target("a.example", 80, 3), Target("b.example", 80, 1),
        Target("c.example", 80, 1), Target("10.0.0.1", 8080, 2))


@pytest.mark.parametrize("text, host, address", [
    ("[::1]:80", "::1", "[::1]:80"),
    ("[2001:DB8:0:0:0::1]:5001", "2001:db8::1", "[2001:db8::1]:5001"),
    ("[fe80::1%eth0]:22", "fe80::1%eth0", "[fe80::1%eth0]:22"),
    ("127.0.0.1:80", "127.0.0.1", "127.0.0.1:80"),
    ("TCP-Echo.Fly.DEV:5001", "tcp-echo.fly.dev", "tcp-echo.fly.dev:5001"),
    ("_srv.local:1", "_srv.local", "_srv.local:1"),
    ("localhost:65535", "localhost", "localhost:65535"),
    ("example.com.:443", "example.com.", "example.com.:443"),
])
def test_target_hosts_are_canonical(text: str, host: str, address: str) -> None:
    target = parse(one_app(Targets=[text])).apps[0].targets[0]
    assert target.host == host
    assert target.address == address


def test_every_option() -> None:
    only = parse(one_app(
        ConnectTimeout=1.5, IdleTimeout=300, MaxConnections=100,
        ProxyProtocol="v2", HealthCheck={"Interval": 5, "Timeout": 1},
        AllowFrom=["10.1.2.3/8", "192.168.1.7", "2001:db8::/32", "::1"],
    )).apps[0]
    assert only.connect_timeout_s == 1.5
    assert only.idle_timeout_s == 300.0 and isinstance(only.idle_timeout_s, float)
    assert only.max_connections == 100
    assert only.proxy_protocol == "v2"
    assert only.health_check == HealthCheck(interval_s=5.0, timeout_s=1.0)
    assert only.allow_from == (
        ipaddress.ip_network("10.0.0.0/8"), ipaddress.ip_network("192.168.1.7/32"),
        ipaddress.ip_network("2001:db8::/32"), ipaddress.ip_network("::1/128"))


@pytest.mark.parametrize("fields, timeout_s", [
    ({"HealthCheck": {"Interval": 5}}, 3.0),
    ({"HealthCheck": {"Interval": 1}}, 1.0),
    # ConnectTimeout after HealthCheck in the document still counts.
    ({"HealthCheck": {"Interval": 5}, "ConnectTimeout": 10}, 5.0),
    ({"HealthCheck": {"Interval": 20}, "ConnectTimeout": 10}, 10.0),
])
def test_health_check_timeout_default(fields: dict[str, Any], timeout_s: float) -> None:
    check = parse(one_app(**fields)).apps[0].health_check
    assert check is not None and check.timeout_s == timeout_s


def test_health_check_floor_is_accepted_and_the_default_timeout_respects_it() -> None:
    at_floor = parse(one_app(HealthCheck={"Interval": 0.1, "Timeout": 0.1})).apps[0]
    assert at_floor.health_check == HealthCheck(interval_s=0.1, timeout_s=0.1)
    # min(Interval, ConnectTimeout) would be 0.01 s: raised to the floor.
    fast_connect = parse(one_app(ConnectTimeout=0.01, HealthCheck={"Interval": 1})).apps[0]
    assert fast_connect.health_check == HealthCheck(interval_s=1.0, timeout_s=0.1)
    assert fast_connect.connect_timeout_s == 0.01


def test_text_bytes_and_bom_agree() -> None:
    text = json.dumps(one_app())
    expected = parse(text)
    assert parse(text.encode()) == expected
    assert parse(b"\xef\xbb\xbf" + text.encode()) == expected
    assert parse("\ufeff" + text) == expected


def test_config_is_immutable() -> None:
    config = parse(one_app())
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.apps[0].name = "b"  # type: ignore[misc]
    with pytest.raises(TypeError):
        config.ports[1] = config.apps[0]  # type: ignore[index]
    assert hash(config) == hash(parse(one_app()))


# --- Invalid configs -------------------------------------------------------

THREE_APPS_BAD_PORT = {"Apps": [
    app(Name="five-thousand", Ports=[5001]),
    app(Name="six-thousand", Ports=[6001, 6200, 70000]),
    app(Name="seven-thousand", Ports=[7001]),
]}

APP_KEYS = ("Name, Ports, Targets, ConnectTimeout, IdleTimeout, MaxConnections, "
            "ProxyProtocol, HealthCheck, AllowFrom, PerClient, Concurrency, QueueTimeout, "
            "Balance, Machines")

BAD_CONFIGS: list[tuple[str, object, str]] = [
    ("spec-example", THREE_APPS_BAD_PORT,
     'config.json: Apps[1] "six-thousand" Ports[2]: 70000 is not a port (1-65535)'),
    ("top-list", [], 'config.json: must be an object like {"Apps": [...]}, not an empty list'),
    ("top-unknown", {"apps": []}, 'config.json: unknown key "apps" (allowed: Apps)'),
    ("top-missing", {}, 'config.json: missing required key "Apps"'),
    ("apps-empty", {"Apps": []}, "config.json: Apps: must be a non-empty list of apps, not an empty list"),
    ("apps-object", {"Apps": {}}, "config.json: Apps: must be a non-empty list of apps, not an object"),
    ("app-string", {"Apps": ["a"]}, 'config.json: Apps[0]: must be an object like {"Name"'),
    ("unknown-key", one_app(Target=["h:1"]),
     f'config.json: Apps[0] "a": unknown key "Target" (allowed: {APP_KEYS})'),
    ("missing-targets", one_app(Targets=None), 'config.json: Apps[0] "a": missing required key "Targets"'),
    ("missing-name", one_app(Name=None), 'config.json: Apps[0]: missing required key "Name"'),
    ("name-empty", one_app(Name=""), 'config.json: Apps[0] Name: must be a non-empty string, not ""'),
    ("name-number", one_app(Name=5), "config.json: Apps[0] Name: must be a non-empty string, not 5"),
    ("name-control", one_app(Name="a\nb"), 'config.json: Apps[0] Name: "a\\nb" must be printable'),
    ("name-duplicate", {"Apps": [app(), app(Name="b", Ports=[2]), app(Ports=[3])]},
     'config.json: Apps[2] "a" Name: duplicate app name "a" (also Apps[0])'),
    ("ports-scalar", one_app(Ports=5001), 'config.json: Apps[0] "a" Ports: must be a non-empty list of ports, not 5001'),
    ("ports-empty", one_app(Ports=[]), 'Apps[0] "a" Ports: must be a non-empty list of ports, not an empty list'),
    ("port-true", one_app(Ports=[True]), 'config.json: Apps[0] "a" Ports[0]: true is not a port (1-65535)'),
    ("port-string", one_app(Ports=[1, "5001"]), 'Apps[0] "a" Ports[1]: "5001" is not a port (1-65535)'),
    ("port-zero", one_app(Ports=[0]), 'Ports[0]: 0 is not a port (1-65535)'),
    ("port-float", one_app(Ports=[5001.0]), 'Ports[0]: 5001.0 is not a port (1-65535)'),
    ("port-null", '{"Apps": [{"Name": "a", "Ports": [null]}]}', "Ports[0]: null is not a port (1-65535)"),
    ("port-twice", one_app(Ports=[5001, 5002, 5001]), 'Apps[0] "a" Ports[2]: 5001 is listed twice (also Ports[0])'),
    ("port-other-app", {"Apps": [app(), app(Name="b")]},
     'config.json: Apps[1] "b" Ports[0]: 5001 is already used by app "a"'),
    ("targets-empty", one_app(Targets=[]), 'Apps[0] "a" Targets: must be a non-empty list of targets'),
    ("target-no-port", one_app(Targets=["h"]), 'Apps[0] "a" Targets[0]: "h" is not "host:port"'),
    ("target-bare-ipv6", one_app(Targets=["::1:80"]),
     'Targets[0]: "::1:80": an IPv6 address needs brackets, as in "[2001:db8::1]:5001"'),
    ("target-port-zero", one_app(Targets=["h:0"]), 'Targets[0]: "h:0": "0" is not a port (1-65535)'),
    ("target-port-big", one_app(Targets=["h:65536"]), '"h:65536": "65536" is not a port (1-65535)'),
    ("target-port-empty", one_app(Targets=["h:"]), '"h:": "" is not a port (1-65535)'),
    ("target-port-sign", one_app(Targets=["h:+80"]), '"h:+80": "+80" is not a port (1-65535)'),
    ("target-bad-host", one_app(Targets=["bad host:80"]),
     'Targets[0]: "bad host:80": "bad host" is not a host name or IP address'),
    ("target-empty-host", one_app(Targets=[":80"]), '":80": "" is not a host name or IP address'),
    ("target-numeric-name", one_app(Targets=["10.1:80"]), '"10.1" is not a host name or IP address'),
    ("target-bad-ipv4", one_app(Targets=["1.2.3.256:80"]), '"1.2.3.256" is not a host name or IP address'),
    ("target-hex-ipv4", one_app(Targets=["0x7f000001:80"]), '"0x7f000001" is not a host name or IP address'),
    ("target-short-hex-ipv4", one_app(Targets=["127.0x1:80"]), '"127.0x1" is not a host name or IP address'),
    ("target-long-label", one_app(Targets=["a" * 64 + ".com:80"]), "is not a host name or IP address"),
    ("target-long-name", one_app(Targets=[".".join(["a" * 60] * 5) + ":80"]), "is not a host name or IP address"),
    ("target-brackets-v4", one_app(Targets=["[1.2.3.4]:80"]),
     '"[1.2.3.4]:80": "1.2.3.4" is not an IPv6 address (brackets are only for IPv6)'),
    ("target-brackets-no-colon", one_app(Targets=["[::1]80"]), 'Targets[0]: "[::1]80" is not "[v6addr]:port"'),
    ("target-duplicate", one_app(Targets=["H:1", "x:2", "h:1"]),
     'Apps[0] "a" Targets[2]: duplicate target "h:1" (also Targets[0]; use Weight to favour a target)'),
    ("target-duplicate-v6", one_app(Targets=["[::1]:80", {"Address": "[0:0::1]:80", "Weight": 2}]),
     'Targets[1]: duplicate target "[::1]:80" (also Targets[0]'),
    ("target-number", one_app(Targets=[80]),
     'Targets[0]: must be "host:port" or {"Address": "host:port", "Weight": N}, not 80'),
    ("target-unknown-key", one_app(Targets=[{"Address": "h:1", "weight": 2}]),
     'config.json: Apps[0] "a" Targets[0]: unknown key "weight" (allowed: Address, Weight)'),
    ("target-missing-address", one_app(Targets=[{"Weight": 2}]),
     'Apps[0] "a" Targets[0]: missing required key "Address"'),
    ("target-address-number", one_app(Targets=[{"Address": 80}]),
     'Targets[0] Address: must be a string "host:port", not 80'),
    ("weight-zero", one_app(Targets=[{"Address": "h:1", "Weight": 0}]),
     'Targets[0] Weight: 0 is not a weight (an integer from 1 to 1000000)'),
    ("weight-bool", one_app(Targets=[{"Address": "h:1", "Weight": True}]), "Weight: true is not a weight"),
    ("weight-float", one_app(Targets=[{"Address": "h:1", "Weight": 1.5}]), "Weight: 1.5 is not a weight"),
    ("weight-huge", one_app(Targets=[{"Address": "h:1", "Weight": 10**30}]), "is not a weight"),
    ("connect-zero", one_app(ConnectTimeout=0),
     'Apps[0] "a" ConnectTimeout: 0 is not a duration (seconds, a number > 0 and at most 604800)'),
    ("connect-negative", one_app(ConnectTimeout=-1), "ConnectTimeout: -1 is not a duration"),
    ("connect-bool", one_app(ConnectTimeout=True), "ConnectTimeout: true is not a duration"),
    ("connect-string", one_app(ConnectTimeout="3"), 'ConnectTimeout: "3" is not a duration'),
    ("connect-inf", '{"Apps": [{"Name": "a", "ConnectTimeout": 1e400}]}',
     'Apps[0] "a" ConnectTimeout: Infinity is not a duration'),
    ("connect-huge-int", one_app(ConnectTimeout=10**400), "ConnectTimeout: 1000000000"),
    ("idle-zero", one_app(IdleTimeout=0.0), "IdleTimeout: 0.0 is not a duration"),
    ("idle-null", one_app(IdleTimeout=[]), "IdleTimeout: [] is not a duration"),
    ("maxconn-zero", one_app(MaxConnections=0),
     'Apps[0] "a" MaxConnections: 0 is not a connection limit (an integer >= 1)'),
    ("maxconn-float", one_app(MaxConnections=10.0), "MaxConnections: 10.0 is not a connection limit"),
    ("concurrency-number", one_app(Concurrency=5),
     'Apps[0] "a" Concurrency: must be an object like {"SoftLimit": S, "HardLimit": H}, not 5'),
    ("concurrency-missing-hard", one_app(Concurrency={"SoftLimit": 2}),
     'Apps[0] "a" Concurrency: missing required key "HardLimit"'),
    ("concurrency-unknown", one_app(Concurrency={"HardLimit": 2, "Soft": 1}),
     'Apps[0] "a" Concurrency: unknown key "Soft" (allowed: SoftLimit, HardLimit)'),
    ("concurrency-zero", one_app(Concurrency={"HardLimit": 0}),
     'Apps[0] "a" Concurrency HardLimit: 0 is not a connection limit (an integer >= 1)'),
    ("concurrency-bool", one_app(Concurrency={"SoftLimit": True, "HardLimit": 2}),
     'Concurrency SoftLimit: true is not a connection limit'),
    ("concurrency-soft-above-hard", one_app(Concurrency={"SoftLimit": 5, "HardLimit": 3}),
     'Apps[0] "a" Concurrency SoftLimit: 5 is above the hard limit 3 (1 <= soft <= hard)'),
    ("queue-timeout-zero", one_app(QueueTimeout=0),
     'Apps[0] "a" QueueTimeout: 0 is not a duration (seconds, a number > 0'),
    ("queue-timeout-string", one_app(QueueTimeout="5s"), 'QueueTimeout: "5s" is not a duration'),
    ("balance-unknown", one_app(Balance="round-robin"),
     'Apps[0] "a" Balance: "round-robin" is not a balance policy '
     '("random" or "least-connections")'),
    ("balance-number", one_app(Balance=2), "Balance: 2 is not a balance policy"),
    ("proxy-v3", one_app(ProxyProtocol="v3"),
     'Apps[0] "a" ProxyProtocol: "v3" is not a PROXY protocol version ("v1" or "v2")'),
    ("proxy-number", one_app(ProxyProtocol=1), "ProxyProtocol: 1 is not a PROXY protocol version"),
    ("health-number", one_app(HealthCheck=5),
     'HealthCheck: must be an object like {"Interval": 5, "Timeout": 2}, not 5'),
    ("health-unknown", one_app(HealthCheck={"Interval": 5, "Timout": 1}),
     'Apps[0] "a" HealthCheck: unknown key "Timout" (allowed: Interval, Timeout)'),
    ("health-missing", one_app(HealthCheck={"Timeout": 1}),
     'Apps[0] "a" HealthCheck: missing required key "Interval"'),
    ("health-interval", one_app(HealthCheck={"Interval": 0}), "HealthCheck Interval: 0 is not a duration"),
    ("health-timeout", one_app(HealthCheck={"Interval": 1, "Timeout": -2}), "HealthCheck Timeout: -2 is not a duration"),
    # Issue #18 (12): a floor, so that a tiny interval cannot spin the loop.
    ("health-interval-tiny", one_app(HealthCheck={"Interval": 1e-6}),
     'Apps[0] "a" HealthCheck Interval: 1e-06 is not a duration '
     "(seconds, a number >= 0.1 and at most 604800)"),
    ("health-interval-below", one_app(HealthCheck={"Interval": 0.099}),
     "HealthCheck Interval: 0.099 is not a duration (seconds, a number >= 0.1 and"),
    ("health-timeout-tiny", one_app(HealthCheck={"Interval": 1, "Timeout": 0.001}),
     'Apps[0] "a" HealthCheck Timeout: 0.001 is not a duration '
     "(seconds, a number >= 0.1 and at most 604800)"),
    ("allow-empty", one_app(AllowFrom=[]),
     'AllowFrom: must be a non-empty list of CIDR networks (omit it to allow every client), not an empty list'),
    ("allow-string", one_app(AllowFrom="10.0.0.0/8"), 'AllowFrom: must be a non-empty list of CIDR networks'),
    ("allow-bad", one_app(AllowFrom=["10.0.0.0/8", "10.0.0.0/33"]),
     'Apps[0] "a" AllowFrom[1]: "10.0.0.0/33" is not a CIDR network (like "10.0.0.0/8" or "2001:db8::/32")'),
    ("allow-number", one_app(AllowFrom=[10]), "AllowFrom[0]: 10 is not a CIDR network"),
    # Duplicate keys cannot be written with json.dumps: raw text.
    ("dup-top", '{"Apps": [], "Apps": []}', 'config.json: duplicate key "Apps"'),
    ("dup-app", '{"Apps": [{"Name": "a", "Ports": [1], "Name": "b"}]}',
     'config.json: Apps[0] "b": duplicate key "Name"'),
    ("dup-target", '{"Apps": [{"Name": "a", "Targets": [{"Address": "h:1", "Address": "h:2"}]}]}',
     'Apps[0] "a" Targets[0]: duplicate key "Address"'),
    ("dup-health", '{"Apps": [{"Name": "a", "HealthCheck": {"Interval": 1, "Interval": 2}}]}',
     'Apps[0] "a" HealthCheck: duplicate key "Interval"'),
    # First error in document order, and the name known wherever it is.
    ("order-ports-first", '{"Apps": [{"Name": "a", "Ports": [0], "Targets": []}]}', "Ports[0]: 0 is not a port"),
    ("order-targets-first", '{"Apps": [{"Targets": [], "Name": "a", "Ports": [0]}]}', 'Apps[0] "a" Targets:'),
    ("order-name-later", '{"Apps": [{"Ports": [0], "Name": "late"}]}', 'Apps[0] "late" Ports[0]: 0 is not'),
    ("order-bad-name-later", '{"Apps": [{"Ports": [0], "Name": ""}]}', "config.json: Apps[0] Ports[0]: 0 is not"),
    ("order-missing-last", '{"Apps": [{"Name": "a", "Bogus": 1}]}', 'Apps[0] "a": unknown key "Bogus"'),
    ("order-apps", {"Apps": [app(Ports=[0]), app(Name="b", Ports=[-1])]}, 'Apps[0] "a" Ports[0]: 0 is'),
]


@pytest.mark.parametrize("document, expected",
                         [case[1:] for case in BAD_CONFIGS],
                         ids=[case[0] for case in BAD_CONFIGS])
def test_bad_config_message(document: object, expected: str) -> None:
    message = error_of(document)
    assert expected in message
    assert message.startswith("config.json: ")
    assert len(message.splitlines()) == 1


def test_spec_example_message_exactly() -> None:
    assert error_of(THREE_APPS_BAD_PORT) == (
        'config.json: Apps[1] "six-thousand" Ports[2]: 70000 is not a port (1-65535)')


def test_at_most_as_many_apps_and_targets_as_the_shared_counters_hold() -> None:
    targets = [f"10.{i // 65536}.{i // 256 % 256}.{i % 256}:80" for i in range(MAX_NAMES)]
    assert error_of(one_app(Targets=targets)) == (
        f"config.json: Apps: more than {MAX_NAMES} apps and targets together")
    assert len(parse(one_app(Targets=targets[:-1])).apps[0].targets) == MAX_NAMES - 1


def test_unknown_key_lists_allowed_exactly() -> None:
    assert error_of(one_app(Target=["h:1"])) == (
        'config.json: Apps[0] "a": unknown key "Target" (allowed: Name, Ports, '
        "Targets, ConnectTimeout, IdleTimeout, MaxConnections, ProxyProtocol, "
        "HealthCheck, AllowFrom, PerClient, Concurrency, QueueTimeout, Balance, Machines)")


@pytest.mark.parametrize("text, expected", [
    ('{\n  "Apps": [\n    {"Name": "a" "Ports": []}\n  ]\n}',
     "config.json: invalid JSON at line 3 column 18: Expecting ',' delimiter"),
    ("", "config.json: invalid JSON at line 1 column 1: Expecting value"),
    ('{"Apps": [}', "config.json: invalid JSON at line 1 column 11: Expecting value"),
    ('{"Apps": []} x', "config.json: invalid JSON at line 1 column 14: Extra data"),
    ('{"Apps": [{"Name": "NaN"}],\n "X": NaN}',
     "config.json: invalid JSON at line 2 column 7: NaN is not a number in JSON"),
    ('{"Apps": [{"Name": "say \\"Infinity\\""}, -Infinity]}',
     "config.json: invalid JSON at line 1 column 41: -Infinity is not a number in JSON"),
    ('[Infinity]', "config.json: invalid JSON at line 1 column 2: Infinity is not a number in JSON"),
    (b'{"Apps": [\n{"Name": "\xff"}]}', "config.json: not UTF-8 text: byte 0xff at line 2 column 11"),
    ("[" * 100_000, "config.json: invalid JSON: nested too deeply"),
])
def test_invalid_json_message(text: Union[str, bytes], expected: str) -> None:
    assert error_of(text) == expected


def test_unprintable_values_stay_on_one_line() -> None:
    message = error_of(one_app(Ports=["\u2028\x85\ud800" + "x" * 200]))
    assert message.startswith('config.json: Apps[0] "a" Ports[0]: "\\u2028\\u0085\\ud800xxx')
    assert "..." in message and len(message) < 150
    assert message.isprintable()


# --- load_config and the source seam ---------------------------------------

def test_load_config_missing_file(tmp_path: Path) -> None:
    path = str(tmp_path / "nope.json")
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert str(info.value) == f"{path}: cannot read: No such file or directory"


def test_load_config_directory(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot read: Is a directory"):
        load_config(str(tmp_path))


def test_load_config_names_path_as_given(tmp_path: Path) -> None:
    path = tmp_path / "bad.json"
    path.write_text(json.dumps(one_app(Ports=[0])))
    with pytest.raises(ConfigError) as info:
        load_config(str(path))
    assert str(info.value) == f'{path}: Apps[0] "a" Ports[0]: 0 is not a port (1-65535)'


def test_file_config_source_reads_afresh(tmp_path: Path) -> None:
    path = tmp_path / "c.json"
    path.write_text(json.dumps(one_app()))
    source: ConfigSource = FileConfigSource(str(path))
    assert source.load().apps[0].ports == (5001,)
    path.write_text(json.dumps(one_app(Ports=[6000])))
    assert source.load().apps[0].ports == (6000,)
    assert source.load().source == str(path)
    assert FileConfigSource(str(path)).path == str(path)


# --- format_summary ---------------------------------------------------------

def test_summary_shows_non_defaults_and_singulars() -> None:
    config = parse(one_app(
        Targets=[{"Address": "[::1]:80", "Weight": 5}], ConnectTimeout=0.5,
        IdleTimeout=60, MaxConnections=10, ProxyProtocol="v1",
        HealthCheck={"Interval": 2}, AllowFrom=["10.0.0.0/8", "::1"],
        Concurrency={"SoftLimit": 2, "HardLimit": 3}, QueueTimeout=0.5,
        Balance="least-connections"))
    assert format_summary(config).splitlines() == [
        'app "a": ports 5001',
        "  target [::1]:80 weight 5",
        "  connect timeout 0.5s",
        "  idle timeout 60s",
        "  max connections 10",
        "  proxy protocol v1",
        "  health check every 2s, timeout 0.5s",
        "  allow from 10.0.0.0/8, ::1/128",
        "  concurrency soft 2, hard 3 per target",
        "  queue timeout 0.5s",
        "  balance least-connections",
        "config.json: OK, 1 app, 1 port, 1 target",
    ]


# --- Fuzzing: nothing but ConfigError, ever -----------------------------------

JSON_SCALARS = (st.none() | st.booleans() | st.integers()
                | st.floats(allow_nan=True, allow_infinity=True) | st.text(max_size=12))
JSON_VALUES = st.recursive(
    JSON_SCALARS,
    lambda children: st.lists(children, max_size=4)
    | st.dictionaries(st.text(max_size=8), children, max_size=4),
    max_leaves=10)
APP_KEY_NAMES = st.sampled_from(
    ["Name", "Ports", "Targets", "ConnectTimeout", "IdleTimeout", "MaxConnections",
     "ProxyProtocol", "HealthCheck", "AllowFrom", "Address", "Weight", "Interval",
     "Timeout", "Apps", "Target", "PerClient", "Rate", "Concurrency", "SoftLimit",
     "HardLimit", "QueueTimeout", "Balance", "Machines", "Start", "Stop", "URL", "Command",
     "StartTimeout", "StopAfter", "MinRunning"])


def assert_config_or_error(text: Union[str, bytes]) -> None:
    try:
        config = parse_config(text, "fuzz.json")
    except ConfigError as exc:
        message = str(exc)
        assert message.startswith("fuzz.json: ")
        assert message.isprintable()
    else:
        assert isinstance(config, Config)
        format_summary(config)


@settings(max_examples=150, deadline=None)
@given(JSON_VALUES)
def test_fuzz_any_json_value(value: object) -> None:
    assert_config_or_error(json.dumps(value))


@settings(max_examples=150, deadline=None)
@given(st.lists(st.dictionaries(APP_KEY_NAMES, JSON_VALUES, max_size=5), max_size=2))
def test_fuzz_app_shaped_values(apps: list[dict[str, object]]) -> None:
    assert_config_or_error(json.dumps({"Apps": apps}))


@settings(max_examples=150, deadline=None)
@given(st.one_of(st.binary(max_size=64), st.text(max_size=64)))
def test_fuzz_raw_text(text: Union[str, bytes]) -> None:
    assert_config_or_error(text)


def _mutate(data: st.DataObject, node: Any) -> None:
    """Walk down a random path of ``node`` and damage what is there."""
    while True:
        keys = list(node.keys()) if isinstance(node, dict) else list(range(len(node)))
        if not keys:
            break
        key = data.draw(st.sampled_from(keys))
        child = node[key]
        if isinstance(child, (dict, list)) and data.draw(st.booleans()):
            node = child
            continue
        action = data.draw(st.sampled_from(["delete", "replace", "add"]))
        if action == "delete":
            del node[key]
        elif action == "replace":
            node[key] = data.draw(JSON_VALUES)
        elif isinstance(node, dict):
            node[data.draw(APP_KEY_NAMES)] = data.draw(JSON_VALUES)
        else:
            node.insert(key, data.draw(JSON_VALUES))
        break


@settings(max_examples=150, deadline=None)
@given(st.data())
def test_fuzz_mutated_shipped_config(data: st.DataObject) -> None:
    document = copy.deepcopy(SHIPPED_DOCUMENT)
    for _ in range(data.draw(st.integers(min_value=1, max_value=3))):
        _mutate(data, document)
    assert_config_or_error(json.dumps(document))

