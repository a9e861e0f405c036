"""Unit tests for the key tables (rawproxy.configschema) and for config.py
being driven by them: every key of the config is spelled once, and a nested
object is one sub-table whatever its keys.
"""

from __future__ import annotations

import ast
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import pytest

from rawproxy import config
from rawproxy.config import ConfigError, parse_config
from rawproxy.configschema import (Context, Invalid, Key, Table, as_int, nested,
                                   nested_view, parse_object, plain, view_object)

CONFIG_MODULES = [Path(config.__file__).with_name(name)
                  for name in ("config.py", "configschema.py", "jsontext.py")]
APP_KEYS = ["Name", "Ports", "Targets", "ConnectTimeout", "IdleTimeout",
            "MaxConnections", "ProxyProtocol", "HealthCheck", "AllowFrom", "PerClient",
            "Concurrency", "QueueTimeout", "Balance", "Machines"]
NESTED_KEYS = ["Apps", "Address", "Weight", "Interval", "Timeout", "SoftLimit", "HardLimit"]


def string_constants(path: Path) -> list[str]:
    """Every string literal of a module, except the names in ``__all__``."""
    tree = ast.parse(path.read_text())
    exported: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Assign) and any(
                isinstance(t, ast.Name) and t.id == "__all__" for t in node.targets):
            exported.update(id(n) for n in ast.walk(node.value))
    return [node.value for node in ast.walk(tree)
            if isinstance(node, ast.Constant) and isinstance(node.value, str)
            and id(node) not in exported]


@pytest.mark.parametrize("key", APP_KEYS + NESTED_KEYS)
def test_each_key_is_spelled_once(key: str) -> None:
    found = [path.name for path in CONFIG_MODULES for s in string_constants(path) if s == key]
    assert found == ["config.py"]


def test_the_app_table_is_every_app_key_in_message_order() -> None:
    assert list(config._APP_TABLE.by_name) == APP_KEYS
    assert config._NAME_KEY == "Name"


def test_summary_rows_have_defaults_on_the_app() -> None:
    # A summary compares with the dataclass default: a row with a summary
    # whose field has no default would always be shown.
    for key in config._APP_TABLE.keys:
        if key.summary is not None:
            assert key.field in config._APP_DEFAULTS, key.name


# --- The mechanism, with a table of its own (as PerClient will be) --------------

@dataclass(frozen=True)
class PerClient:
    max_connections: int
    rate: Optional[int] = None


@dataclass(frozen=True)
class Thing:
    name: str
    per_client: Optional[PerClient] = None


def count(value: object, where: str) -> int:
    number = as_int(value)
    if number is None or number < 1:
        raise Invalid(where, f"{json.dumps(value)} is not a count")
    return number


PER_CLIENT = Table((
    Key("MaxConnections", "max_connections", plain(count), required=True, example="10"),
    Key("Rate", "rate", plain(count), example="5"),
), make=lambda fields: PerClient(**fields))
THING = Table((
    Key("Name", "name", plain(lambda v, w: str(v)), required=True, example='"x"'),
    Key("PerClient", "per_client", nested(PER_CLIENT), view=nested_view(PER_CLIENT),
        summary=lambda p: f"per client {p.max_connections}"),
), make=lambda fields: Thing(**fields))


def parse_thing(document: Any) -> Thing:
    return parse_object(document, "Thing", THING, Context())


def test_a_nested_table_parses_defaults_and_views() -> None:
    thing = parse_thing({"Name": "a", "PerClient": {"MaxConnections": 3}})
    assert thing == Thing("a", PerClient(3))
    assert view_object(thing, THING) == {"Name": "a", "PerClient": {"MaxConnections": 3}}
    both = parse_thing({"PerClient": {"Rate": 2, "MaxConnections": 3}, "Name": "b"})
    assert view_object(both, THING) == {
        "Name": "b", "PerClient": {"MaxConnections": 3, "Rate": 2}}
    assert view_object(parse_thing({"Name": "c"}), THING) == {"Name": "c"}


@pytest.mark.parametrize("document, message", [
    ({"Name": "a", "PerClient": 5},
     'Thing PerClient: must be an object like {"MaxConnections": 10, "Rate": 5}, not 5'),
    ({"Name": "a", "PerClient": {"Rate": 1}}, 'Thing PerClient: missing required key "MaxConnections"'),
    ({"Name": "a", "PerClient": {"MaxConnections": 1, "rate": 1}},
     'Thing PerClient: unknown key "rate" (allowed: MaxConnections, Rate)'),
    ({"Name": "a", "PerClient": {"MaxConnections": 0}}, "Thing PerClient MaxConnections: 0 is not a count"),
    ({"PerClient": {"MaxConnections": 1}}, 'Thing: missing required key "Name"'),
    ([], 'Thing: must be an object like {"Name": "x"}, not an empty list'),
])
def test_a_nested_table_reports_where(document: object, message: str) -> None:
    with pytest.raises(Invalid) as info:
        parse_thing(document)
    assert f"{info.value.where}: {info.value.what}" == message


def test_config_unknown_keys_name_the_nested_table() -> None:
    text = '{"Apps": [{"Name": "a", "Ports": [1], "Targets": ["h:1"], "HealthCheck": {"Every": 1}}]}'
    with pytest.raises(ConfigError, match=r"\(allowed: Interval, Timeout\)$"):
        parse_config(text, "t.json")
