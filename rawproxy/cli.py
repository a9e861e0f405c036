"""Command line: parse options, load the config, run the server, exit.

``main(argv) -> int`` builds everything and is the only place that
configures logging or installs signal handlers.  Exit codes (SPEC 3):
0 clean shutdown, 1 a port could not be bound, 2 invalid config or usage.
Bad input never produces a traceback: one line on stderr instead.
"""

from __future__ import annotations

import argparse
import ipaddress
import logging
import signal
import socket
import sys
from typing import Callable, NoReturn, Optional, Sequence

from . import __version__, metrics, views
from .admin import AdminHandlers, AdminServer
from .adminsock import UNIX_PREFIX, AdminAddress, TokenError, read_token_file
from .config import (MAX_TIMEOUT_S, Config, ConfigError, FileConfigSource, format_summary,
                     parse_config)
from .control import SharingReloader, WorkerControl
from .counters import SharedCounters
from .fleetsource import EtcdReloader, FleetStart, FleetStartError, add_arguments, start_fleet
from .listeners import BindError
from .lifecycle import Lifecycle
from .logformat import configure_logging
from .logsink import SinkHandler
from .loop import EventLoop
from .pipes import splice_available
from .privileges import PrivilegeError, drop_privileges, lookup_identity, raise_fd_limit
from .reloader import Reloader
from .resolver import Resolver
from .server import Server
from .supervisor import Supervisor

PROG = "rawproxy"
EXIT_OK = 0
EXIT_BIND = 1
EXIT_USAGE = 2

log = logging.getLogger("rawproxy")


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        # One line, like every other error, instead of argparse's usage dump.
        self.exit(EXIT_USAGE, f"{PROG}: error: {message} (see --help)\n")


def _seconds(text: str, low_exclusive: bool) -> float:
    # Bounded like the config's timeouts: a timer past ~24.8 days overflows
    # epoll's int of milliseconds (issue #18), and NaN compares false to all.
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of seconds") from None
    in_range = 0 < value if low_exclusive else 0 <= value
    if not (in_range and value <= MAX_TIMEOUT_S):
        low = "> 0" if low_exclusive else ">= 0"
        raise argparse.ArgumentTypeError(
            f"{text!r} must be a number {low} and at most {MAX_TIMEOUT_S:g} (7 days)")
    return value


def _drain_seconds(text: str) -> float:
    return _seconds(text, low_exclusive=False)  # 0: close open connections at once


def _half_open_seconds(text: str) -> float:
    # 0 would cut a half-closed connection before its answer could arrive.
    return _seconds(text, low_exclusive=True)


def _ascii_int(text: str) -> Optional[int]:
    """``text`` as a plain decimal (str.isdigit() also takes '²' and '٣')."""
    return int(text) if text.isascii() and text.isdigit() else None


def _worker_count(text: str) -> int:
    count = _ascii_int(text)
    if count is None or not 1 <= count <= 256:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of workers (1-256)")
    return count


def _connection_limit(text: str) -> int:
    limit = _ascii_int(text)
    if limit is None or limit < 1:
        raise argparse.ArgumentTypeError(f"{text!r} is not a connection limit (an integer >= 1)")
    return limit


def _ip_literal(text: str) -> str:
    # Listeners bind numerically (AI_NUMERICHOST): a name would only fail
    # later, or, for idna-invalid text, raise UnicodeError at the bind.
    try:
        ipaddress.ip_address(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an IP address") from None
    return text


def _host_port(text: str) -> tuple[str, int]:
    host, sep, port_text = text.rpartition(":")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    port = _ascii_int(port_text)
    if not sep or not host or port is None or port > 65535:
        raise argparse.ArgumentTypeError(f"{text!r} is not HOST:PORT (port 0-65535)")
    return _ip_literal(host), port


def _admin_address(text: str) -> AdminAddress:
    if text.startswith(UNIX_PREFIX):
        try:
            return AdminAddress.parse_unix(text)
        except ValueError as exc:
            raise argparse.ArgumentTypeError(str(exc)) from None
    host, port = _host_port(text)
    return AdminAddress(host, port)


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog=PROG,
        description="A raw TCP proxy and load balancer: listens on every port of "
                    "every app in the config and relays each connection to one of "
                    "that app's targets, with weighted random choice and failover.",
        epilog="Exit status: 0 clean shutdown, 1 a port could not be bound (or no etcd "
               "endpoint answered and no --etcd-cache), 2 invalid config or usage. "
               "Signals: SIGHUP reloads the config (from etcd under --etcd); "
               "SIGTERM/SIGINT drain then exit (a second one exits at once); SIGUSR2 "
               "starts the program on disk again, hands it the listening sockets, then "
               "drains (an upgrade with no connection refused).",
    )
    parser.add_argument("-c", "--config", metavar="PATH",
                        help="config file (default: config.json in the working directory; "
                             "not with --etcd)")
    parser.add_argument("--listen-host", type=_ip_literal, default="0.0.0.0", metavar="HOST",
                        help="IP address every app port binds to (default: 0.0.0.0)")
    parser.add_argument("--admin", type=_admin_address, metavar="HOST:PORT|unix:PATH",
                        help="serve the status page (/), /healthz, /metrics and /config "
                             "over HTTP here, or on a unix socket (mode 0600) with "
                             "unix:PATH (off unless given; meant for loopback or a "
                             "private network)")
    parser.add_argument("--admin-token-file", metavar="FILE",
                        help="every admin path but /healthz then needs "
                             "'Authorization: Bearer TOKEN', TOKEN being this file's "
                             "contents without surrounding whitespace")
    parser.add_argument("--watch", action="store_true",
                        help="also reload when the config file changes on disk "
                             "(polled once a second)")
    parser.add_argument("--drain-timeout", type=_drain_seconds, default=30.0,
                        metavar="SECONDS",
                        help="how long SIGTERM/SIGINT wait for open connections "
                             "(default: 30; at most 7 days)")
    parser.add_argument("--half-open-timeout", type=_half_open_seconds, default=60.0,
                        metavar="SECONDS",
                        help="close a connection whose one direction has ended and on "
                             "which no bytes moved for this long, unless its app sets "
                             "IdleTimeout (default: 60; at most 7 days)")
    parser.add_argument("--workers", type=_worker_count, default=1, metavar="N",
                        help="run N proxy processes sharing the ports (SO_REUSEPORT), "
                             "one event loop each, under a supervisor that restarts them "
                             "(default: 1, a single process)")
    parser.add_argument("--max-connections", type=_connection_limit, metavar="N",
                        help="at N open connections, all apps together, every port stops "
                             "accepting (clients wait in the kernel's backlog, they are not "
                             "refused) until one closes; with --workers, all workers "
                             "together (default: unlimited)")
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
    add_arguments(parser)  # --etcd*
    parser.add_argument("--version", action="version", version=f"{PROG} {__version__}")
    return parser


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
    if args.config is not None and args.etcd is not None:
        _error("--config and --etcd cannot be used together: under --etcd the config "
               "comes from etcd")
        return EXIT_USAGE
    source = FileConfigSource("config.json" if args.config is None else args.config)
    try:
        args.fleet = start_fleet(args)  # --etcd: etcd (or its cache) instead of the file
        config = source.load() if args.fleet is None else args.fleet.config
    except (ConfigError, FleetStartError) as exc:
        _error(str(exc))
        return exc.code if isinstance(exc, FleetStartError) else EXIT_USAGE
    args.admin_token = None
    if args.admin_token_file is not None:
        if args.admin is None:
            _error("--admin-token-file needs --admin")
            return EXIT_USAGE
        try:
            args.admin_token = read_token_file(args.admin_token_file)
        except TokenError as exc:
            _error(str(exc))
            return EXIT_USAGE
    try:  # under --check too: the names must exist (root is not needed to check)
        identity = lookup_identity(args.user, args.group, need_root=not args.check)
    except PrivilegeError as exc:
        _error(str(exc))
        return EXIT_USAGE
    if args.check:
        print(format_summary(config))
        return EXIT_OK
    handler = configure_logging(args.log_level, args.log_format)
    try:
        return _run(args, source, config, identity, handler)
    finally:
        handler.close()


def _run(args: argparse.Namespace, source: FileConfigSource, config: Config,
         identity: Optional[tuple[int, int]], handler: SinkHandler) -> int:
    log.info("rawproxy %s, file descriptor limit %d", __version__, raise_fd_limit())
    life = Lifecycle.from_environment()  # systemd's sockets, or an upgrade's
    if args.workers > 1:
        def worker_main(index: int, control: socket.socket, accepted: Optional[str]) -> int:
            # A restarted worker serves what its siblings serve: the last
            # config a worker accepted (not the file, which may have been
            # edited, even badly, since), else the start-up one.
            current = config
            if accepted is not None:
                try:
                    current = parse_config(accepted, source.path)
                except ConfigError as exc:
                    log.warning("worker %d starts with the start-up config: %s", index, exc)
            return _serve(args, source, current, identity, handler, life, (index, control))

        # Before the first fork: every worker counts open connections in it,
        # so MaxConnections and Concurrency hold for the process as a whole.
        args.counters = SharedCounters(args.workers)
        try:
            return Supervisor(args.workers, worker_main, args.admin,
                              admin_token=args.admin_token, life=life,
                              on_worker_exit=args.counters.clear_worker).run()
        finally:
            args.counters.close()
    return _serve(args, source, config, identity, handler, life)


class _Exit(Exception):
    """A start-up step failed and said why; the process exits with ``code``."""

    def __init__(self, code: int) -> None:
        super().__init__(code)
        self.code = code


def _serve(args: argparse.Namespace, source: FileConfigSource, config: Config,
           identity: Optional[tuple[int, int]], handler: SinkHandler, life: Lifecycle,
           worker: Optional[tuple[int, socket.socket]] = None) -> int:
    """Run one proxy process; ``worker`` is (index, control socket) under --workers."""
    loop = EventLoop()
    resolver = Resolver(loop.call_soon_threadsafe)
    server = _build_server(args, config, loop, resolver, worker)
    server.listeners.inherited = life.sockets
    closers: list[Callable[[], None]] = [life.close]
    try:
        reloader: Reloader
        control = None
        if worker is not None:
            reloader, control = _worker_control(loop, server, source, handler, worker,
                                                args.drain_timeout, args.fleet)
            closers.append(control.close)
        else:
            reloader = (Reloader(loop, server, source) if args.fleet is None
                        else EtcdReloader(loop, server, args.fleet))
            # Handlers first: once "ready" is logged, a signal must drain, not kill.
            _install_signal_handlers(loop, *life.notifying(*_stop_and_reload(
                server, reloader, args.drain_timeout)))
        admin = None
        if worker is None and args.admin is not None:
            admin = _start_admin(loop, server, handler, args.admin, args.admin_token, life)
            closers.append(admin.close)
        if worker is None:  # SIGUSR2 (a worker's supervisor takes it)
            life.enable_single_process_upgrade(server, admin, args.drain_timeout)
        closers.append(reloader.close)
        _start_listening(server, identity)
        life.serving()
        if args.watch or args.fleet is not None:
            reloader.watch()
        if control is not None:
            control.announce_ready()
        loop.run()
        log.info("stopped")
        return EXIT_OK
    except _Exit as exc:
        return exc.code
    finally:
        for close in reversed(closers):
            close()
        server.close()
        resolver.close()
        loop.close()


def _build_server(args: argparse.Namespace, config: Config, loop: EventLoop,
                  resolver: Resolver, worker: Optional[tuple[int, socket.socket]]) -> Server:
    splice = args.splice and splice_available()
    server = Server(config, loop, resolver, listen_host=args.listen_host,
                    half_open_timeout_s=args.half_open_timeout, splice=splice,
                    reuse_port=worker is not None, max_connections=args.max_connections,
                    counters=None if worker is None else args.counters.worker(worker[0]))
    log.info("relaying with %s", "splice (zero-copy)" if splice else "recv_into/send (copy)")
    return server


def _stop_and_reload(server: Server, reloader: Reloader, drain_timeout_s: float
                     ) -> tuple[Callable[[], None], Callable[[], None]]:
    """What SIGTERM/SIGINT and SIGHUP do; under --workers, the supervisor's
    ``stop`` and ``reload`` events (a worker ignores the signals themselves)."""
    def on_stop() -> None:
        if server.draining:
            log.info("second stop signal: exiting now")
            server.loop.stop()
        else:
            server.drain(drain_timeout_s)

    def on_reload() -> None:
        reloader.reload("SIGHUP")

    return on_stop, on_reload


def _install_signal_handlers(loop: EventLoop, on_stop: Callable[[], None],
                             on_reload: Callable[[], None]) -> None:
    loop.add_signal_handler(signal.SIGTERM, on_stop)
    loop.add_signal_handler(signal.SIGINT, on_stop)
    loop.add_signal_handler(signal.SIGHUP, on_reload)


def _metrics_text(server: Server, handler: SinkHandler,
                  labels: tuple[tuple[str, str], ...] = ()) -> str:
    snap = views.metrics_snapshot(server)
    snap.log_lines_dropped = handler.sink.dropped
    snap.counter_slots_used = server.router.counters.shared.slots_used
    return metrics.render(snap, labels)


def _worker_control(loop: EventLoop, server: Server, source: FileConfigSource,
                    handler: SinkHandler, worker: tuple[int, socket.socket],
                    drain_timeout_s: float, fleet: Optional[FleetStart]
                    ) -> tuple[Reloader, WorkerControl]:
    """Under --workers: answer the supervisor, take its stop and reload
    events, share passive health and each config accepted."""
    index, sock = worker
    labels = (("worker", str(index)),)
    reloader = (SharingReloader(loop, server, source, lambda config: control.share_config(config))
                if fleet is None else EtcdReloader(loop, server, fleet))
    on_stop, on_reload = _stop_and_reload(server, reloader, drain_timeout_s)
    control = WorkerControl(
        loop, sock, index, metrics_text=lambda: _metrics_text(server, handler, labels),
        config_view=lambda: views.config_view(server), on_stop=on_stop, on_reload=on_reload,
        on_orphaned=lambda: server.drain(drain_timeout_s),
        on_shared_health=server.apply_shared_health,
        listening=lambda: [listener.fd for listener in server.listeners.by_port.values()])
    server.on_health_change = control.share_health
    return reloader, control


def _start_admin(loop: EventLoop, server: Server, handler: SinkHandler,
                 address: AdminAddress, token: Optional[str], life: Lifecycle) -> AdminServer:
    handlers = AdminHandlers(lambda: server.draining,
                             lambda: _metrics_text(server, handler),
                             lambda: views.config_view(server))
    admin = AdminServer(loop, handlers, address, token=token,
                        sock=life.sockets.take_admin(address.host, address.port, address.path))
    try:
        admin.start()
    except OSError as exc:
        _error(f"cannot listen on {address} (admin endpoint): {exc.strerror or exc}")
        raise _Exit(EXIT_BIND) from None
    return admin


def _start_listening(server: Server, identity: Optional[tuple[int, int]]) -> None:
    """Bind every port, then drop root if asked to."""
    try:
        server.start()
    except BindError as exc:
        _error(str(exc))
        raise _Exit(EXIT_BIND) from None
    if identity is not None:
        try:
            drop_privileges(*identity)
        except (PrivilegeError, OSError) as exc:
            _error(f"cannot drop privileges: {exc}")
            raise _Exit(EXIT_BIND) from None
        log.info("running as uid %d, gid %d", *identity)
