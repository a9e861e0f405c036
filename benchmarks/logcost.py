"""What one access-log line costs, through rawproxy's sink or a plain StreamHandler.

``python -m benchmarks.logcost [--lines N] [--repeat R]`` (``make
bench-logcost``) logs N access-log-shaped lines at INFO each way in turn,
R times alternating, into a pipe that a child ``cat`` drains to /dev/null:
``logger.info`` through a StreamHandler, ``logger.info`` through
rawproxy's sink, and ``accesslog.log_access`` as the proxy calls it (the
record built, and its line put straight into the sink).  It prints the
median CPU time per line of the logging process (user + system, every
thread: the sink's writer included).  Each run is a fresh interpreter,
pinned to one CPU where ``taskset`` exists.
"""

from __future__ import annotations

import argparse
import logging
import resource
import shutil
import statistics
import subprocess
import sys
from pathlib import Path
from typing import Optional, Sequence

ROOT = Path(__file__).resolve().parent.parent
FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


def measure(kind: str, lines: int) -> float:
    """In this process: CPU microseconds per line logged through ``kind``."""
    sys.path.insert(0, str(ROOT))
    from rawproxy.logsink import LogSink, SinkHandler

    if kind == "access":
        return _measure_access(lines)
    handler: logging.Handler = (SinkHandler(LogSink(sys.stderr)) if kind == "sink"
                                else logging.StreamHandler(sys.stderr))
    handler.setFormatter(logging.Formatter(FORMAT))
    log = logging.getLogger("rawproxy.access")
    log.addHandler(handler)
    log.propagate = False
    log.setLevel(logging.INFO)
    before = resource.getrusage(resource.RUSAGE_SELF)
    for _ in range(lines):
        log.info("app=%s port=%d client=%s target=%s bytes_in=%d bytes_out=%d "
                 "duration_ms=%d end=%s", "bench", 21001, "127.0.0.1:55282",
                 "127.0.0.1:21000", 68, 233, 13, "done")
    handler.flush()
    handler.close()
    after = resource.getrusage(resource.RUSAGE_SELF)
    cpu_s = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return cpu_s / lines * 1e6


def _measure_access(lines: int) -> float:
    """``log_access`` with logging set up as ``cli`` sets it up (text format)."""
    from rawproxy.accesslog import log_access
    from rawproxy.logformat import configure_logging

    handler = configure_logging("info", "text")
    before = resource.getrusage(resource.RUSAGE_SELF)
    for _ in range(lines):
        log_access("bench", 21001, "127.0.0.1:55282", "127.0.0.1:21000", 68, 233, 13,
                   "done", "")
    handler.flush()
    handler.close()
    after = resource.getrusage(resource.RUSAGE_SELF)
    cpu_s = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return cpu_s / lines * 1e6


def run_child(kind: str, lines: int) -> float:
    argv = [sys.executable, "-m", "benchmarks.logcost", "--child", kind, "--lines", str(lines)]
    if shutil.which("taskset"):
        argv = ["taskset", "-c", "0", *argv]
    drain = subprocess.Popen(["cat"], stdin=subprocess.PIPE, stdout=subprocess.DEVNULL)
    try:
        done = subprocess.run(argv, cwd=ROOT, stdout=subprocess.PIPE, stderr=drain.stdin,
                              text=True, check=True, timeout=300)
    finally:
        assert drain.stdin is not None
        drain.stdin.close()
        drain.wait(10)
    return float(done.stdout.strip())


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.logcost",
                                     description=__doc__.splitlines()[0])
    parser.add_argument("--lines", type=int, default=100_000)
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--child", choices=("sink", "stream", "access"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        print(f"{measure(args.child, args.lines):.2f}")
        return 0
    results: dict[str, list[float]] = {"stream": [], "sink": [], "access": []}
    for _ in range(args.repeat):
        for kind in results:
            results[kind].append(run_child(kind, args.lines))
    print(f"CPU per access-log line, {args.lines} lines into a pipe drained by cat, "
          f"{args.repeat} runs each, alternating:")
    for kind, values in results.items():
        label = {"stream": "StreamHandler (blocking write)", "sink": "rawproxy's sink",
                 "access": "log_access, straight to the sink"}[kind]
        runs = " ".join(f"{v:.1f}" for v in values)
        print(f"  {label:<32} median {statistics.median(values):5.1f} us  (runs: {runs})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
