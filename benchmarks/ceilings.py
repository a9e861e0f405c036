"""The costs the throughput table does not show: failover and name lookups.

``python -m benchmarks.ceilings [--repeat N]`` (``make bench-ceilings``)
prints medians over ``N`` repeats (default 5):

* **failover**: the time from a client's connect through rawproxy to its
  first echoed bytes (64 bytes there and back) when the balancer's first
  pick is a live echo target, a refused port (nothing listens), or a silent
  one (a listener whose accept queue is full, so its SYNs go unanswered),
  with ``ConnectTimeout`` 0.5 s.  The dead target carries the largest weight
  and each repeat starts a fresh proxy, so the first pick is the dead one;
  then one more connection right after, which passive health sends
  straight to the live target.
* **dns**: rawproxy's own :class:`~rawproxy.resolver.Resolver` (two worker
  threads) with a stand-in ``getaddrinfo`` that takes 50 ms, so no query
  leaves the machine: the time to answer 20 distinct names, and 20 lookups
  of one name.

Everything listens on 127.0.0.1 (the targets are the test suite's ``Backend``
and ``Blackhole``); the proxy is stopped by its PID.
"""

from __future__ import annotations

import argparse
import json
import queue
import socket
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

if __package__ in (None, ""):  # run as a file
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.procs import Proc, free_port  # noqa: E402
from rawproxy.resolver import Resolution, Resolver  # noqa: E402
from tests.support import Backend, Blackhole, dead_port  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
HOST = "127.0.0.1"
PAYLOAD = bytes(range(64))
CONNECT_TIMEOUT_S = 0.5
LOOKUP_DELAY_S = 0.05
LOOKUPS = 20


def echo_ms(port: int) -> float:
    started = time.perf_counter()
    with socket.create_connection((HOST, port), timeout=10) as sock:
        sock.sendall(PAYLOAD)
        got = b""
        while len(got) < len(PAYLOAD):
            chunk = sock.recv(len(PAYLOAD) - len(got))
            if not chunk:
                raise RuntimeError("the proxy closed before the echo came back")
            got += chunk
    if got != PAYLOAD:
        raise RuntimeError("wrong bytes came back")
    return (time.perf_counter() - started) * 1e3


def first_and_next_ms(workdir: Path, first_pick: Optional[int], live: int) -> tuple[float, float]:
    """One fresh proxy: the first connection's echo time, then the next one's."""
    port = free_port()
    targets: list[Any] = [{"Address": f"{HOST}:{live}", "Weight": 1}]
    if first_pick is not None:
        targets.insert(0, {"Address": f"{HOST}:{first_pick}", "Weight": 1_000_000})
    config = workdir / f"ceilings-{port}.json"
    config.write_text(json.dumps({"Apps": [{"Name": "ceilings", "Ports": [port],
                                            "Targets": targets,
                                            "ConnectTimeout": CONNECT_TIMEOUT_S}]}))
    proc = Proc("rawproxy", [sys.executable, str(ROOT / "rawproxy.py"), "--config", str(config),
                             "--listen-host", HOST, "--log-level", "error"],
                workdir / f"ceilings-{port}.log", cwd=ROOT)
    try:
        proc.wait_listening([port])
        return echo_ms(port), echo_ms(port)
    finally:
        proc.stop()


def failover(repeat: int) -> list[tuple[str, float, float]]:
    live, silent = Backend("echo"), Blackhole()
    rows = []
    try:
        with tempfile.TemporaryDirectory(prefix="rawproxy-ceilings-") as tmp:
            for label, pick in (("live target", None), ("refused target", dead_port()),
                                (f"silent target, ConnectTimeout {CONNECT_TIMEOUT_S:g} s",
                                 silent.port)):
                runs = [first_and_next_ms(Path(tmp), pick, live.port) for _ in range(repeat)]
                rows.append((label, statistics.median(r[0] for r in runs),
                             statistics.median(r[1] for r in runs)))
    finally:
        live.close()
        silent.close()
    return rows


def slow_getaddrinfo(host: str, port: int, *args: Any, **kwargs: Any) -> list[tuple[Any, ...]]:
    time.sleep(LOOKUP_DELAY_S)
    return [(socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP, "", (HOST, port))]


def lookups_s(hosts: Sequence[str]) -> float:
    """Seconds until every lookup of ``hosts`` (asked at once) is answered.

    This thread plays the event loop: answers posted by the workers run here.
    """
    posted: queue.SimpleQueue[Callable[[], None]] = queue.SimpleQueue()
    answers: list[Resolution] = []
    resolver = Resolver(posted.put, slow_getaddrinfo)
    try:
        started = time.perf_counter()
        for host in hosts:
            if resolver.resolve(host, 80, answers.append) is not None:
                raise RuntimeError(f"{host} was answered from the cache")
        while len(answers) < len(hosts):
            posted.get(timeout=30)()
        elapsed = time.perf_counter() - started
    finally:
        resolver.close()
    failed = [a.error for a in answers if a.error]
    if failed:
        raise RuntimeError(failed[0])
    return elapsed


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.ceilings",
                                     description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=5)
    args = parser.parse_args(argv)
    if args.repeat < 1:
        parser.error("--repeat must be positive")
    print(f"failover: a new connection's connect + 64-byte echo through rawproxy, "
          f"median of {args.repeat} fresh proxies")
    print(f"  {'first pick':<38} {'first conn ms':>13} {'next conn ms':>12}")
    for label, first, after in failover(args.repeat):
        print(f"  {label:<38} {first:>13.2f} {after:>12.2f}")
    distinct = lookups_s([f"name-{i}.test" for i in range(LOOKUPS)])
    shared = lookups_s(["one-name.test"] * LOOKUPS)
    print(f"dns: getaddrinfo taking {LOOKUP_DELAY_S * 1e3:.0f} ms, two worker threads")
    print(f"  {LOOKUPS} distinct names answered in {distinct * 1e3:.0f} ms")
    print(f"  {LOOKUPS} lookups of one name answered in {shared * 1e3:.0f} ms")
    return 0


if __name__ == "__main__":
    sys.exit(main())
