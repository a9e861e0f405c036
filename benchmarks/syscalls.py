"""System calls per proxied connection, counted by ``strace -c -f``.

``python -m benchmarks.syscalls`` (``make bench-syscalls``) starts the echo
backend and, for each peer in turn (rawproxy and HAProxy by default, where
installed), a fresh proxy pinned to CPU 0.  After a warm-up it attaches
``strace -c -f`` to the running proxy (every thread), makes N
connect/echo/close cycles through it from this process (CPU 1), detaches,
and divides each system call's count by N.  Start-up and shutdown are not
counted, and neither are clock reads (``clock_gettime`` and the like: HAProxy
makes them as real calls for its CPU-time accounting, CPython reads the
clock through the vDSO, which strace does not see).

One cycle: connect, send 16 bytes, read the 16 echoed, close.  Cycles run
one at a time by default (``--concurrency 1``): every event then costs its
own wake-up, so the count is the same from run to run, and the upper bound
of what batching can save.

    python -m benchmarks.syscalls                          # 2,000 cycles each
    python -m benchmarks.syscalls --peers rawproxy --connections 500
    python -m benchmarks.syscalls --rawproxy-args='--no-splice'

Exit status: 0 when every peer was counted, 1 when one failed, 2 for bad
options or no strace.
"""

from __future__ import annotations

import argparse
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Callable, Optional, Sequence

if __package__ in (None, ""):  # run as a file: python benchmarks/syscalls.py
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks import procs  # noqa: E402
from benchmarks.backends import Backends  # noqa: E402
from benchmarks.peers import PEERS, Peer, PeerContext  # noqa: E402
from benchmarks.report import write_json  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_JSON = ROOT / "benchmarks" / "results" / "syscalls.json"
PAYLOAD = b"0123456789abcdef"
WARMUP_CYCLES = 50
# Reads of the clock, left out of the count (see the module docstring).
CLOCK_CALLS = frozenset({"clock_gettime", "clock_getres", "gettimeofday", "time"})
ATTACH_TIMEOUT_S = 10.0

Counts = dict[str, int]


def parse_strace_summary(text: str) -> Counts:
    """Calls per system call from ``strace -c`` output (the ``total`` row dropped)."""
    counts: Counts = {}
    for line in text.splitlines():
        fields = line.split()
        if len(fields) not in (5, 6) or not fields[0][:1].isdigit():
            continue
        name = fields[-1]
        if name == "total":
            continue
        try:
            counts[name] = counts.get(name, 0) + int(fields[3])
        except ValueError:
            continue
    return counts


def per_connection(counts: Counts, connections: int) -> dict[str, float]:
    """Each call's count per connection, and ``total`` without clock reads."""
    out = {name: n / connections for name, n in sorted(counts.items())}
    out["total"] = sum(n for name, n in counts.items() if name not in CLOCK_CALLS) / connections
    return out


def cycle(port: int, timeout_s: float = 10.0) -> None:
    """One connect/echo/close through the proxy (raises OSError on a short echo)."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout_s) as sock:
        sock.sendall(PAYLOAD)
        got = b""
        while len(got) < len(PAYLOAD):
            chunk = sock.recv(len(PAYLOAD) - len(got))
            if not chunk:
                raise OSError(f"echo cut short after {len(got)} bytes")
            got += chunk
        if got != PAYLOAD:
            raise OSError("the echo came back changed")


def cycles(port: int, count: int) -> None:
    for _ in range(count):
        cycle(port)


def in_threads(concurrency: int, units: int, job: Callable[[int], None]) -> None:
    """``job(n)`` on ``concurrency`` threads, the ``units`` shared out;
    raises OSError if any of them failed."""
    shares = [units // concurrency + (1 if i < units % concurrency else 0)
              for i in range(concurrency)]
    errors: list[BaseException] = []

    def run(count: int) -> None:
        try:
            job(count)
        except BaseException as exc:  # reported below
            errors.append(exc)

    threads = [threading.Thread(target=run, args=(n,)) for n in shares]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    if errors:
        raise OSError(f"{len(errors)} client(s) failed: {errors[0]}")


def run_cycles(port: int, connections: int, concurrency: int) -> None:
    if concurrency <= 1:
        cycles(port, connections)
    else:
        in_threads(concurrency, connections, lambda n: cycles(port, n))


def _wait_attached(log: Path, strace: subprocess.Popen[bytes]) -> None:
    deadline = time.monotonic() + ATTACH_TIMEOUT_S
    while "attached" not in log.read_text(errors="replace"):
        if strace.poll() is not None or time.monotonic() > deadline:
            raise procs.BenchError(f"strace did not attach: {log.read_text(errors='replace')}")
        time.sleep(0.02)


def count_peer(peer: Peer, ctx: PeerContext, target: int, connections: int,
               concurrency: int, workdir: Path) -> Counts:
    port = procs.free_port()
    proc = peer.start(ctx, port, target)
    assert proc is not None
    try:
        run_cycles(port, WARMUP_CYCLES, 1)
        out = workdir / f"strace-{peer.name}.txt"
        log = workdir / f"strace-{peer.name}.log"
        with open(log, "wb") as log_file:
            strace = subprocess.Popen(["strace", "-c", "-f", "-p", str(proc.pid), "-o", str(out)],
                                      stdin=subprocess.DEVNULL, stdout=log_file,
                                      stderr=subprocess.STDOUT)
        try:
            _wait_attached(log, strace)
            run_cycles(port, connections, concurrency)
        finally:
            strace.send_signal(signal.SIGINT)
            strace.wait(30)
        return parse_strace_summary(out.read_text(errors="replace"))
    finally:
        proc.stop()


def render(results: dict[str, dict[str, float]]) -> str:
    names = list(results)
    calls = sorted({c for r in results.values() for c, v in r.items()
                    if c != "total" and v >= 0.005},
                   key=lambda c: (-max(r.get(c, 0.0) for r in results.values()), c))
    width = max([len("syscalls per connection")] + [len(c) for c in calls])
    lines = [f"{'syscalls per connection':<{width}} " + " ".join(f"{n:>9}" for n in names)]
    lines.append(f"{'total (no clock reads)':<{width}} "
                 + " ".join(f"{results[n]['total']:>9.2f}" for n in names))
    for call in calls:
        mark = " (clock)" if call in CLOCK_CALLS else ""
        lines.append(f"{call + mark:<{width}} "
                     + " ".join(f"{results[n].get(call, 0.0):>9.2f}" for n in names))
    return "\n".join(lines)


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.syscalls",
                                     description=__doc__.splitlines()[0])
    parser.add_argument("--connections", type=int, default=2000)
    parser.add_argument("--concurrency", type=int, default=1)
    parser.add_argument("--peers", default="rawproxy,haproxy",
                        help="comma list of proxy peers (default rawproxy,haproxy)")
    parser.add_argument("--rawproxy-args", default="",
                        help="extra options for rawproxy (one shell-quoted string)")
    parser.add_argument("--json", type=Path, default=DEFAULT_JSON, help="results file")
    args = parser.parse_args(argv)
    if args.connections < 1 or args.concurrency < 1:
        parser.error("--connections and --concurrency must be positive")
    if shutil.which("strace") is None:
        print("benchmarks.syscalls: strace not installed (apt-get install strace)",
              file=sys.stderr)
        return 2
    wanted = [n.strip() for n in args.peers.split(",") if n.strip()]
    known = {p.name: p for p in PEERS if not p.is_direct}
    unknown = [n for n in wanted if n not in known]
    if unknown:
        parser.error(f"unknown peer(s): {', '.join(unknown)} (known: {', '.join(known)})")
    procs.pin_self(procs.LOAD_CPU)
    workdir = Path(tempfile.mkdtemp(prefix="rawproxy-syscalls-"))
    backends = Backends(workdir)
    ctx = PeerContext(workdir, procs.raise_nofile(), shlex.split(args.rawproxy_args))
    results: dict[str, dict[str, float]] = {}
    failed = False
    try:
        target = backends.port("echo")
        for name in wanted:
            peer = known[name]
            reason = peer.unavailable()
            if reason is not None:
                print(f"note: peer {name} skipped: {reason}")
                continue
            try:
                counts = count_peer(peer, ctx, target, args.connections, args.concurrency,
                                    workdir)
            except (procs.BenchError, OSError, subprocess.SubprocessError) as exc:
                print(f"note: peer {name} failed: {exc}")
                failed = True
                continue
            results[name] = per_connection(counts, args.connections)
    finally:
        backends.stop_all()
        shutil.rmtree(workdir, ignore_errors=True)
    print(f"{args.connections} connect/echo/close cycles per peer, {args.concurrency} at a time, "
          f"strace -c -f attached after a warm-up of {WARMUP_CYCLES}")
    if results:
        print(render(results))
    write_json(args.json, {"connections": args.connections, "concurrency": args.concurrency,
                           "rawproxy_args": shlex.split(args.rawproxy_args),
                           "per_connection": results})
    print(f"results: {args.json}")
    return 1 if failed or not results else 0


if __name__ == "__main__":
    sys.exit(main())
