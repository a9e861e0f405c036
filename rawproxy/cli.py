"""Command line: parse options, load the config, run the server, exit.

``main(argv) -> int`` builds everything and is the only place that
configures logging or installs signal handlers.  Exit codes (SPEC 3):
0 clean shutdown, 1 a port could not be bound, 2 invalid config or usage.
Bad input never produces a traceback: one line on stderr instead.
"""

from __future__ import annotations

import argparse
import datetime
import json
import logging
import signal
import socket
import sys
from typing import NoReturn, Optional, Sequence

from . import __version__, metrics
from .admin import AdminHandlers, AdminServer
from .config import Config, ConfigError, FileConfigSource, format_summary
from .logsink import LogSink, SinkHandler
from .loop import EventLoop
from .pipes import splice_available
from .privileges import PrivilegeError, drop_privileges, lookup_identity, raise_fd_limit
from .reloader import Reloader
from .resolver import Resolver
from .server import BindError, Server
from .supervisor import Supervisor, WorkerControl

PROG = "rawproxy"
EXIT_OK = 0
EXIT_BIND = 1
EXIT_USAGE = 2

log = logging.getLogger("rawproxy")


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        # One line, like every other error, instead of argparse's usage dump.
        self.exit(EXIT_USAGE, f"{PROG}: error: {message} (see --help)\n")


def _positive_seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of seconds") from None
    if not value >= 0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"{text!r} must be a finite number >= 0")
    return value


def _worker_count(text: str) -> int:
    if not text.isdigit() or not 1 <= int(text) <= 256:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of workers (1-256)")
    return int(text)


def _host_port(text: str) -> tuple[str, int]:
    host, sep, port = text.rpartition(":")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    if not sep or not host or not port.isdigit() or int(port) > 65535:
        raise argparse.ArgumentTypeError(f"{text!r} is not HOST:PORT (port 0-65535)")
    return host, int(port)


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog=PROG,
        description="A raw TCP proxy and load balancer: listens on every port of "
                    "every app in the config and relays each connection to one of "
                    "that app's targets, with weighted random choice and failover.",
        epilog="Exit status: 0 clean shutdown, 1 a port could not be bound, "
               "2 invalid config or usage. Signals: SIGHUP reloads the config; "
               "SIGTERM/SIGINT drain then exit (a second one exits at once).",
    )
    parser.add_argument("-c", "--config", default="config.json", metavar="PATH",
                        help="config file (default: config.json in the working directory)")
    parser.add_argument("--listen-host", default="0.0.0.0", metavar="HOST",
                        help="address every app port binds to (default: 0.0.0.0)")
    parser.add_argument("--admin", type=_host_port, metavar="HOST:PORT",
                        help="serve /healthz, /metrics and /config over HTTP here "
                             "(off unless given; meant for loopback or a private network)")
    parser.add_argument("--watch", action="store_true",
                        help="also reload when the config file changes on disk "
                             "(polled once a second)")
    parser.add_argument("--drain-timeout", type=_positive_seconds, default=30.0,
                        metavar="SECONDS",
                        help="how long SIGTERM/SIGINT wait for open connections (default: 30)")
    parser.add_argument("--half-open-timeout", type=_positive_seconds, default=60.0,
                        metavar="SECONDS",
                        help="close a connection whose one direction has ended and on "
                             "which no bytes moved for this long, unless its app sets "
                             "IdleTimeout (default: 60)")
    parser.add_argument("--workers", type=_worker_count, default=1, metavar="N",
                        help="run N proxy processes sharing the ports (SO_REUSEPORT), "
                             "one event loop each, under a supervisor that restarts them "
                             "(default: 1, a single process)")
    parser.add_argument("--no-splice", dest="splice", action="store_false",
                        help="copy bytes through Python instead of the zero-copy "
                             "splice(2) path (used by default on Linux with Python 3.10+)")
    parser.add_argument("--user", metavar="NAME",
                        help="drop root privileges to this user after binding")
    parser.add_argument("--group", metavar="NAME",
                        help="and to this group (default: the user's primary group)")
    parser.add_argument("--log-level", default="info",
                        choices=("debug", "info", "warning", "error"),
                        help="log level (default: info)")
    parser.add_argument("--log-format", default="text", choices=("text", "json"),
                        help="access and event log format (default: text)")
    parser.add_argument("--check", action="store_true",
                        help="validate the config, print a summary and exit "
                             "0 (valid) or 2 (invalid); binds nothing")
    parser.add_argument("--version", action="version", version=f"{PROG} {__version__}")
    return parser


class _OneLineFormatter(logging.Formatter):
    """One event a line, tracebacks included (folded with ' | ')."""

    def format(self, record: logging.LogRecord) -> str:
        return super().format(record).replace("\n", " | ")


class _JsonFormatter(logging.Formatter):
    """One JSON object a line; access records carry their fields as keys."""

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, object] = {
            "time": datetime.datetime.fromtimestamp(
                record.created, datetime.timezone.utc).isoformat(timespec="milliseconds"),
            "level": record.levelname.lower(),
            "logger": record.name,
        }
        fields = getattr(record, "fields", None)
        if isinstance(fields, dict):
            entry.update(fields)
        else:
            entry["message"] = record.getMessage()
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry)


def _configure_logging(level: str, log_format: str) -> SinkHandler:
    # Lines go through a bounded queue and a writer thread: a stderr nobody
    # reads must not stop the loop (see logsink).
    handler = SinkHandler(LogSink(sys.stderr))
    if log_format == "json":
        handler.setFormatter(_JsonFormatter())
    else:
        handler.setFormatter(_OneLineFormatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger("rawproxy")
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    root.propagate = False
    return handler


def _error(message: str) -> None:
    line = f"{PROG}: error: {message}"
    for handler in logging.getLogger("rawproxy").handlers:
        if isinstance(handler, SinkHandler):
            # After the lines already queued, and never blocking on stderr.
            handler.sink.put(line)
            handler.flush()
            return
    print(line, file=sys.stderr, flush=True)


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    source = FileConfigSource(args.config)
    try:
        config = source.load()
    except ConfigError as exc:
        _error(str(exc))
        return EXIT_USAGE
    if args.check:
        print(format_summary(config))
        return EXIT_OK
    try:
        identity = lookup_identity(args.user, args.group)
    except PrivilegeError as exc:
        _error(str(exc))
        return EXIT_USAGE
    handler = _configure_logging(args.log_level, args.log_format)
    try:
        return _run(args, source, config, identity, handler)
    finally:
        handler.close()


def _run(args: argparse.Namespace, source: FileConfigSource, config: Config,
         identity: Optional[tuple[int, int]], handler: SinkHandler) -> int:
    log.info("rawproxy %s, file descriptor limit %d", __version__, raise_fd_limit())
    if args.workers > 1:
        def worker_main(index: int, control: socket.socket) -> int:
            # A worker restarted after a reload must serve the file as it is
            # now, like its siblings; if it became invalid, the last config
            # this process knows to be good.
            try:
                current = source.load()
            except ConfigError as exc:
                log.warning("worker %d starts with the previous config: %s", index, exc)
                current = config
            return _serve(args, source, current, identity, handler, (index, control))

        return Supervisor(args.workers, worker_main, args.admin).run()
    return _serve(args, source, config, identity, handler)


def _serve(args: argparse.Namespace, source: FileConfigSource, config: Config,
           identity: Optional[tuple[int, int]], handler: SinkHandler,
           worker: Optional[tuple[int, socket.socket]] = None) -> int:
    """Run one proxy process; ``worker`` is (index, control socket) under --workers."""
    loop = EventLoop()
    resolver = Resolver(loop.call_soon_threadsafe)
    splice = args.splice and splice_available()
    server = Server(config, loop, resolver, listen_host=args.listen_host,
                    half_open_timeout_s=args.half_open_timeout, splice=splice,
                    reuse_port=worker is not None)
    log.info("relaying with %s", "splice (zero-copy)" if splice else "recv_into/send (copy)")
    reloader = Reloader(loop, server, source)

    def snapshot() -> metrics.Snapshot:
        snap = server.metrics_snapshot()
        snap.log_lines_dropped = handler.sink.dropped
        return snap

    admin: Optional[AdminServer] = None
    control: Optional[WorkerControl] = None

    def on_stop_signal() -> None:
        if server.draining:
            log.info("second stop signal: exiting now")
            loop.stop()
        else:
            server.drain(args.drain_timeout)

    def on_reload_signal() -> None:
        reloader.reload("SIGHUP")

    try:
        # Handlers first: once "ready" is logged, a signal must drain, not kill.
        loop.add_signal_handler(signal.SIGTERM, on_stop_signal)
        loop.add_signal_handler(signal.SIGINT, on_stop_signal)
        loop.add_signal_handler(signal.SIGHUP, on_reload_signal)
        if worker is not None:
            labels = (("worker", str(worker[0])),)
            control = WorkerControl(
                loop, worker[1], worker[0],
                lambda: metrics.render(snapshot(), labels),
                server.config_view, lambda: server.drain(args.drain_timeout),
                server.apply_shared_health)
            server.on_health_change = control.share_health
        elif args.admin is not None:
            handlers = AdminHandlers(lambda: server.draining,
                                     lambda: metrics.render(snapshot()),
                                     server.config_view)
            admin = AdminServer(loop, handlers, *args.admin)
            try:
                admin.start()
            except OSError as exc:
                _error(f"cannot listen on {args.admin[0]}:{args.admin[1]} "
                       f"(admin endpoint): {exc.strerror or exc}")
                return EXIT_BIND
        try:
            server.start()
        except BindError as exc:
            _error(str(exc))
            return EXIT_BIND
        if identity is not None:
            try:
                drop_privileges(*identity)
            except (PrivilegeError, OSError) as exc:
                _error(f"cannot drop privileges: {exc}")
                return EXIT_BIND
            log.info("running as uid %d, gid %d", *identity)
        if args.watch:
            reloader.watch()
        if control is not None:
            control.announce_ready()
        loop.run()
        log.info("stopped")
        return EXIT_OK
    finally:
        if control is not None:
            control.close()
        if admin is not None:
            admin.close()
        server.close()
        resolver.close()
        loop.close()
