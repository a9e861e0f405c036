"""Where rawproxy's CPU goes per connection or per request: cProfile over a fixed load.

``python -m benchmarks.hotspots [--workload churn|reqresp]`` (``make
bench-hotspots``) starts the echo backend and rawproxy (pinned to CPU 0),
warms it up, then profiles its loop thread with ``cProfile`` on the thread's
CPU clock (a real-time signal turns the profiler on, and off again) while a fixed
amount of work goes through it from this process (CPU 1), and counts the
garbage collector's collections meanwhile (``gc.callbacks``).  It prints the
functions with the most own time, each with its calls per unit of work and
its share of the loop thread's CPU.  The proxy's CPU per unit (user +
system, every thread, from ``/proc``) is printed too, but the profiler
slows each Python call down: read the shares and the call counts, which
are exact, and take absolute times from ``make bench``.

* ``churn``: ``--units`` connect/echo/close cycles, ``--concurrency`` at a
  time (the unit is a connection);
* ``reqresp``: ``--concurrency`` connections, each sending 16 bytes and
  reading the echo, ``--units`` round trips in all (the unit is a request).
"""

from __future__ import annotations

import argparse
import cProfile
import gc
import json
import os
import pstats
import shlex
import shutil
import signal
import socket
import sys
import tempfile
import threading
import time
from pathlib import Path
from types import FrameType
from typing import Callable, Optional, Sequence

if __package__ in (None, ""):  # run as a file: python benchmarks/hotspots.py
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks import procs  # noqa: E402
from benchmarks.backends import Backends  # noqa: E402
from benchmarks.syscalls import PAYLOAD, cycles, in_threads  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
# Turns the profiler on, then off (rawproxy uses SIGHUP, SIGTERM, SIGUSR2...).
TOGGLE = int(signal.SIGRTMIN) + 3


def _rawproxy_argv(workdir: Path, port: int, target: int, prof: Path,
                   extra: Sequence[str]) -> list[str]:
    config = workdir / "rawproxy.json"
    config.write_text('{"Apps": [{"Name": "bench", "Ports": [%d], "Targets": ["127.0.0.1:%d"]}]}'
                      % (port, target))
    return [sys.executable, "-m", "benchmarks.hotspots", "--child", str(prof), "--",
            "--config", str(config), "--listen-host", "127.0.0.1", "--log-level", "warning",
            "--drain-timeout", "2", *extra]


class GcTally:
    """The garbage collector's collections and their CPU time, by generation
    (``gc.callbacks``; the thread's CPU clock, as the profile's)."""

    def __init__(self) -> None:
        self.counting = False
        self.collections = [0, 0, 0]
        self.seconds = [0.0, 0.0, 0.0]
        self._started = 0.0

    def on_gc(self, phase: str, info: dict[str, int]) -> None:
        if not self.counting:
            return
        if phase == "start":
            self._started = time.thread_time()
            return
        generation = info["generation"]
        self.collections[generation] += 1
        self.seconds[generation] += time.thread_time() - self._started


def gc_path(prof: Path) -> Path:
    return prof.with_suffix(".gc.json")


def run_child(prof: Path, proxy_args: Sequence[str]) -> int:
    """In the proxy's process: rawproxy's main, profiled between two TOGGLE signals."""
    sys.path.insert(0, str(ROOT))
    from rawproxy.cli import main as rawproxy_main

    profiler = cProfile.Profile(time.thread_time)
    state = {"on": False}
    tally = GcTally()
    gc.callbacks.append(tally.on_gc)

    def toggle(signum: int, frame: Optional[FrameType]) -> None:
        if state["on"]:
            profiler.disable()
            tally.counting = False
            gc_path(prof).write_text(json.dumps({"collections": tally.collections,
                                                 "seconds": tally.seconds}))
            profiler.dump_stats(str(prof))  # last: the parent waits for this file
        else:
            tally.counting = True
            profiler.enable()
        state["on"] = not state["on"]

    signal.signal(TOGGLE, toggle)
    return rawproxy_main(list(proxy_args))


def _round_trips(port: int, count: int) -> None:
    with socket.create_connection(("127.0.0.1", port), timeout=10.0) as sock:
        for _ in range(count):
            sock.sendall(PAYLOAD)
            got = 0
            while got < len(PAYLOAD):
                chunk = sock.recv(len(PAYLOAD) - got)
                if not chunk:
                    raise OSError("echo cut short")
                got += len(chunk)


def drive(workload: str, port: int, units: int, concurrency: int) -> None:
    if workload == "churn":
        in_threads(concurrency, units, lambda n: cycles(port, n))
    else:
        in_threads(concurrency, units, lambda n: _round_trips(port, n))


def _module(path: str, name: str) -> str:
    """Where a function's own time is charged: its file, or the kind of C call."""
    if path == "~":
        if "epoll" in name or "select" in name:
            return "(C) epoll"
        if "splice" in name or "socket" in name or "posix" in name or "_socket" in name:
            return "(C) socket calls"
        return "(C) other builtins"
    return Path(path).name


def report(prof: Path, units: int, unit: str, top: int) -> str:
    stats = pstats.Stats(str(prof))
    entries = stats.stats  # type: ignore[attr-defined]
    total = sum(v[2] for v in entries.values()) or 1.0
    by_module: dict[str, float] = {}
    for (path, _, name), value in entries.items():
        key = _module(path, name)
        by_module[key] = by_module.get(key, 0.0) + value[2]
    calls = sum(v[1] for v in entries.values())
    lines = [f"profiled CPU of the loop thread: {total * 1e6 / units:.1f} us/{unit}; "
             f"{calls / units:.1f} function calls/{unit} (Python and C, exact)",
             f"{'own %':>6} {'own us/' + unit:>12}  module"]
    for key, own in sorted(by_module.items(), key=lambda kv: -kv[1])[:16]:
        lines.append(f"{100 * own / total:6.1f} {own * 1e6 / units:12.2f}  {key}")
    rows = sorted(entries.items(), key=lambda kv: -kv[1][2])[:top]
    lines.append("")
    lines.append(f"{'own %':>6} {'calls/' + unit:>12} {'own us/' + unit:>12}  function")
    for (path, line, name), (_, ncalls, tottime, _, _) in rows:
        where = f"{Path(path).name}:{line}" if line else path
        lines.append(f"{100 * tottime / total:6.1f} {ncalls / units:12.2f} "
                     f"{tottime * 1e6 / units:12.2f}  {name} ({where})")
    return "\n".join(lines)


def _wait_for(condition: Callable[[], bool], timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            raise procs.BenchError("the profile was not written")
        time.sleep(0.05)


def main(argv: Optional[Sequence[str]] = None) -> int:
    if argv is None:
        argv = sys.argv[1:]
    if argv[:1] == ["--child"]:
        return run_child(Path(argv[1]), argv[3:])
    parser = argparse.ArgumentParser(prog="python -m benchmarks.hotspots",
                                     description=__doc__.splitlines()[0])
    parser.add_argument("--workload", choices=("churn", "reqresp"), default="churn")
    parser.add_argument("--units", type=int, default=5000)
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--top", type=int, default=30)
    parser.add_argument("--rawproxy-args", default="",
                        help="extra options for rawproxy (one shell-quoted string)")
    args = parser.parse_args(argv)
    if args.units < 1 or args.concurrency < 1:
        parser.error("--units and --concurrency must be positive")
    procs.pin_self(procs.LOAD_CPU)
    workdir = Path(tempfile.mkdtemp(prefix="rawproxy-hotspots-"))
    backends = Backends(workdir)
    prof = workdir / "rawproxy.prof"
    try:
        target = backends.port("echo")
        port = procs.free_port()
        argv_ = _rawproxy_argv(workdir, port, target, prof, shlex.split(args.rawproxy_args))
        proc = procs.Proc("rawproxy", procs.pinned(procs.PROXY_CPU, argv_),
                          workdir / "rawproxy.log", cwd=ROOT)
        try:
            proc.wait_listening([port])
            drive(args.workload, port, min(args.units, 200), args.concurrency)  # warm-up
            os.kill(proc.pid, TOGGLE)
            user0, sys0 = proc.cpu_times()
            started = time.monotonic()
            drive(args.workload, port, args.units, args.concurrency)
            wall = time.monotonic() - started
            user1, sys1 = proc.cpu_times()
            os.kill(proc.pid, TOGGLE)
            _wait_for(lambda: prof.exists() and prof.stat().st_size > 0, 30.0)
        except (OSError, procs.BenchError):
            print(f"rawproxy's log: {proc.log_tail(2000)}", file=sys.stderr)
            raise
        finally:
            proc.stop(timeout_s=30.0)
        unit = "conn" if args.workload == "churn" else "req"
        cpu_us = ((user1 - user0) + (sys1 - sys0)) * 1e6 / args.units
        print(f"{args.workload}: {args.units} {unit}s, {args.concurrency} at a time, "
              f"{wall:.1f} s; proxy CPU under cProfile {cpu_us:.1f} us/{unit} "
              f"(user {100 * (user1 - user0) / max(1e-9, (user1 - user0) + (sys1 - sys0)):.0f} %)")
        tally = json.loads(gc_path(prof).read_text())
        print(f"garbage collector: {'/'.join(str(n) for n in tally['collections'])} "
              f"collections (generations 0/1/2) in {args.units} {unit}s, "
              f"{sum(tally['seconds']) * 1e6 / args.units:.2f} us/{unit} of CPU")
        print(report(prof, args.units, unit, args.top))
    finally:
        backends.stop_all()
        shutil.rmtree(workdir, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
