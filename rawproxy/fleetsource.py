"""``--etcd``: the config from etcd instead of a file, into the same reload (SPEC 11).

The seam: a file and etcd both end in :meth:`Reloader.apply
<rawproxy.reloader.Reloader.apply>` with a validated
:class:`~rawproxy.config.Config`.  Here:

* :func:`add_arguments` -- the ``--etcd*`` options;
* :func:`start_fleet` -- at start-up, before the loop exists: read the prefix
  at one revision (or, when no endpoint answers within ``--etcd-timeout``,
  the ``--etcd-cache`` file), or raise :class:`FleetStartError` with the
  exit code (1: etcd away and no cache; 2: invalid config, bad options or
  credentials);
* :class:`EtcdReloader` -- on the loop: starts the watch thread
  (:mod:`rawproxy.fleetwatch`), takes its reports from a queue the thread
  fills (woken by ``call_soon_threadsafe``), applies the newest config of a
  burst, logs and counts rejections as a file reload does, keeps the
  ``/config`` revision and the etcd metrics, writes the cache off the loop.
  SIGHUP asks the thread to read everything again.
"""

from __future__ import annotations

import argparse
import collections
import logging
import threading
from dataclasses import dataclass
from typing import Deque, Optional

from .config import MAX_TIMEOUT_S, Config, ConfigError
from .etcd import AuthFailed, Client, EtcdError, make_ssl_context, parse_endpoints
from .fleet import FleetState, compose, load_cache, save_cache
from .fleetwatch import Applied, Link, Rejected, Report, Unchanged, Watcher, initial_read
from .loop import EventLoop
from .reloader import Reloader
from .server import Server

log = logging.getLogger("rawproxy.etcd")

EXIT_UNAVAILABLE = 1
EXIT_USAGE = 2
DEFAULT_PREFIX = "/rawproxy/"
DEFAULT_TIMEOUT_S = 5.0


class FleetStartError(Exception):
    def __init__(self, message: str, code: int) -> None:
        super().__init__(message)
        self.code = code


def _timeout(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of seconds") from None
    if not 0 < value <= MAX_TIMEOUT_S:
        raise argparse.ArgumentTypeError(f"{text!r} must be a number > 0 (seconds)")
    return value


def add_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("a fleet fed from etcd (v3 JSON gateway)")
    group.add_argument("--etcd", metavar="URL[,URL...]",
                       help="read the config from etcd instead of --config and follow "
                            "its changes: http:// or https:// client URLs of the members")
    group.add_argument("--etcd-prefix", default=DEFAULT_PREFIX, metavar="PREFIX",
                       help="keys: PREFIX + 'config' (the config), PREFIX + "
                            f"'targets/APP/ID' (registered targets) (default: {DEFAULT_PREFIX})")
    group.add_argument("--etcd-cache", metavar="FILE",
                       help="every applied config is written here; served at start-up "
                            "when no endpoint answers")
    add_connection_arguments(group)


def add_connection_arguments(group: argparse._ActionsContainer) -> None:
    """How to reach etcd: timeout, TLS, auth (etcdctl's names)."""
    group.add_argument("--etcd-timeout", type=_timeout, default=DEFAULT_TIMEOUT_S,
                       metavar="SECONDS",
                       help="how long to wait for an answer from etcd, at start-up from "
                            "any endpoint (default: 5)")
    group.add_argument("--etcd-cacert", metavar="FILE",
                       help="verify https:// endpoints with this CA bundle")
    group.add_argument("--etcd-cert", metavar="FILE", help="TLS client certificate")
    group.add_argument("--etcd-key", metavar="FILE", help="TLS client key")
    group.add_argument("--etcd-user", metavar="NAME", help="etcd user to authenticate as")
    group.add_argument("--etcd-password-file", metavar="FILE",
                       help="that user's password: the file's contents without "
                            "surrounding whitespace")


@dataclass(frozen=True)
class FleetStart:
    """What start-up found: where to watch from and the config to serve."""

    clients: tuple[Client, ...]
    state: FleetState
    config: Config
    registered: int
    cache_path: Optional[str]
    from_cache: str = ""  # why the cache is served, or "" when etcd answered


def clients_from_args(args: argparse.Namespace) -> tuple[Client, ...]:
    """One client per ``--etcd`` endpoint; FleetStartError (exit 2) for bad options."""
    try:
        endpoints = parse_endpoints(args.etcd)
    except ValueError as exc:
        raise FleetStartError(f"--etcd: {exc}", EXIT_USAGE) from None
    if args.etcd_key is not None and args.etcd_cert is None:
        raise FleetStartError("--etcd-key needs --etcd-cert", EXIT_USAGE)
    if (args.etcd_user is None) != (args.etcd_password_file is None):
        raise FleetStartError("--etcd-user and --etcd-password-file go together", EXIT_USAGE)
    password = ""
    if args.etcd_password_file is not None:
        try:
            with open(args.etcd_password_file, encoding="utf-8") as stream:
                password = stream.read().strip()
        except (OSError, UnicodeDecodeError) as exc:
            raise FleetStartError(f"--etcd-password-file {args.etcd_password_file}: cannot "
                                  f"read: {getattr(exc, 'strerror', None) or exc}",
                                  EXIT_USAGE) from None
    context = None
    if any(ep.scheme == "https" for ep in endpoints):
        try:
            context = make_ssl_context(args.etcd_cacert, args.etcd_cert, args.etcd_key)
        except (EtcdError, OSError) as exc:
            raise FleetStartError(f"etcd TLS: {getattr(exc, 'strerror', None) or exc}",
                                  EXIT_USAGE) from None
    return tuple(Client(ep, args.etcd_timeout, ssl_context=context, user=args.etcd_user,
                        password=password) for ep in endpoints)


def _etcd_option_given(args: argparse.Namespace) -> str:
    """The first --etcd-* option given a value of its own, or "" (it would
    be ignored without --etcd: a usage error, not a silent no-op)."""
    defaults = {"etcd_prefix": DEFAULT_PREFIX, "etcd_cache": None,
                "etcd_timeout": DEFAULT_TIMEOUT_S, "etcd_cacert": None, "etcd_cert": None,
                "etcd_key": None, "etcd_user": None, "etcd_password_file": None}
    for name, default in defaults.items():
        if getattr(args, name, default) != default:
            return "--" + name.replace("_", "-")
    return ""


def start_fleet(args: argparse.Namespace) -> Optional[FleetStart]:
    """Under ``--etcd``: the start-up config (see the module docstring)."""
    if args.etcd is None:
        given = _etcd_option_given(args)
        if given:
            raise FleetStartError(f"{given} needs --etcd", EXIT_USAGE)
        return None
    clients = clients_from_args(args)
    prefix = args.etcd_prefix.encode()
    try:
        state = initial_read(clients, prefix, args.etcd_timeout)
    except AuthFailed as exc:
        raise FleetStartError(f"etcd: {exc}", EXIT_USAGE) from None
    except EtcdError as exc:
        return _from_cache(args, clients, prefix, exc)
    composed = compose(state)  # ConfigError: the caller's, as for a file
    return FleetStart(clients, state, composed.config, composed.registered, args.etcd_cache)


def _from_cache(args: argparse.Namespace, clients: tuple[Client, ...], prefix: bytes,
                exc: EtcdError) -> FleetStart:
    if args.etcd_cache is None:
        raise FleetStartError(f"etcd: {exc}; no --etcd-cache to start from",
                              EXIT_UNAVAILABLE)
    try:
        revision, config = load_cache(args.etcd_cache)
    except ConfigError as cache_exc:
        raise FleetStartError(f"etcd: {exc}; and the cache: {cache_exc}",
                              EXIT_UNAVAILABLE) from None
    return FleetStart(clients, FleetState(prefix, revision), config, 0, args.etcd_cache,
                      from_cache=str(exc))


class CacheWriter:
    """Writes the cache on a short-lived thread per applied config: the
    loop never waits for a disk.  A write older than one done is skipped."""

    def __init__(self, path: str) -> None:
        self.path = path
        self._lock = threading.Lock()
        self._written = -1

    def save(self, revision: int, config: Config) -> None:
        threading.Thread(target=self._write, args=(revision, config),
                         name="rawproxy-etcd-cache").start()

    def _write(self, revision: int, config: Config) -> None:
        with self._lock:
            if revision <= self._written:
                return
            try:
                save_cache(self.path, revision, config)
            except OSError as exc:
                log.warning("etcd: cannot write the cache %s: %s", self.path,
                            exc.strerror or exc)
                return
            self._written = revision


class EtcdReloader(Reloader):
    """The loop side of ``--etcd`` (see the module docstring)."""

    def __init__(self, loop: EventLoop, server: Server, fleet: FleetStart) -> None:
        super().__init__(loop, server, EtcdConfigSource(fleet.clients, fleet.state.prefix,
                                                        fleet.clients[0].timeout_s))
        self._reports: Deque[Report] = collections.deque()
        self._watcher = Watcher(fleet.clients, fleet.state, self._hand_off,
                                read_first=bool(fleet.from_cache))
        self._cache = CacheWriter(fleet.cache_path) if fleet.cache_path else None
        self._last_ok = True
        stats = server.stats
        stats.config_revision = fleet.state.revision
        stats.etcd_connected = not fleet.from_cache
        if fleet.from_cache:
            log.warning("etcd: %s; serving the cached config from %s (revision %d)",
                        fleet.from_cache, fleet.cache_path, fleet.state.revision)
        else:
            log.info("etcd revision %d: %d apps, %d registered targets",
                     fleet.state.revision, len(fleet.config.apps), fleet.registered)
            if self._cache is not None:
                self._cache.save(fleet.state.revision, fleet.config)

    def watch(self) -> None:
        self._watcher.start()

    def close(self) -> None:
        self._watcher.close()

    def reload(self, trigger: str) -> bool:
        """Never blocks the loop: the watch thread reads, the loop applies."""
        log.info("%s: reading the config from etcd again", trigger)
        self._watcher.reread()
        return True

    def _hand_off(self, report: Report) -> None:
        """On the watch thread."""
        self._reports.append(report)  # deque.append is atomic under the GIL
        self._loop.call_soon_threadsafe(self._take_reports)

    def _take_reports(self) -> None:
        reports: list[Report] = []
        while self._reports:
            reports.append(self._reports.popleft())
        newest = max((i for i, r in enumerate(reports) if isinstance(r, Applied)), default=-1)
        stats = self._server.stats
        for index, report in enumerate(reports):
            if isinstance(report, Applied):
                if index == newest:  # a burst: only its newest config is served
                    self._apply_revision(report)
            elif isinstance(report, Rejected):
                self.reject(report.trigger, report.error)
            elif isinstance(report, Unchanged):
                if self._last_ok and report.revision > (stats.config_revision or 0):
                    stats.config_revision = report.revision
            elif isinstance(report, Link):
                stats.etcd_connected = report.connected
                stats.etcd_watch_restarts += report.restarted

    def _apply_revision(self, report: Applied) -> None:
        composed = report.composed
        self._last_ok = self.apply(composed.config, report.trigger)
        if not self._last_ok:
            return
        self._server.stats.config_revision = report.revision
        log.info("%s applied: %d apps, %d registered targets", report.trigger,
                 len(composed.config.apps), composed.registered)
        for line in composed.skipped:
            log.warning("etcd revision %d: registration left out: %s", report.revision, line)
        if self._cache is not None:
            self._cache.save(report.revision, composed.config)


@dataclass(frozen=True)
class EtcdConfigSource:
    """A :class:`~rawproxy.config.ConfigSource` reading etcd afresh, blocking,
    on each ``load()``: what the base Reloader would call, which the loop
    never does (EtcdReloader.reload hands the read to the watch thread)."""

    clients: tuple[Client, ...]
    prefix: bytes
    timeout_s: float

    def load(self) -> Config:
        try:
            return compose(initial_read(self.clients, self.prefix, self.timeout_s)).config
        except EtcdError as exc:
            raise ConfigError(f"etcd: {exc}") from None
