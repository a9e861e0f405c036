"""What a fleet's proxies keep in etcd, and the config they make of it (SPEC 11).

Keys under the prefix (``/rawproxy/`` by default)::

    PREFIX config           the whole config: the file's schema, except that
                            an app may list "Targets": []
    PREFIX targets/APP/ID   one registered target of app APP (ID: anything
                            without a "/", usually the machine's name): the
                            value is "host:port" or {"Address": ..., "Weight": N}

Other keys under the prefix are ignored.

* :class:`FleetState` is the value of every key under the prefix at one
  revision: made from a range read, moved forward by watch events.
* :func:`compose` validates it into a :class:`Config`.  The config key is
  checked exactly as a file is, under the source name ``etcd:PREFIXconfig``,
  so an invalid put gives the same one-line message as an invalid file on
  SIGHUP, and rejects the whole revision.  A registration is checked on its
  own: an invalid one, or one for an app the config does not have, is left
  out (and said so) while the rest is applied, since one machine's bad
  entry must not freeze every app's config.  Registered targets join their
  app's ``Targets`` after the listed ones, in key order; one whose address
  is already there is not added twice.
* :func:`save_cache` / :func:`load_cache`: the last applied config, in a
  file written atomically, for a proxy that starts while etcd is away.

Pure but for the cache file: no sockets, no threads.
"""

from __future__ import annotations

import dataclasses
import json
import os
import tempfile
from typing import Optional, Sequence

from . import jsontext
from .config import App, Config, ConfigError, Target, app_view, parse_config
from .etcd import Event, KeyValue

CONFIG_KEY = "config"
TARGETS_DIR = "targets/"
_PROBE_APP = "registered"  # the one app of the document a registration is checked in


class FleetState:
    """Every key under ``prefix`` (bytes -> bytes) as of ``revision``."""

    def __init__(self, prefix: bytes, revision: int,
                 values: Optional[dict[bytes, bytes]] = None) -> None:
        self.prefix = prefix
        self.revision = revision
        self.values: dict[bytes, bytes] = dict(values or {})

    @classmethod
    def from_range(cls, prefix: bytes, revision: int, kvs: Sequence[KeyValue]) -> FleetState:
        return cls(prefix, revision, {kv.key: kv.value for kv in kvs})

    @property
    def resume_from(self) -> int:
        """Where a watch starts so that no change after ``revision`` is missed."""
        return self.revision + 1

    def apply(self, events: Sequence[Event]) -> None:
        """Events in revision order; ``revision`` becomes the last one's.  A
        catch-up batch may say the store is further on: that is not trusted,
        only the revisions of events seen."""
        for event in events:
            if event.deleted:
                self.values.pop(event.kv.key, None)
            else:
                self.values[event.kv.key] = event.kv.value
            self.revision = max(self.revision, event.kv.mod_revision)

    def inputs(self) -> tuple[Optional[bytes], tuple[tuple[bytes, bytes], ...]]:
        """What the config is made of: equal inputs make an equal config."""
        config = self.values.get(self.prefix + CONFIG_KEY.encode())
        targets = self.prefix + TARGETS_DIR.encode()
        registered = tuple(sorted((k, v) for k, v in self.values.items()
                                  if k.startswith(targets)))
        return config, registered


def source_name(prefix: bytes) -> str:
    """How messages and ``/config`` name the config key."""
    return "etcd:" + (prefix + CONFIG_KEY.encode()).decode("utf-8", "backslashreplace")


@dataclasses.dataclass(frozen=True)
class Composed:
    config: Config
    registered: int  # registered targets in the config
    skipped: tuple[str, ...]  # one line for each registration left out, and why


def compose(state: FleetState) -> Composed:
    """The config ``state`` describes; ConfigError if its config key is invalid."""
    source = source_name(state.prefix)
    text, registrations = state.inputs()
    if text is None:
        raise ConfigError(f"{source}: no such key (put the config there)")
    base = parse_config(text, source, allow_empty_targets=True)
    by_app: dict[str, list[Target]] = {}
    skipped: list[str] = []
    names = {app.name for app in base.apps}
    for key, value in registrations:
        where = "etcd:" + key.decode("utf-8", "backslashreplace")
        app_name = _app_of(key[len(state.prefix + TARGETS_DIR.encode()):])
        if app_name is None:
            skipped.append(f"{where}: not {state.prefix.decode('utf-8', 'replace')}"
                           f"{TARGETS_DIR}APP/ID")
        elif app_name not in names:
            skipped.append(f"{where}: no app {jsontext.render(app_name)} in the config")
        else:
            try:
                by_app.setdefault(app_name, []).append(parse_target(value, where))
            except ConfigError as exc:
                skipped.append(str(exc))
    apps = tuple(_with_registered(app, by_app.get(app.name, ())) for app in base.apps)
    config = Config(apps=apps, source=source)
    registered = sum(len(app.targets) for app in apps) - sum(len(a.targets) for a in base.apps)
    return Composed(config, registered, tuple(skipped))


def _app_of(rest: bytes) -> Optional[str]:
    try:
        app, sep, ident = rest.decode("utf-8").rpartition("/")
    except UnicodeDecodeError:
        return None
    return app if sep and app and ident else None


def _with_registered(app: App, targets: Sequence[Target]) -> App:
    if not targets:
        return app
    known = {target.address for target in app.targets}
    added: list[Target] = []
    for target in targets:
        if target.address not in known:
            known.add(target.address)
            added.append(target)
    return dataclasses.replace(app, targets=app.targets + tuple(added))


def parse_target(value: bytes, where: str) -> Target:
    """One registered target, checked by the config's own rules; the
    message names the key instead of a place in a config document."""
    try:
        jsontext.load(value)  # exactly one JSON value: safe to put in a list
    except jsontext.JSONTextError as exc:
        raise ConfigError(f"{where}: {exc}") from None
    document = (b'{"Apps": [{"Name": "' + _PROBE_APP.encode() + b'", "Ports": [1], '
                b'"Targets": [' + value + b"]}]}")
    try:
        (app,) = parse_config(document, where).apps
    except ConfigError as exc:
        inner = f'{where}: Apps[0] "{_PROBE_APP}" Targets[0]'
        message = str(exc)
        if message.startswith(inner):
            message = where + message[len(inner):]
        raise ConfigError(message) from None
    (target,) = app.targets
    return target


# -- the cache ------------------------------------------------------------------

def save_cache(path: str, revision: int, config: Config) -> None:
    """Write ``config`` (as served: registered targets included) atomically:
    a reader sees the old file or the new one, never a mix."""
    text = json.dumps({"Revision": revision, "Source": config.source,
                       "Config": {"Apps": [app_view(app) for app in config.apps]}}, indent=1)
    directory = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(prefix=".rawproxy-cache-", dir=directory)
    try:
        with os.fdopen(fd, "w") as stream:
            stream.write(text + "\n")
            stream.flush()
            os.fsync(stream.fileno())
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise


def load_cache(path: str) -> tuple[int, Config]:
    """(revision, config) from a cache file; ConfigError naming it otherwise."""
    try:
        with open(path, "rb") as stream:
            document = json.loads(stream.read())
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read: {exc.strerror or exc}") from None
    except ValueError as exc:
        raise ConfigError(f"{path}: not a cache file: {exc}") from None
    revision = document.get("Revision") if isinstance(document, dict) else None
    if not isinstance(revision, int) or isinstance(revision, bool) or \
            not isinstance(document.get("Config"), dict):
        raise ConfigError(f'{path}: not a cache file (no "Revision" and "Config")')
    config = parse_config(json.dumps(document["Config"]), path, allow_empty_targets=True)
    return revision, config
