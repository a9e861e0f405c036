"""The app key ``Machines`` (SPEC 10): its key tables, parsers and view.

``{"Start": HOOK, "Stop": HOOK, "StartTimeout": s, "StopAfter": s,
"MinRunning": n}``; a HOOK is ``{"URL": "http://..."}`` or ``{"Command":
["prog", "arg", ...]}``.  Rules beyond the SPEC, checked here so a config
that validates cannot fail later:

* ``Start`` is required; ``StopAfter`` needs a ``Stop`` (an autostop with
  nothing to call would only flip a state).
* A URL is ``http://`` (no TLS: hooks are meant for a loopback or private
  machines API) with a host; a command is a non-empty list of strings.
* ``MinRunning`` is an integer >= 0 (default 0).

Pure: no I/O.  :mod:`rawproxy.config` has the app's row (``Machines``).
"""

from __future__ import annotations

import urllib.parse
from typing import Any, Callable

from .configschema import (Context, Invalid, Key, Table, as_int, nested_view, parse_object,
                           parse_seconds, plain)
from .configtypes import Hook, Machines
from .jsontext import describe, render

__all__ = ["machines_summary", "parse_machines", "view_machines"]

_MAX_SECONDS = 7 * 24 * 3600.0  # as config.MAX_TIMEOUT_S (an epoll timeout bound)
_MAX_MIN_RUNNING = 1_000_000


def _parse_url(value: object, where: str) -> str:
    if not isinstance(value, str):
        raise Invalid(where, f'must be a string "http://host:port/path", not {describe(value)}')
    parts = urllib.parse.urlsplit(value)
    if parts.scheme != "http" or not parts.hostname or any(c in value for c in " \r\n"):
        raise Invalid(where, f'{render(value)} is not an http:// URL (like '
                             '"http://127.0.0.1:8080/start/{target}")')
    return value


def _parse_command(value: object, where: str) -> tuple[str, ...]:
    if (not isinstance(value, list) or not value
            or not all(isinstance(item, str) and item for item in value)):
        raise Invalid(where, 'must be a non-empty list of non-empty strings, like '
                             f'["start-machine", "{{target}}"], not {describe(value)}')
    return tuple(str(item) for item in value)


def _parse_hook(value: object, where: str, context: Context) -> Hook:
    hook: Hook = parse_object(value, where, _HOOK_TABLE, context)
    if (hook.url is None) == (not hook.command):
        raise Invalid(where, 'needs exactly one of "URL" or "Command"')
    return hook


def _parse_min_running(value: object, where: str) -> int:
    number = as_int(value)
    if number is None or not 0 <= number <= _MAX_MIN_RUNNING:
        raise Invalid(where, f"{render(value)} is not a count of targets (an integer >= 0)")
    return number


def parse_machines(value: object, where: str, context: Context) -> Machines:
    fields = parse_object(value, where, _MACHINES_TABLE, context)
    if fields.get("stop_after_s") is not None and fields.get("stop") is None:
        raise Invalid(where, '"StopAfter" needs a "Stop" hook')
    return Machines(**fields)


def _view_hook(hook: Hook) -> dict[str, object]:
    return {"URL": hook.url} if hook.url is not None else {"Command": list(hook.command)}


def _seconds(value: object, where: str) -> float:
    return parse_seconds(value, where, 0.0, _MAX_SECONDS)


_HOOK_TABLE: Table[Hook] = Table((
    Key("URL", "url", plain(_parse_url), example='"http://..."'),
    Key("Command", "command", plain(_parse_command), example='["prog", "{target}"]'),
), make=lambda fields: Hook(**fields))

_MACHINES_TABLE: Table[dict[str, Any]] = Table((
    Key("Start", "start", _parse_hook, required=True, example="HOOK", view=_view_hook),
    Key("Stop", "stop", _parse_hook, example="HOOK", view=_view_hook),
    Key("StartTimeout", "start_timeout_s", plain(_seconds), example="10"),
    Key("StopAfter", "stop_after_s", plain(_seconds), example="300"),
    Key("MinRunning", "min_running", plain(_parse_min_running), example="0"),
), make=dict)


def machines_summary(machines: Machines) -> str:
    """The ``--check`` line of an app with ``Machines``."""
    stop = ("no autostop" if machines.stop_after_s is None
            else f"stop after {machines.stop_after_s:g}s idle, "
                 f"min running {machines.min_running}")
    return f"machines: start timeout {machines.start_timeout_s:g}s, {stop}"


view_machines: Callable[[Any], object] = nested_view(_MACHINES_TABLE)
