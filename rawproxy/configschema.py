"""How config values are checked: key tables, and the value kinds that
are not specific to one key.  :mod:`rawproxy.config` holds the tables
themselves (every key of the config, once) and what the keys mean.

* A :class:`Key` is one key of a JSON object: its JSON name, the parser of
  its value, the field of the typed result it fills, whether it is required,
  how a view shows it and how a summary mentions a value other than the
  default.  A :class:`Table` is the keys of one kind of object and how its
  result is made; a nested object is a key whose parser is
  :func:`nested` of its own table.
* :func:`parse_object` checks a JSON object against a table: keys in
  document order (an unknown key names those allowed, in table order),
  then required keys, then each key's ``finish`` (defaults that depend on
  other keys), then ``make``.  :func:`view_object` is the way back.
* Parsers raise :class:`Invalid` (``where``: the JSON path; ``what``: one
  line saying what is wrong); the caller adds the source.

Pure: no I/O.
"""

from __future__ import annotations

import ipaddress
import re
import socket
from dataclasses import dataclass, field
from typing import Any, Callable, Generic, Mapping, Optional, TypeVar, Union

from . import jsontext
from .jsontext import describe, render

__all__ = ["Context", "Invalid", "Key", "Parse", "Table", "as_int", "as_number", "at",
           "nested", "nested_some", "nested_view", "parse_address", "parse_choice", "parse_count",
           "parse_networks", "parse_object", "parse_seconds", "plain", "require_list",
           "require_object", "summaries", "view_object"]

# Evaluated at run time (isinstance, dataclass field types for
# typing.get_type_hints), so Union rather than ``|`` on Python 3.9.
Network = Union[ipaddress.IPv4Network, ipaddress.IPv6Network]
_PORT_TEXT = re.compile(r"[0-9]{1,5}")
_DNS_LABEL = re.compile(r"[A-Za-z0-9_-]{1,63}")
_MAX_DNS_NAME = 253


class Invalid(Exception):
    """What is wrong (``what``) and where (``where``, a JSON path)."""

    def __init__(self, where: str, what: str) -> None:
        super().__init__(where, what)
        self.where = where
        self.what = what


@dataclass(frozen=True)
class Context:
    """What parsers may need besides their value: the apps before this one."""

    names: Mapping[str, int] = field(default_factory=dict)  # name -> index
    port_owners: Mapping[int, str] = field(default_factory=dict)  # port -> name
    allow_empty_targets: bool = False  # --etcd: registrations fill Targets (SPEC 11)


# A key's parser: (JSON value, JSON path for messages, context) -> typed value.
Parse = Callable[[object, str, Context], Any]
_T = TypeVar("_T")


def _as_is(value: Any) -> object:
    return value


@dataclass(frozen=True)
class Key:
    """One key of a JSON object (see the module docstring)."""

    name: str  # as spelled in JSON
    field: str  # the attribute of the typed result it fills
    parse: Parse
    required: bool = False
    example: str = ""  # its value in "must be an object like {...}", if shown
    view: Callable[[Any], object] = _as_is  # typed value -> JSON value
    summary: Optional[Callable[[Any], str]] = None  # --check line if not default
    # Completes the parsed value once the whole object is read, given the
    # object's other fields: for defaults that depend on other keys.
    finish: Optional[Callable[[Any, Mapping[str, Any]], object]] = None


@dataclass(frozen=True)
class Table(Generic[_T]):
    """The keys of one kind of JSON object, and how to build its result."""

    keys: tuple[Key, ...]
    make: Callable[[dict[str, Any]], _T]  # parsed fields (present keys) -> result
    by_name: Mapping[str, Key] = field(init=False, repr=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "by_name", {key.name: key for key in self.keys})

    @property
    def shape(self) -> str:
        return "{" + ", ".join(f"{render(key.name)}: {key.example}"
                               for key in self.keys if key.example) + "}"


def parse_object(value: object, where: str, table: Table[_T], context: Context) -> _T:
    obj = require_object(value, where, table.shape)
    fields: dict[str, Any] = {}
    for name, item in obj.items():
        key = table.by_name.get(name)
        if key is None:
            raise Invalid(where, f"unknown key {render(name)} "
                                 f"(allowed: {', '.join(table.by_name)})")
        fields[key.field] = key.parse(item, at(where, name), context)
    for key in table.keys:
        if key.required and key.name not in obj:
            raise Invalid(where, f"missing required key {render(key.name)}")
    for key in table.keys:
        if key.finish is not None and key.field in fields:
            fields[key.field] = key.finish(fields[key.field], fields)
    return table.make(fields)


def view_object(obj: object, table: Table[Any]) -> dict[str, object]:
    """The keys of ``obj``'s fields; unset ones (None, empty) left out."""
    view: dict[str, object] = {}
    for key in table.keys:
        value = getattr(obj, key.field)
        if key.required or value not in (None, ()):
            view[key.name] = key.view(value)
    return view


def summaries(obj: object, table: Table[Any], defaults: Mapping[str, object]) -> list[str]:
    """The ``--check`` lines of ``obj``'s keys whose value is not the default."""
    return [key.summary(getattr(obj, key.field)) for key in table.keys
            if key.summary is not None and getattr(obj, key.field) != defaults.get(key.field)]


def nested(table: Table[Any]) -> Parse:
    """The parser of a key whose value is an object of ``table``'s keys."""
    return lambda value, where, context: parse_object(value, where, table, context)


def nested_some(table: Table[Any]) -> Parse:
    """:func:`nested` for an object of optional keys that needs one of them."""
    def parse(value: object, where: str, context: Context) -> Any:
        result = parse_object(value, where, table, context)
        if not value:  # an object (parse_object checked), and an empty one
            names = ", ".join(render(key.name) for key in table.keys)
            raise Invalid(where, f"needs at least one of {names}")
        return result
    return parse


def nested_view(table: Table[Any]) -> Callable[[Any], object]:
    return lambda obj: view_object(obj, table)


def plain(parse: Callable[[object, str], Any]) -> Parse:
    """A parser that needs no context."""
    return lambda value, where, _context: parse(value, where)


def at(where: str, key: str) -> str:
    return f"{where} {key}" if where else key


def require_object(value: object, where: str, shape: str) -> dict[str, object]:
    if not isinstance(value, dict):
        raise Invalid(where, f"must be an object like {shape}, not {describe(value)}")
    if isinstance(value, jsontext.ObjectWithDuplicateKey):
        raise Invalid(where, f"duplicate key {render(value.duplicate_key)}")
    return value


def require_list(value: object, where: str, of_what: str) -> list[object]:
    if not isinstance(value, list) or not value:
        raise Invalid(where, f"must be a non-empty list of {of_what}, "
                             f"not {describe(value)}")
    return value


def as_int(value: object) -> Optional[int]:
    # JSON true/false arrive as bool, a subclass of int: not a number here.
    if isinstance(value, int) and not isinstance(value, bool):
        return value
    return None


def as_number(value: object) -> Optional[Union[int, float]]:
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return value
    return None


# --- Value kinds shared by several keys -----------------------------------------

def parse_seconds(value: object, where: str, minimum_s: float, maximum_s: float) -> float:
    """A duration: a number > 0 (and >= ``minimum_s``), at most ``maximum_s``."""
    # Comparing first keeps huge ints (float() would overflow) and 1e400
    # (parsed as inf) out with the same message.
    seconds = as_number(value)
    if seconds is None or seconds <= 0 or not minimum_s <= seconds <= maximum_s:
        least = f">= {minimum_s:g}" if minimum_s else "> 0"
        raise Invalid(where, f"{render(value)} is not a duration (seconds, "
                             f"a number {least} and at most {maximum_s:g})")
    return float(seconds)


def parse_count(value: object, where: str, what: str, maximum: Optional[int] = None) -> int:
    """An integer >= 1 (and <= ``maximum``); ``what`` names it in the message."""
    number = as_int(value)
    if number is None or number < 1 or (maximum is not None and number > maximum):
        bounds = ">= 1" if maximum is None else f"from 1 to {maximum}"
        raise Invalid(where, f"{render(value)} is not a {what} (an integer {bounds})")
    return number


def parse_choice(value: object, where: str, what: str, choices: tuple[str, ...]) -> str:
    """One of the strings ``choices``."""
    if not isinstance(value, str) or value not in choices:
        allowed = " or ".join(render(choice) for choice in choices)
        raise Invalid(where, f"{render(value)} is not {what} ({allowed})")
    return value


def parse_networks(value: object, where: str) -> tuple[Network, ...]:
    """A non-empty list of CIDR networks (a bare address: one host)."""
    items = require_list(value, where, "CIDR networks (omit it to allow every client)")
    networks: list[Network] = []
    for index, item in enumerate(items):
        item_where = f"{where}[{index}]"
        try:
            if not isinstance(item, str):
                raise ValueError(item)
            networks.append(ipaddress.ip_network(item, strict=False))
        except ValueError:
            raise Invalid(item_where, f'{render(item)} is not a CIDR network '
                                      '(like "10.0.0.0/8" or "2001:db8::/32")') from None
    return tuple(networks)


# --- "host:port" ---------------------------------------------------------------

def parse_address(text: str, where: str) -> tuple[str, int]:
    """``"host:port"`` or ``"[v6]:port"`` -> (canonical host, port)."""
    if text.startswith("["):
        close = text.find("]")
        if close < 0 or text[close + 1:close + 2] != ":":
            raise Invalid(where, f'{render(text)} is not "[v6addr]:port"')
        host = _parse_ipv6_host(text[1:close], text, where)
        port_text = text[close + 2:]
    else:
        host_text, colon, port_text = text.rpartition(":")
        if not colon:
            raise Invalid(where, f'{render(text)} is not "host:port"')
        if ":" in host_text:
            raise Invalid(where, f"{render(text)}: an IPv6 address needs "
                                 'brackets, as in "[2001:db8::1]:5001"')
        host = _parse_host(host_text, text, where)
    if not _PORT_TEXT.fullmatch(port_text) or not 1 <= int(port_text) <= 65535:
        raise Invalid(where, f"{render(text)}: {render(port_text)} "
                             "is not a port (1-65535)")
    return host, int(port_text)


def _parse_ipv6_host(host_text: str, text: str, where: str) -> str:
    try:
        return str(ipaddress.IPv6Address(host_text))
    except ValueError:
        raise Invalid(where, f"{render(text)}: {render(host_text)} is not an "
                             "IPv6 address (brackets are only for IPv6)") from None


def _is_inet_aton_form(host_text: str) -> bool:
    try:
        socket.inet_aton(host_text)
    except (OSError, ValueError):
        return False
    return True


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
        and not _is_inet_aton_form(host_text)  # "0x7f000001", "127.0x1": 127.0.0.1
    )
    if not plausible:
        raise Invalid(where, f"{render(text)}: {render(host_text)} is not "
                             "a host name or IP address")
    return host_text.lower()
