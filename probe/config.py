"""The probe's own reading of a rawproxy config: apps, their ports and targets.

Only what the probe needs is checked (names, ports, target addresses);
rawproxy validates the rest.  The parsed JSON is kept as ``raw`` so local
mode can write a derived config with every other key as it was.
Names are never resolved here.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, NamedTuple


class ConfigError(Exception):
    """A one-line message naming the file and what is wrong."""


class App(NamedTuple):
    name: str
    ports: tuple[int, ...]
    targets: tuple[str, ...]   # "host:port" as written, Weight dropped


def target_address(target: Any) -> str:
    return str(target["Address"]) if isinstance(target, dict) else str(target)


def load(path: Path) -> tuple[list[App], dict[str, Any]]:
    try:
        raw = json.loads(path.read_text())
    except OSError as exc:
        raise ConfigError(f"{path}: {exc.strerror}") from None
    except ValueError as exc:
        raise ConfigError(f"{path}: invalid JSON: {exc}") from None
    if not isinstance(raw, dict) or not isinstance(raw.get("Apps"), list) or not raw["Apps"]:
        raise ConfigError(f'{path}: expected {{"Apps": [...]}} with at least one app')
    return [_app(path, i, app) for i, app in enumerate(raw["Apps"])], raw


def _app(path: Path, index: int, app: Any) -> App:
    where = f"{path}: Apps[{index}]"
    if not isinstance(app, dict) or not isinstance(app.get("Name"), str) or not app["Name"]:
        raise ConfigError(f"{where}: needs a non-empty Name")
    where += f' "{app["Name"]}"'
    ports = app.get("Ports")
    if not isinstance(ports, list) or not ports or not all(
            type(p) is int and 1 <= p <= 65535 for p in ports):
        raise ConfigError(f"{where}: Ports must be a non-empty list of ports (1-65535)")
    targets = app.get("Targets")
    if not isinstance(targets, list) or not targets or not all(
            isinstance(t, str) or (isinstance(t, dict) and isinstance(t.get("Address"), str))
            for t in targets):
        raise ConfigError(f'{where}: Targets must be a non-empty list of "host:port" '
                          'or {"Address": "host:port", "Weight": N}')
    return App(app["Name"], tuple(ports), tuple(target_address(t) for t in targets))
