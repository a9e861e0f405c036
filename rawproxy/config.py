"""The config file: JSON text in, a validated immutable :class:`Config` out.

Contract (SPEC §2 and §3):

* ``parse_config(text, source)`` returns a :class:`Config` or raises
  :class:`ConfigError`; no other exception escapes for any input text or
  any JSON value it holds.  ``load_config(path)`` reads the file first.
* ``str(ConfigError)`` is one line, ``<source>: <JSON path>: <what is
  wrong>``, without the ``rawproxy: error:`` prefix the CLI adds::

      config.json: Apps[1] "six-thousand" Ports[2]: 70000 is not a port (1-65535)

  Indices are 0-based; an app is named in the path once its ``Name`` is a
  valid name.  Values are shown as JSON (strings quoted), shortened when long,
  with unprintable characters escaped so the message stays on one line
  (:mod:`rawproxy.jsontext`, which also turns the text into values).
* The first error in document order is reported.  Missing required keys are
  noticed at the end of their object, and a duplicated key before any other
  key of its object (the parser keeps no position for the second copy).
* Values come out canonical: IPv6 hosts in compressed form, host names
  lower-cased, ``AllowFrom`` entries as networks (a bare address is a /32
  or /128), every default filled in.
* ``app_view(app)`` is the way back: the app's keys under their JSON names,
  defaults filled, optional keys that are unset left out, such that
  ``parse_config`` of ``{"Apps": [app_view(app), ...]}`` gives the same apps.

Every key is one row of a key table at the end of this module (JSON name,
parser, field, view, ``--check`` summary; the default is the dataclass
field's); a nested object is a table of its own.  Allowed keys, required
keys, parsing, view and summary are read from the tables by
:mod:`rawproxy.configschema`.  A new key is one row, one parser, one field.

Defaults and limits beyond the SPEC, chosen so a value that validates here
cannot make the event loop or the balancer fail later:

* ``ConnectTimeout`` defaults to 3 s; ``IdleTimeout`` to none.  Every timeout
  and interval is a number > 0 and at most :data:`MAX_TIMEOUT_S` (7 days):
  larger values overflow ``epoll``/``select`` timeouts.
* ``HealthCheck.Interval`` and ``HealthCheck.Timeout`` are at least
  :data:`MIN_CHECK_INTERVAL_S` / :data:`MIN_CHECK_TIMEOUT_S` (0.1 s): see
  there.  ``Timeout`` defaults to ``min(Interval, ConnectTimeout)`` (a check
  is a TCP connect, so it gets the app's connect limit, and never outlives
  its own interval), raised to that floor.
* ``Weight`` is an integer from 1 to :data:`MAX_WEIGHT`: weighted random
  choice sums weights as floats.
* ``Concurrency.SoftLimit`` defaults to its ``HardLimit`` (no preference
  tier); ``QueueTimeout`` defaults to 5 s and ``Balance`` to ``"random"``
  (SPEC 9; the dataclasses and defaults are in :mod:`rawproxy.configtypes`).
* ``Name`` must be printable (no control or line-separator characters): it
  is written into one-line logs and metric labels.
* ``PerClient.Rate`` is at most :data:`MAX_RATE`; a file is read up to
  :data:`MAX_CONFIG_BYTES` (16 MiB) and refused beyond.
* JSON ``NaN``/``Infinity`` literals are invalid JSON here; bytes must be
  UTF-8 (a leading byte-order mark is ignored).

Pure: no sockets and no selectors.  Only :func:`load_config` (and
:class:`FileConfigSource`, the seam for other config stores) touch the file
system.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Mapping, Protocol, Union

from . import jsontext
from .configmachines import machines_summary, parse_machines, view_machines
from .configschema import (Context, Invalid, Key, Table, as_int, as_number, at, nested,
                           nested_some, nested_view, parse_address, parse_choice, parse_count,
                           parse_networks, parse_object, parse_seconds, plain, require_list,
                           summaries, view_object)
from .configtypes import (BALANCE_LEAST_CONNECTIONS, BALANCE_POLICIES, BALANCE_RANDOM,
                          DEFAULT_CONNECT_TIMEOUT_S, DEFAULT_QUEUE_TIMEOUT_S, App, Concurrency,
                          Config, HealthCheck, IPNetwork, PerClient, Target)
from .counters import DEFAULT_CAPACITY
from .jsontext import describe, render

__all__ = [
    "BALANCE_LEAST_CONNECTIONS", "BALANCE_POLICIES", "BALANCE_RANDOM",
    "DEFAULT_CONNECT_TIMEOUT_S", "DEFAULT_QUEUE_TIMEOUT_S", "MAX_CONFIG_BYTES", "MAX_NAMES",
    "MAX_RATE", "MAX_TIMEOUT_S", "MAX_WEIGHT",
    "MIN_CHECK_INTERVAL_S", "MIN_CHECK_TIMEOUT_S", "PROXY_PROTOCOL_VERSIONS",
    "App", "Concurrency", "Config", "ConfigError", "ConfigSource", "FileConfigSource",
    "HealthCheck",
    "IPNetwork", "PerClient", "Target",
    "app_view", "format_summary", "load_config", "parse_config",
]

MAX_TIMEOUT_S = 7 * 24 * 3600.0
MAX_WEIGHT = 1_000_000
MAX_NAMES = DEFAULT_CAPACITY  # apps plus targets: the shared counters' slots
MAX_CONFIG_BYTES = 16 * 1024 * 1024  # read no more: --config /dev/zero must not eat memory
MAX_RATE = 1e6  # PerClient Rate: new connections a second, far above any loop's
PROXY_PROTOCOL_VERSIONS = ("v1", "v2")
# A check (socket, non-blocking connect, loop registration, close) is part
# of what a proxied connection costs the one loop thread, 156 us of CPU in
# NOTES' churn runs: every 0.1 s that is at most ~0.16 % of the loop per
# target, where 1e-6 s would spin it.  HAProxy's ``inter`` defaults to 2 s;
# finding a dead target sooner is passive health's job (the first failed
# client connect marks it down at once).
MIN_CHECK_INTERVAL_S = 0.1
# A check timeout below a round trip plus a busy loop's latency marks live
# targets down; the same floor as the interval keeps the rule one number.
MIN_CHECK_TIMEOUT_S = 0.1

class ConfigError(Exception):
    """Invalid config; ``str()`` is the one-line message for the user."""


class ConfigSource(Protocol):
    """Where configs come from: a file today, maybe a distributed store later."""

    def load(self) -> Config:
        """Return the current config or raise :class:`ConfigError`."""
        ...


@dataclass(frozen=True)
class FileConfigSource:
    """A :class:`ConfigSource` reading ``path`` afresh on every ``load()``."""

    path: str

    def load(self) -> Config:
        return load_config(self.path)


def load_config(path: str) -> Config:
    """Read and parse the file at ``path``; messages name it as given."""
    try:
        with open(path, "rb") as stream:
            data = stream.read(MAX_CONFIG_BYTES + 1)
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read: {exc.strerror or exc}") from None
    if len(data) > MAX_CONFIG_BYTES:
        raise ConfigError(f"{path}: larger than {MAX_CONFIG_BYTES} bytes (16 MiB): "
                          "not a config file")
    return parse_config(data, path)


def parse_config(text: Union[str, bytes], source: str, *,
                 allow_empty_targets: bool = False) -> Config:
    """Validate the JSON ``text`` of a config; ``source`` prefixes messages."""
    try:
        document = jsontext.load(text)
        apps = parse_object(document, "", _TOP_TABLE, Context(
            allow_empty_targets=allow_empty_targets))
        return Config(apps=apps, source=source)
    except jsontext.JSONTextError as exc:
        raise ConfigError(f"{source}: {exc}") from None
    except Invalid as exc:
        where = f"{exc.where}: " if exc.where else ""
        raise ConfigError(f"{source}: {where}{exc.what}") from None


def app_view(app: App) -> dict[str, object]:
    """``app`` as its config keys (see the module docstring)."""
    return view_object(app, _APP_TABLE)


def format_summary(config: Config) -> str:
    """Several lines for ``--check``: apps, ports, targets, non-defaults."""
    lines: list[str] = []
    for app in config.apps:
        ports = ", ".join(str(port) for port in app.ports)
        lines.append(f"app {render(app.name)}: ports {ports}")
        for target in app.targets:
            lines.append(f"  target {target.address} weight {target.weight}")
        lines.extend(f"  {setting}" for setting in summaries(app, _APP_TABLE, _APP_DEFAULTS))
    n_ports = sum(len(app.ports) for app in config.apps)
    n_targets = sum(len(app.targets) for app in config.apps)
    lines.append(
        f"{config.source}: OK, {_count(len(config.apps), 'app')}, "
        f"{_count(n_ports, 'port')}, {_count(n_targets, 'target')}")
    return "\n".join(lines)


def _count(n: int, noun: str) -> str:
    return f"{n} {noun}" if n == 1 else f"{n} {noun}s"


# --- Apps -----------------------------------------------------------------------

def _parse_apps(value: object, where: str, context: Context) -> tuple[App, ...]:
    raw_apps = require_list(value, where, "apps")
    names: dict[str, int] = {}
    port_owners: dict[int, str] = {}
    apps: list[App] = []
    for index, raw_app in enumerate(raw_apps):
        app_where = f"{where}[{index}]"
        known_name = raw_app.get(_NAME_KEY) if isinstance(raw_app, dict) else None
        if _is_valid_name(known_name):
            app_where = f"{app_where} {render(known_name)}"
        app = parse_object(raw_app, app_where, _APP_TABLE,
                           Context(names, port_owners, context.allow_empty_targets))
        names[app.name] = index
        port_owners.update((port, app.name) for port in app.ports)
        apps.append(app)
    if len(apps) + sum(len(app.targets) for app in apps) > MAX_NAMES:
        # Each app and each target is a slot of the shared connection
        # counters (rawproxy.counters), which has room for this many.
        raise Invalid(where, f"more than {MAX_NAMES} apps and targets together")
    return tuple(apps)


def _is_valid_name(value: object) -> bool:
    return isinstance(value, str) and value != "" and value.isprintable()


def _parse_name(value: object, where: str, context: Context) -> str:
    if not isinstance(value, str) or not value:
        raise Invalid(where, f"must be a non-empty string, not {describe(value)}")
    if not value.isprintable():
        raise Invalid(where, f"{render(value)} must be printable "
                             "(no control or line-break characters)")
    if value in context.names:
        raise Invalid(where, f"duplicate app name {render(value)} "
                             f"(also Apps[{context.names[value]}])")
    return value


def _parse_ports(value: object, where: str, context: Context) -> tuple[int, ...]:
    items = require_list(value, where, "ports")
    first_index: dict[int, int] = {}
    for index, item in enumerate(items):
        item_where = f"{where}[{index}]"
        port = as_int(item)
        if port is None or not 1 <= port <= 65535:
            raise Invalid(item_where, f"{render(item)} is not a port (1-65535)")
        if port in first_index:
            raise Invalid(item_where, f"{port} is listed twice "
                                      f"(also Ports[{first_index[port]}])")
        if port in context.port_owners:
            raise Invalid(item_where, f"{port} is already used by app "
                                      f"{render(context.port_owners[port])}")
        first_index[port] = index
    return tuple(first_index)


def _parse_seconds(value: object, where: str, minimum_s: float = 0.0) -> float:
    return parse_seconds(value, where, minimum_s, MAX_TIMEOUT_S)


def _parse_max_connections(value: object, where: str) -> int:
    return parse_count(value, where, "connection limit")


def _per_client_summary(limits: PerClient) -> str:
    parts = [] if limits.max_connections is None else [
        f"max connections {limits.max_connections}"]
    if limits.rate is not None:
        parts.append(f"{limits.rate:g} new connections/s")
    return "per client: " + ", ".join(parts)


def _parse_rate(value: object, where: str) -> float:
    rate = as_number(value)  # compared before float(): a huge int would overflow
    if rate is None or not 0 < rate <= MAX_RATE:
        raise Invalid(where, f"{render(value)} is not a rate (new connections a second, "
                             f"a number > 0 and at most {MAX_RATE:g})")
    return float(rate)


def _parse_proxy_protocol(value: object, where: str) -> str:
    return parse_choice(value, where, "a PROXY protocol version", PROXY_PROTOCOL_VERSIONS)


def _parse_concurrency(value: object, where: str, context: Context) -> Concurrency:
    limits = parse_object(value, where, _CONCURRENCY_TABLE, context)
    hard = limits["hard_limit"]
    soft = limits.get("soft_limit", hard)
    if soft > hard:
        raise Invalid(at(where, _SOFT_LIMIT), f"{soft} is above the hard limit {hard} "
                                              "(1 <= soft <= hard)")
    return Concurrency(soft_limit=soft, hard_limit=hard)


def _finish_health_check(check: Mapping[str, float],
                         app: Mapping[str, Any]) -> HealthCheck:
    interval_s = check["interval_s"]
    timeout_s = check.get("timeout_s")
    if timeout_s is None:
        connect_s = app.get("connect_timeout_s", DEFAULT_CONNECT_TIMEOUT_S)
        timeout_s = max(MIN_CHECK_TIMEOUT_S, min(interval_s, connect_s))
    return HealthCheck(interval_s=interval_s, timeout_s=timeout_s)


# --- Targets --------------------------------------------------------------------

def _parse_targets(value: object, where: str, context: Context) -> tuple[Target, ...]:
    if value == [] and context.allow_empty_targets:
        return ()
    items = require_list(value, where, 'targets ("host:port")')
    first_index: dict[str, int] = {}
    targets: list[Target] = []
    for index, item in enumerate(items):
        item_where = f"{where}[{index}]"
        target = _parse_target(item, item_where, context)
        if target.address in first_index:
            raise Invalid(item_where, f"duplicate target {render(target.address)} "
                                      f"(also Targets[{first_index[target.address]}]; "
                                      "use Weight to favour a target)")
        first_index[target.address] = index
        targets.append(target)
    return tuple(targets)


def _parse_target(value: object, where: str, context: Context) -> Target:
    if isinstance(value, str):
        host, port = parse_address(value, where)
        return Target(host=host, port=port)
    if not isinstance(value, dict):
        raise Invalid(where, f'must be "host:port" or {_TARGET_TABLE.shape}, '
                             f"not {describe(value)}")
    return parse_object(value, where, _TARGET_TABLE, context)


def _make_target(fields: dict[str, Any]) -> Target:
    host, port = fields.pop("address")
    return Target(host=host, port=port, **fields)


def _parse_address_key(value: object, where: str) -> tuple[str, int]:
    if not isinstance(value, str):
        raise Invalid(where, f'must be a string "host:port", not {describe(value)}')
    return parse_address(value, where)


def _parse_weight(value: object, where: str) -> int:
    return parse_count(value, where, "weight", MAX_WEIGHT)


# --- The tables: every key of the config, once ----------------------------------

_TARGET_TABLE: Table[Target] = Table((
    Key("Address", "address", plain(_parse_address_key), required=True,
        example='"host:port"'),
    Key("Weight", "weight", plain(_parse_weight), example="N"),
), make=_make_target)

# Made as plain fields: the Timeout default needs the app's ConnectTimeout,
# so the app's HealthCheck row finishes it (_finish_health_check).
_HEALTH_CHECK_TABLE: Table[dict[str, Any]] = Table((
    Key("Interval", "interval_s", required=True, example="5",
        parse=plain(lambda v, w: _parse_seconds(v, w, MIN_CHECK_INTERVAL_S))),
    Key("Timeout", "timeout_s", example="2",
        parse=plain(lambda v, w: _parse_seconds(v, w, MIN_CHECK_TIMEOUT_S))),
), make=dict)

_MAX_CONNECTIONS = "MaxConnections"  # an app's key, and PerClient's
_PER_CLIENT_TABLE: Table[PerClient] = Table((
    Key(_MAX_CONNECTIONS, "max_connections", plain(_parse_max_connections), example="10"),
    Key("Rate", "rate", plain(_parse_rate), example="5"),
), make=lambda fields: PerClient(**fields))

_SOFT_LIMIT = "SoftLimit"
# Made as plain fields: SoftLimit defaults to HardLimit and must not exceed
# it, which _parse_concurrency checks with the JSON path at hand.
_CONCURRENCY_TABLE: Table[dict[str, Any]] = Table((
    Key(_SOFT_LIMIT, "soft_limit", example="S",
        parse=plain(lambda v, w: parse_count(v, w, "connection limit"))),
    Key("HardLimit", "hard_limit", required=True, example="H",
        parse=plain(lambda v, w: parse_count(v, w, "connection limit"))),
), make=dict)

_APP_TABLE: Table[App] = Table((
    Key("Name", "name", _parse_name, required=True, example="..."),
    Key("Ports", "ports", _parse_ports, required=True, example="[...]", view=list),
    Key("Targets", "targets", _parse_targets, required=True, example="[...]",
        view=lambda targets: [view_object(t, _TARGET_TABLE) for t in targets]),
    Key("ConnectTimeout", "connect_timeout_s", plain(_parse_seconds),
        summary=lambda s: f"connect timeout {s:g}s"),
    Key("IdleTimeout", "idle_timeout_s", plain(_parse_seconds),
        summary=lambda s: f"idle timeout {s:g}s"),
    Key(_MAX_CONNECTIONS, "max_connections", plain(_parse_max_connections),
        summary=lambda n: f"max connections {n}"),
    Key("ProxyProtocol", "proxy_protocol", plain(_parse_proxy_protocol),
        summary=lambda version: f"proxy protocol {version}"),
    Key("HealthCheck", "health_check", nested(_HEALTH_CHECK_TABLE),
        view=nested_view(_HEALTH_CHECK_TABLE), finish=_finish_health_check,
        summary=lambda check: (f"health check every {check.interval_s:g}s, "
                               f"timeout {check.timeout_s:g}s")),
    Key("AllowFrom", "allow_from", plain(parse_networks),
        view=lambda networks: [str(network) for network in networks],
        summary=lambda networks: "allow from " + ", ".join(map(str, networks))),
    Key("PerClient", "per_client", nested_some(_PER_CLIENT_TABLE),
        view=nested_view(_PER_CLIENT_TABLE), summary=_per_client_summary),
    Key("Concurrency", "concurrency", _parse_concurrency, view=nested_view(_CONCURRENCY_TABLE),
        summary=lambda c: f"concurrency soft {c.soft_limit}, hard {c.hard_limit} per target"),
    Key("QueueTimeout", "queue_timeout_s", plain(_parse_seconds),
        summary=lambda s: f"queue timeout {s:g}s"),
    Key("Balance", "balance", summary=lambda policy: f"balance {policy}",
        parse=plain(lambda v, w: parse_choice(v, w, "a balance policy", BALANCE_POLICIES))),
    Key("Machines", "machines", parse_machines, view=view_machines,  # configmachines
        summary=machines_summary),
), make=lambda fields: App(**fields))

_TOP_TABLE: Table[tuple[App, ...]] = Table((
    Key("Apps", "apps", _parse_apps, required=True, example="[...]"),
), make=lambda fields: fields["apps"])

_NAME_KEY = next(key.name for key in _APP_TABLE.keys if key.field == "name")
_APP_DEFAULTS: Mapping[str, object] = {
    f.name: f.default for f in dataclasses.fields(App)
    if f.default is not dataclasses.MISSING}
