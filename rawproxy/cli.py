"""Command line: parse options, load the config, run the server, exit.

``main(argv) -> int`` builds everything and is the only place that
configures logging or installs signal handlers.  Exit codes (SPEC 3):
0 clean shutdown, 1 a port could not be bound, 2 invalid config or usage.
Bad input never produces a traceback: one line on stderr instead.
"""

from __future__ import annotations

import argparse
import logging
import signal
import sys
from typing import NoReturn, Optional, Sequence

from . import __version__
from .config import Config, ConfigError, FileConfigSource, format_summary
from .loop import EventLoop
from .resolver import Resolver
from .server import BindError, Server

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


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog=PROG,
        description="A raw TCP proxy and load balancer: listens on every port of "
                    "every app in the config and relays each connection to one of "
                    "that app's targets, with weighted random choice and failover.",
        epilog="Exit status: 0 clean shutdown, 1 a port could not be bound, "
               "2 invalid config or usage. Signals: SIGTERM/SIGINT drain then exit "
               "(a second one exits at once).",
    )
    parser.add_argument("-c", "--config", default="config.json", metavar="PATH",
                        help="config file (default: config.json in the working directory)")
    parser.add_argument("--listen-host", default="0.0.0.0", metavar="HOST",
                        help="address every app port binds to (default: 0.0.0.0)")
    parser.add_argument("--drain-timeout", type=_positive_seconds, default=30.0,
                        metavar="SECONDS",
                        help="how long SIGTERM/SIGINT wait for open connections (default: 30)")
    parser.add_argument("--log-level", default="info",
                        choices=("debug", "info", "warning", "error"),
                        help="log level (default: info)")
    parser.add_argument("--check", action="store_true",
                        help="validate the config, print a summary and exit "
                             "0 (valid) or 2 (invalid); binds nothing")
    parser.add_argument("--version", action="version", version=f"{PROG} {__version__}")
    return parser


class _OneLineFormatter(logging.Formatter):
    """One event a line, tracebacks included (folded with ' | ')."""

    def format(self, record: logging.LogRecord) -> str:
        return super().format(record).replace("\n", " | ")


def _configure_logging(level: str) -> logging.Handler:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(_OneLineFormatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger("rawproxy")
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    root.propagate = False
    return handler


def _error(message: str) -> None:
    print(f"{PROG}: error: {message}", file=sys.stderr, flush=True)


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
    _configure_logging(args.log_level)
    return _serve(args, config)


def _serve(args: argparse.Namespace, config: Config) -> int:
    loop = EventLoop()
    resolver = Resolver(loop.call_soon_threadsafe)
    server = Server(config, loop, resolver, listen_host=args.listen_host)

    def on_stop_signal() -> None:
        if server.draining:
            log.info("second stop signal: exiting now")
            loop.stop()
        else:
            server.drain(args.drain_timeout)

    try:
        # Handlers first: once "ready" is logged, a signal must drain, not kill.
        loop.add_signal_handler(signal.SIGTERM, on_stop_signal)
        loop.add_signal_handler(signal.SIGINT, on_stop_signal)
        try:
            server.start()
        except BindError as exc:
            _error(str(exc))
            return EXIT_BIND
        loop.run()
        log.info("stopped")
        return EXIT_OK
    finally:
        server.close()
        resolver.close()
        loop.close()
