"""Command line: ``python3 -m probe [--local] [options]``; ``main(argv) -> int``.

Exit status: 0 every check passed, 1 something failed (or local mode could
not start), 2 bad usage or an unreadable config, 128 + the signal's number
when stopped by a signal: 130 SIGINT (Ctrl-C), 143 SIGTERM, 129 SIGHUP.  A
stop signal at any moment stops everything the probe started before it
exits (probe.stopsignals), also where SIGINT was inherited ignored.  The
report goes to stdout (text, or JSON with ``--json``); a live one-line
progress display is shown only when stdout is a terminal and not JSON.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import signal
import sys
import threading
from pathlib import Path
from typing import Callable, Iterator, NoReturn, Optional, Sequence

from .checks import Options, Planner, Progress
from .config import ConfigError, load
from .local import LocalError
from .report import render, to_json
from .scenario import run_local, run_remote
from .stopsignals import Interrupted, StopSignals

PROG = "probe"
LAUNCHER = Path(__file__).resolve().parent.parent / "rawproxy.py"


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{PROG}: error: {message} (see --help)\n")


def _number(kind: Callable[[str], float], low: float, high: float = float("inf")
            ) -> Callable[[str], float]:
    def parse(text: str) -> float:
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
        if not low <= value <= high:
            raise argparse.ArgumentTypeError(f"{text!r} is out of range")
        return value
    return parse


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog=PROG, description="Check every port of every app of a rawproxy config: "
                "framed payloads are sent through the proxy and their echo is verified.")
    p.add_argument("-c", "--config", default="config.json", metavar="PATH",
                   help="rawproxy config (default: config.json)")
    p.add_argument("--host", help="where the proxy listens (default: 127.0.0.1)")
    p.add_argument("--local", action="store_true",
                   help="start echo backends and rawproxy on them locally, then check")
    p.add_argument("--down", action="append", default=[], metavar="HOST:PORT",
                   help="local mode: this target gets a port with nothing listening "
                        "(repeatable)")
    p.add_argument("--proxy", type=Path, default=LAUNCHER, metavar="PATH",
                   help=f"local mode: rawproxy launcher (default: {LAUNCHER})")
    p.add_argument("--connections", type=_number(int, 1, 10_000), default=4, metavar="N",
                   help="concurrent connections per port (default: 4)")
    p.add_argument("--frames", type=_number(int, 1, 1_000_000), default=8, metavar="N",
                   help="frames per connection (default: 8)")
    p.add_argument("--max-frame", type=_number(int, 1, 2**31), default=1 << 20,
                   metavar="BYTES", help="the big frame each port's first connection "
                                         "sends (default: 1048576)")
    p.add_argument("--duration", type=_number(float, 0.001), metavar="SECONDS",
                   help="load mode: keep opening connections for this long")
    p.add_argument("--timeout", type=_number(float, 0.001), default=5.0, metavar="SECONDS",
                   help="a connection with no byte moving this long is stalled (default: 5)")
    p.add_argument("--seed", type=int, help="seed for stream ids and frame sizes")
    p.add_argument("--json", action="store_true", help="write the report as JSON")
    return p


@contextlib.contextmanager
def _live(progress: Progress, enabled: bool) -> Iterator[None]:
    """Redraws the progress line every 0.2 s until the block ends."""
    if not enabled:
        yield
        return
    stop = threading.Event()

    def draw() -> None:
        while not stop.wait(0.2):
            sys.stdout.write(f"\r\033[Kprobe: {progress.line()}")
            sys.stdout.flush()

    thread = threading.Thread(target=draw, name="probe-progress", daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join(1)
        sys.stdout.write("\r\033[K")
        sys.stdout.flush()


def main(argv: Optional[Sequence[str]] = None) -> int:
    signals = StopSignals()
    with signals.installed():
        try:
            return _run(argv, signals)
        except KeyboardInterrupt as exc:
            # The one interrupt of the run (later signals only hurry the
            # cleanup): whatever a cut ``finally`` did not stop, stop now.
            signals.stop_all()
            stopped = exc if isinstance(exc, Interrupted) else Interrupted(signal.SIGINT)
            print(f"{PROG}: interrupted ({stopped.name}); everything it started is stopped",
                  file=sys.stderr)
            return stopped.exit_code


def _run(argv: Optional[Sequence[str]], signals: StopSignals) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.local and args.host:
        parser.error("--host does not apply to --local (it always uses 127.0.0.1)")
    if args.down and not args.local:
        parser.error("--down needs --local")
    try:
        apps, raw = load(Path(args.config))
    except ConfigError as exc:
        print(f"{PROG}: error: {exc}", file=sys.stderr)
        return 2
    unknown = set(args.down) - {t for app in apps for t in app.targets}
    if unknown:
        parser.error(f"--down {sorted(unknown)[0]} is not a target in {args.config}")
    options = Options(int(args.connections), int(args.frames), int(args.max_frame),
                      args.timeout, args.duration)
    planner, progress = Planner(args.seed), Progress()
    try:
        with _live(progress, sys.stdout.isatty() and not args.json):
            if args.local:
                report = run_local(apps, raw, frozenset(args.down), args.proxy, options,
                                   planner, progress, signals)
            else:
                report = run_remote(apps, args.host or "127.0.0.1", options, planner,
                                    progress)
    except LocalError as exc:
        print(f"{PROG}: error: {exc}", file=sys.stderr)
        return 1
    print(json.dumps(to_json(report), indent=2) if args.json else render(report))
    return 0 if report.ok else 1
