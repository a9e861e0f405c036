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
  with unprintable characters escaped so the message stays on one line.
* The first error in document order is reported.  Missing required keys are
  noticed at the end of their object, and a duplicated key before any other
  key of its object (the parser keeps no position for the second copy).
* Values come out canonical: IPv6 hosts in compressed form, host names
  lower-cased, ``AllowFrom`` entries as networks (a bare address is a /32
  or /128), every default filled in.

Defaults and limits beyond the SPEC, chosen so a value that validates here
cannot make the event loop or the balancer fail later:

* ``ConnectTimeout`` defaults to 3 s; ``IdleTimeout`` to none.  Every timeout
  and interval is a number > 0 and at most :data:`MAX_TIMEOUT_S` (7 days):
  larger values overflow ``epoll``/``select`` timeouts.
* ``HealthCheck.Timeout`` defaults to ``min(Interval, ConnectTimeout)``: a
  check is a TCP connect, so it gets the app's connect limit, and never
  outlives its own interval.
* ``Weight`` is an integer from 1 to :data:`MAX_WEIGHT`: weighted random
  choice sums weights as floats.
* ``Name`` must be printable (no control or line-separator characters): it
  is written into one-line logs and metric labels.
* JSON ``NaN``/``Infinity`` literals are invalid JSON here; bytes must be
  UTF-8 (a leading byte-order mark is ignored).

Pure: no sockets and no selectors.  Only :func:`load_config` (and
:class:`FileConfigSource`, the seam for other config stores) touch the file
system.
"""

from __future__ import annotations

import ipaddress
import json
import re
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any, Mapping, NoReturn, Optional, Protocol, Union

__all__ = [
    "DEFAULT_CONNECT_TIMEOUT_S",
    "MAX_TIMEOUT_S",
    "MAX_WEIGHT",
    "PROXY_PROTOCOL_VERSIONS",
    "App",
    "Config",
    "ConfigError",
    "ConfigSource",
    "FileConfigSource",
    "HealthCheck",
    "IPNetwork",
    "Target",
    "format_summary",
    "load_config",
    "parse_config",
]

DEFAULT_CONNECT_TIMEOUT_S = 3.0
MAX_TIMEOUT_S = 7 * 24 * 3600.0
MAX_WEIGHT = 1_000_000
PROXY_PROTOCOL_VERSIONS = ("v1", "v2")

# Evaluated at run time (isinstance, dataclass field types for
# typing.get_type_hints), so Union rather than ``|`` on Python 3.9.
IPNetwork = Union[ipaddress.IPv4Network, ipaddress.IPv6Network]

_TOP_KEYS = ("Apps",)
_APP_KEYS = (
    "Name", "Ports", "Targets", "ConnectTimeout", "IdleTimeout",
    "MaxConnections", "ProxyProtocol", "HealthCheck", "AllowFrom",
)
_APP_REQUIRED = ("Name", "Ports", "Targets")
_TARGET_KEYS = ("Address", "Weight")
_HEALTH_KEYS = ("Interval", "Timeout")

_PORT_TEXT = re.compile(r"[0-9]{1,5}")
_DNS_LABEL = re.compile(r"[A-Za-z0-9_-]{1,63}")
_MAX_DNS_NAME = 253
# Finds the first NaN/Infinity literal outside strings; used only to say
# where one is, after the parser already met it.
_STRING_OR_CONSTANT = re.compile(r'"(?:[^"\\]|\\.)*"|NaN|-?Infinity', re.DOTALL)
_MAX_RENDERED = 60


class ConfigError(Exception):
    """Invalid config; ``str()`` is the one-line message for the user."""


@dataclass(frozen=True)
class Target:
    """One backend of an app; ``host`` is canonical (see module docstring)."""

    host: str
    port: int
    weight: int = 1
    # ``host:port`` or ``[v6]:port``: the target's identity in logs and
    # metrics; computed once, since the relay reads it per connection.
    address: str = field(init=False, compare=False, repr=False)

    def __post_init__(self) -> None:
        host = f"[{self.host}]" if ":" in self.host else self.host
        object.__setattr__(self, "address", f"{host}:{self.port}")


@dataclass(frozen=True)
class HealthCheck:
    interval_s: float
    timeout_s: float


@dataclass(frozen=True)
class App:
    name: str
    ports: tuple[int, ...]
    targets: tuple[Target, ...]
    connect_timeout_s: float = DEFAULT_CONNECT_TIMEOUT_S
    idle_timeout_s: Optional[float] = None
    max_connections: Optional[int] = None
    proxy_protocol: Optional[str] = None
    health_check: Optional[HealthCheck] = None
    allow_from: tuple[IPNetwork, ...] = ()


@dataclass(frozen=True)
class Config:
    """Every app; ``source`` names where it came from (used in messages)."""

    apps: tuple[App, ...]
    source: str
    _by_port: Mapping[int, App] = field(
        init=False, repr=False, compare=False, hash=False)

    def __post_init__(self) -> None:
        by_port = {port: app for app in self.apps for port in app.ports}
        # Frozen dataclass: the derived index is set once, here.
        object.__setattr__(self, "_by_port", MappingProxyType(by_port))

    @property
    def ports(self) -> Mapping[int, App]:
        """Read-only ``port -> app`` for every listening port."""
        return self._by_port

    def app_for_port(self, port: int) -> Optional[App]:
        return self._by_port.get(port)


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
            data = stream.read()
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read: {exc.strerror or exc}") from None
    return parse_config(data, path)


def parse_config(text: Union[str, bytes], source: str) -> Config:
    """Validate the JSON ``text`` of a config; ``source`` prefixes messages."""
    try:
        document = _load_json(_decode(text))
        return Config(apps=_parse_top(document), source=source)
    except _Invalid as exc:
        where = f"{exc.where}: " if exc.where else ""
        raise ConfigError(f"{source}: {where}{exc.what}") from None


# --- Formatting for --check ---------------------------------------------------

def format_summary(config: Config) -> str:
    """Several lines for ``--check``: apps, ports, targets, non-defaults."""
    lines: list[str] = []
    for app in config.apps:
        ports = ", ".join(str(port) for port in app.ports)
        lines.append(f"app {_render(app.name)}: ports {ports}")
        for target in app.targets:
            lines.append(f"  target {target.address} weight {target.weight}")
        lines.extend(f"  {setting}" for setting in _non_defaults(app))
    n_ports = sum(len(app.ports) for app in config.apps)
    n_targets = sum(len(app.targets) for app in config.apps)
    lines.append(
        f"{config.source}: OK, {_count(len(config.apps), 'app')}, "
        f"{_count(n_ports, 'port')}, {_count(n_targets, 'target')}")
    return "\n".join(lines)


def _non_defaults(app: App) -> list[str]:
    settings: list[str] = []
    if app.connect_timeout_s != DEFAULT_CONNECT_TIMEOUT_S:
        settings.append(f"connect timeout {app.connect_timeout_s:g}s")
    if app.idle_timeout_s is not None:
        settings.append(f"idle timeout {app.idle_timeout_s:g}s")
    if app.max_connections is not None:
        settings.append(f"max connections {app.max_connections}")
    if app.proxy_protocol is not None:
        settings.append(f"proxy protocol {app.proxy_protocol}")
    if app.health_check is not None:
        check = app.health_check
        settings.append(f"health check every {check.interval_s:g}s, "
                        f"timeout {check.timeout_s:g}s")
    if app.allow_from:
        settings.append("allow from " + ", ".join(str(n) for n in app.allow_from))
    return settings


def _count(n: int, noun: str) -> str:
    return f"{n} {noun}" if n == 1 else f"{n} {noun}s"


# --- JSON text -> Python values ---------------------------------------------

class _Invalid(Exception):
    """Internal: what is wrong and where; ``parse_config`` adds the source."""

    def __init__(self, where: str, what: str) -> None:
        super().__init__(where, what)
        self.where = where
        self.what = what


class _NonFiniteLiteral(Exception):
    """Internal: the parser met NaN, Infinity or -Infinity."""


class _ObjectWithDuplicateKey(dict[str, Any]):
    """A JSON object that repeated ``duplicate_key``; reported where used."""

    def __init__(self, pairs: list[tuple[str, Any]], duplicate_key: str) -> None:
        super().__init__(pairs)
        self.duplicate_key = duplicate_key


def _decode(text: Union[str, bytes]) -> str:
    if isinstance(text, str):
        return text[1:] if text.startswith("\ufeff") else text
    try:
        return text.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        line = text.count(b"\n", 0, exc.start) + 1
        column = exc.start - (text.rfind(b"\n", 0, exc.start) + 1) + 1
        raise _Invalid("", f"not UTF-8 text: byte 0x{text[exc.start]:02x} "
                           f"at line {line} column {column}") from None


def _load_json(text: str) -> object:
    try:
        return json.loads(text, object_pairs_hook=_object_from_pairs,
                          parse_constant=_reject_constant)
    except json.JSONDecodeError as exc:
        raise _Invalid("", f"invalid JSON at line {exc.lineno} column "
                           f"{exc.colno}: {exc.msg}") from None
    except _NonFiniteLiteral as exc:
        raise _Invalid("", _constant_message(text, str(exc))) from None
    except RecursionError:
        raise _Invalid("", "invalid JSON: nested too deeply") from None
    except ValueError as exc:
        # Integers beyond sys.get_int_max_str_digits() (Python 3.11+); the
        # advice after the colon is about Python, not the config.
        raise _Invalid("", f"invalid JSON: {str(exc).split(':')[0]}") from None


def _object_from_pairs(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    obj = dict(pairs)
    if len(obj) == len(pairs):
        return obj
    seen: set[str] = set()
    for key, _ in pairs:
        if key in seen:
            return _ObjectWithDuplicateKey(pairs, key)
        seen.add(key)
    raise AssertionError("unreachable: fewer keys than pairs")


def _reject_constant(literal: str) -> NoReturn:
    raise _NonFiniteLiteral(literal)


def _constant_message(text: str, literal: str) -> str:
    for match in _STRING_OR_CONSTANT.finditer(text):
        if not match.group().startswith('"'):
            pos = match.start()
            line = text.count("\n", 0, pos) + 1
            column = pos - (text.rfind("\n", 0, pos) + 1) + 1
            return (f"invalid JSON at line {line} column {column}: "
                    f"{match.group()} is not a number in JSON")
    return f"invalid JSON: {literal} is not a number in JSON"


# --- Rendering values in messages -------------------------------------------

def _render(value: object) -> str:
    """``value`` as JSON on one printable line, shortened when long."""
    text = json.dumps(value, ensure_ascii=False)
    text = "".join(c if c.isprintable() else _escape(c) for c in text)
    if len(text) > _MAX_RENDERED:
        text = text[:_MAX_RENDERED - 3] + "..."
    return text


def _escape(char: str) -> str:
    code = ord(char)
    return f"\\u{code:04x}" if code <= 0xFFFF else f"\\U{code:08x}"


def _describe(value: object) -> str:
    """Short description for "must be X, not ..." messages."""
    if isinstance(value, dict):
        return "an object"
    if isinstance(value, list):
        return "an empty list" if not value else "a list"
    return _render(value)


def _as_int(value: object) -> Optional[int]:
    # JSON true/false arrive as bool, a subclass of int: not a number here.
    if isinstance(value, int) and not isinstance(value, bool):
        return value
    return None


def _as_number(value: object) -> Optional[Union[int, float]]:
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return value
    return None


def _at(where: str, key: str) -> str:
    return f"{where} {key}" if where else key


# --- Structure helpers --------------------------------------------------------

def _require_object(value: object, where: str, shape: str) -> dict[str, object]:
    if not isinstance(value, dict):
        raise _Invalid(where, f"must be an object like {shape}, not {_describe(value)}")
    if isinstance(value, _ObjectWithDuplicateKey):
        raise _Invalid(where, f"duplicate key {_render(value.duplicate_key)}")
    return value


def _require_list(value: object, where: str, of_what: str) -> list[object]:
    if not isinstance(value, list) or not value:
        raise _Invalid(where, f"must be a non-empty list of {of_what}, "
                              f"not {_describe(value)}")
    return value


def _check_key(key: str, allowed: tuple[str, ...], where: str) -> None:
    if key not in allowed:
        raise _Invalid(where, f"unknown key {_render(key)} "
                              f"(allowed: {', '.join(allowed)})")


def _check_required(obj: dict[str, object], required: tuple[str, ...],
                    where: str) -> None:
    for key in required:
        if key not in obj:
            raise _Invalid(where, f"missing required key {_render(key)}")


# --- Top level and apps -----------------------------------------------------

def _parse_top(document: object) -> tuple[App, ...]:
    top = _require_object(document, "", '{"Apps": [...]}')
    for key in top:
        _check_key(key, _TOP_KEYS, "")
    _check_required(top, _TOP_KEYS, "")
    raw_apps = _require_list(top["Apps"], "Apps", "apps")
    names: dict[str, int] = {}
    port_owners: dict[int, str] = {}
    apps: list[App] = []
    for index, raw_app in enumerate(raw_apps):
        app = _parse_app(raw_app, index, names, port_owners)
        names[app.name] = index
        port_owners.update((port, app.name) for port in app.ports)
        apps.append(app)
    return tuple(apps)


@dataclass
class _AppDraft:
    """An app's fields as they are validated, before defaults depend on them."""

    name: str = ""
    ports: tuple[int, ...] = ()
    targets: tuple[Target, ...] = ()
    connect_timeout_s: float = DEFAULT_CONNECT_TIMEOUT_S
    idle_timeout_s: Optional[float] = None
    max_connections: Optional[int] = None
    proxy_protocol: Optional[str] = None
    health_check: Optional[tuple[float, Optional[float]]] = None
    allow_from: tuple[IPNetwork, ...] = ()

    def build(self) -> App:
        check = None
        if self.health_check is not None:
            interval_s, timeout_s = self.health_check
            if timeout_s is None:
                timeout_s = min(interval_s, self.connect_timeout_s)
            check = HealthCheck(interval_s=interval_s, timeout_s=timeout_s)
        return App(
            name=self.name, ports=self.ports, targets=self.targets,
            connect_timeout_s=self.connect_timeout_s,
            idle_timeout_s=self.idle_timeout_s,
            max_connections=self.max_connections,
            proxy_protocol=self.proxy_protocol, health_check=check,
            allow_from=self.allow_from)


def _parse_app(raw: object, index: int, names: Mapping[str, int],
               port_owners: Mapping[int, str]) -> App:
    where = f"Apps[{index}]"
    known_name = raw.get("Name") if isinstance(raw, dict) else None
    if _is_valid_name(known_name):
        where = f"{where} {_render(known_name)}"
    obj = _require_object(raw, where, '{"Name": ..., "Ports": [...], "Targets": [...]}')
    draft = _AppDraft()
    for key, value in obj.items():
        _check_key(key, _APP_KEYS, where)
        _apply_app_key(draft, key, value, _at(where, key), names, port_owners)
    _check_required(obj, _APP_REQUIRED, where)
    return draft.build()


def _apply_app_key(draft: _AppDraft, key: str, value: object, where: str,
                   names: Mapping[str, int], port_owners: Mapping[int, str]) -> None:
    if key == "Name":
        draft.name = _parse_name(value, where, names)
    elif key == "Ports":
        draft.ports = _parse_ports(value, where, port_owners)
    elif key == "Targets":
        draft.targets = _parse_targets(value, where)
    elif key == "ConnectTimeout":
        draft.connect_timeout_s = _parse_seconds(value, where)
    elif key == "IdleTimeout":
        draft.idle_timeout_s = _parse_seconds(value, where)
    elif key == "MaxConnections":
        draft.max_connections = _parse_max_connections(value, where)
    elif key == "ProxyProtocol":
        draft.proxy_protocol = _parse_proxy_protocol(value, where)
    elif key == "HealthCheck":
        draft.health_check = _parse_health_check(value, where)
    elif key == "AllowFrom":
        draft.allow_from = _parse_allow_from(value, where)


def _is_valid_name(value: object) -> bool:
    return isinstance(value, str) and value != "" and value.isprintable()


def _parse_name(value: object, where: str, names: Mapping[str, int]) -> str:
    if not isinstance(value, str) or not value:
        raise _Invalid(where, f"must be a non-empty string, not {_describe(value)}")
    if not value.isprintable():
        raise _Invalid(where, f"{_render(value)} must be printable "
                              "(no control or line-break characters)")
    if value in names:
        raise _Invalid(where, f"duplicate app name {_render(value)} "
                              f"(also Apps[{names[value]}])")
    return value


def _parse_ports(value: object, where: str,
                 port_owners: Mapping[int, str]) -> tuple[int, ...]:
    items = _require_list(value, where, "ports")
    first_index: dict[int, int] = {}
    for index, item in enumerate(items):
        item_where = f"{where}[{index}]"
        port = _as_int(item)
        if port is None or not 1 <= port <= 65535:
            raise _Invalid(item_where, f"{_render(item)} is not a port (1-65535)")
        if port in first_index:
            raise _Invalid(item_where, f"{port} is listed twice "
                                       f"(also Ports[{first_index[port]}])")
        if port in port_owners:
            raise _Invalid(item_where, f"{port} is already used by app "
                                       f"{_render(port_owners[port])}")
        first_index[port] = index
    return tuple(first_index)


def _parse_seconds(value: object, where: str) -> float:
    # Comparing first keeps huge ints (float() would overflow) and 1e400
    # (parsed as inf) out with the same message.
    seconds = _as_number(value)
    if seconds is None or not 0 < seconds <= MAX_TIMEOUT_S:
        raise _Invalid(where, f"{_render(value)} is not a duration (seconds, "
                              f"a number > 0 and at most {MAX_TIMEOUT_S:g})")
    return float(seconds)


def _parse_max_connections(value: object, where: str) -> int:
    limit = _as_int(value)
    if limit is None or limit < 1:
        raise _Invalid(where, f"{_render(value)} is not a connection limit "
                              "(an integer >= 1)")
    return limit


def _parse_proxy_protocol(value: object, where: str) -> str:
    if not isinstance(value, str) or value not in PROXY_PROTOCOL_VERSIONS:
        raise _Invalid(where, f'{_render(value)} is not a PROXY protocol '
                              'version ("v1" or "v2")')
    return value


def _parse_health_check(value: object,
                        where: str) -> tuple[float, Optional[float]]:
    obj = _require_object(value, where, '{"Interval": 5, "Timeout": 2}')
    interval_s: Optional[float] = None
    timeout_s: Optional[float] = None
    for key, item in obj.items():
        _check_key(key, _HEALTH_KEYS, where)
        if key == "Interval":
            interval_s = _parse_seconds(item, _at(where, key))
        else:
            timeout_s = _parse_seconds(item, _at(where, key))
    _check_required(obj, ("Interval",), where)
    assert interval_s is not None
    return interval_s, timeout_s


def _parse_allow_from(value: object, where: str) -> tuple[IPNetwork, ...]:
    items = _require_list(value, where, "CIDR networks (omit it to allow every client)")
    networks: list[IPNetwork] = []
    for index, item in enumerate(items):
        item_where = f"{where}[{index}]"
        try:
            if not isinstance(item, str):
                raise ValueError(item)
            networks.append(ipaddress.ip_network(item, strict=False))
        except ValueError:
            raise _Invalid(item_where, f'{_render(item)} is not a CIDR network '
                                       '(like "10.0.0.0/8" or "2001:db8::/32")') from None
    return tuple(networks)


# --- Targets --------------------------------------------------------------

def _parse_targets(value: object, where: str) -> tuple[Target, ...]:
    items = _require_list(value, where, 'targets ("host:port")')
    first_index: dict[str, int] = {}
    targets: list[Target] = []
    for index, item in enumerate(items):
        item_where = f"{where}[{index}]"
        target = _parse_target(item, item_where)
        if target.address in first_index:
            raise _Invalid(item_where, f"duplicate target {_render(target.address)} "
                                       f"(also Targets[{first_index[target.address]}]; "
                                       "use Weight to favour a target)")
        first_index[target.address] = index
        targets.append(target)
    return tuple(targets)


def _parse_target(value: object, where: str) -> Target:
    if isinstance(value, str):
        host, port = _parse_address(value, where)
        return Target(host=host, port=port)
    if not isinstance(value, dict):
        raise _Invalid(where, 'must be "host:port" or {"Address": "host:port", '
                              f'"Weight": N}}, not {_describe(value)}')
    obj = _require_object(value, where, '{"Address": "host:port", "Weight": N}')
    address: Optional[tuple[str, int]] = None
    weight = 1
    for key, item in obj.items():
        _check_key(key, _TARGET_KEYS, where)
        if key == "Address":
            if not isinstance(item, str):
                raise _Invalid(_at(where, key), 'must be a string "host:port", '
                                                f"not {_describe(item)}")
            address = _parse_address(item, _at(where, key))
        else:
            weight = _parse_weight(item, _at(where, key))
    _check_required(obj, ("Address",), where)
    assert address is not None
    return Target(host=address[0], port=address[1], weight=weight)


def _parse_weight(value: object, where: str) -> int:
    weight = _as_int(value)
    if weight is None or not 1 <= weight <= MAX_WEIGHT:
        raise _Invalid(where, f"{_render(value)} is not a weight "
                              f"(an integer from 1 to {MAX_WEIGHT})")
    return weight


def _parse_address(text: str, where: str) -> tuple[str, int]:
    """``"host:port"`` or ``"[v6]:port"`` -> (canonical host, port)."""
    if text.startswith("["):
        close = text.find("]")
        if close < 0 or text[close + 1:close + 2] != ":":
            raise _Invalid(where, f'{_render(text)} is not "[v6addr]:port"')
        host = _parse_ipv6_host(text[1:close], text, where)
        port_text = text[close + 2:]
    else:
        host_text, colon, port_text = text.rpartition(":")
        if not colon:
            raise _Invalid(where, f'{_render(text)} is not "host:port"')
        if ":" in host_text:
            raise _Invalid(where, f"{_render(text)}: an IPv6 address needs "
                                  'brackets, as in "[2001:db8::1]:5001"')
        host = _parse_host(host_text, text, where)
    if not _PORT_TEXT.fullmatch(port_text) or not 1 <= int(port_text) <= 65535:
        raise _Invalid(where, f"{_render(text)}: {_render(port_text)} "
                              "is not a port (1-65535)")
    return host, int(port_text)


def _parse_ipv6_host(host_text: str, text: str, where: str) -> str:
    try:
        return str(ipaddress.IPv6Address(host_text))
    except ValueError:
        raise _Invalid(where, f"{_render(text)}: {_render(host_text)} is not an "
                              "IPv6 address (brackets are only for IPv6)") from None


def _parse_host(host_text: str, text: str, where: str) -> str:
    """An IPv4 literal or a plausible DNS name, canonical form."""
    try:
        return str(ipaddress.IPv4Address(host_text))
    except ValueError:
        pass
    labels = host_text[:-1].split(".") if host_text.endswith(".") else host_text.split(".")
    plausible = (
        len(host_text) <= _MAX_DNS_NAME
        and all(_DNS_LABEL.fullmatch(label) for label in labels)
        # An all-digit last label is no TLD; getaddrinfo would read "10.1"
        # or "1.2.3.256" as a legacy inet_aton form or fail: say so now.
        and not labels[-1].isdigit()
    )
    if not plausible:
        raise _Invalid(where, f"{_render(text)}: {_render(host_text)} is not "
                              "a host name or IP address")
    return host_text.lower()
