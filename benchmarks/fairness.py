"""Fairness under overload (SPEC 13): does trouble on app A slow app B?

``python -m benchmarks.fairness [--seconds S] [--rounds N]`` (``make
bench-fairness``) runs one rawproxy with two apps on one echo backend:

* **A**: ``PerClient {"MaxConnections": 10, "Rate": 100}`` -- its capacity
  for one client address is 100 new connections a second;
* **B**: no limits.

A measuring client talks to B the whole time: 64-byte echoes on one open
connection (``rtt``) and, every 20th sample, a new connection's connect plus
echo (``connect``); between them, the same echo straight to B's backend
(``direct``), a control for what the machine itself adds.  Each round has
three phases of ``S`` seconds:

* **quiet**: nothing else;
* **flood**: one client address (127.0.0.3) opening and resetting
  connections to A as fast as it can (processes at nice 19), many
  times A's capacity: almost all are reset at accept (``client-limit``);
* **bulk**: one connection to A moving bulk data both ways (256 KiB writes,
  echoed back), as fast as it goes.

Printed: B's p50/p99 per phase (medians over the rounds), the ratio of each
p99 to the quiet one (the goal is 2x at most), and what A saw.  Then a
figure that the machine's other load does not blur: the CPU time of one
reset at accept, and of one loop turn, measured in this process on a
:class:`~rawproxy.server.Server` whose listener has 1,000 clients waiting in
its backlog: how long a flooded listener holds the loop per turn, i.e. what
every other connection waits at most (a listener takes one client a turn
once it has reset one, whatever its batch).  ``--launcher haproxy`` runs the
same phases against HAProxy, one thread, A's limits as a stick table.  The
proxy runs on CPU 0 and everything else on CPU 1 when ``taskset`` and two
CPUs exist; the proxy logs at ``warning`` (the access log of a flood is what
``--log-level warning`` is for).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import socket
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any, Optional, Sequence

if __package__ in (None, ""):  # run as a file
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.procs import (LOAD_CPU, PROXY_CPU, Proc, free_port, pin_self,  # noqa: E402
                              pinned, raise_nofile)
from rawproxy.config import parse_config  # noqa: E402
from rawproxy.loop import EventLoop  # noqa: E402
from rawproxy.resolver import Resolver  # noqa: E402
from rawproxy.server import ACCEPT_BATCH, Server  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
HOST = "127.0.0.1"
FLOOD_SOURCE = "127.0.0.3"
PAYLOAD = bytes(range(64))
PER_CLIENT = {"MaxConnections": 10, "Rate": 100}
BULK_CHUNK = 256 * 1024
CONNECT_EVERY = 20
LINGER_RESET = b"\x01\x00\x00\x00\x00\x00\x00\x00"  # struct linger {1, 0}: close with RST
PHASES = ("quiet", "flood", "bulk")
# The same two apps in HAProxy (--peer haproxy), one thread: A's PerClient as
# a stick table on the source address, rejected at accept like rawproxy's.
HAPROXY_CONF = """\
global
    nbthread 1
    maxconn 8000
defaults
    mode tcp
    timeout connect 5s
    timeout client 5m
    timeout server 5m
frontend a
    bind {host}:{a}
    stick-table type ip size 100k expire 30s store conn_cur,conn_rate(1s)
    tcp-request connection track-sc0 src
    acl over_connections sc0_conn_cur gt {max_conn}
    acl over_rate sc0_conn_rate gt {rate}
    tcp-request connection reject if over_connections or over_rate
    default_backend a
backend a
    server echo {host}:{echo_a}
frontend b
    bind {host}:{b}
    default_backend b
backend b
    server echo {host}:{echo_b}
"""


# -- the load: run as children (python -m benchmarks.fairness --flood/--bulk) ------------

def _stop_on_sigterm(done: threading.Event) -> None:
    signal.signal(signal.SIGTERM, lambda *_: done.set())


def flood(port: int) -> None:
    """Open connections from FLOOD_SOURCE as fast as they go; print the count."""
    done = threading.Event()
    _stop_on_sigterm(done)
    attempts = 0
    while not done.is_set():
        sock = socket.socket()
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, LINGER_RESET)
            sock.settimeout(1.0)
            sock.bind((FLOOD_SOURCE, 0))
            sock.connect((HOST, port))
            attempts += 1
        except OSError:
            pass
        finally:
            sock.close()  # RST: no TIME_WAIT, so source ports never run out
    print(json.dumps({"connects": attempts}), flush=True)


def bulk(port: int) -> None:
    """One connection: write 256 KiB blocks, read the echo; print bytes moved."""
    done = threading.Event()
    _stop_on_sigterm(done)
    sock = socket.create_connection((HOST, port), timeout=5)
    received = [0]

    def read() -> None:
        while not done.is_set():
            try:
                chunk = sock.recv(1 << 20)
            except OSError:
                return
            if not chunk:
                return
            received[0] += len(chunk)

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    block = b"\x5a" * BULK_CHUNK
    while not done.is_set():
        try:
            sock.sendall(block)
        except OSError:
            break
    print(json.dumps({"echoed_bytes": received[0]}), flush=True)
    sock.close()


# -- the measurement -------------------------------------------------------------------

def _echo(sock: socket.socket) -> None:
    sock.sendall(PAYLOAD)
    got = 0
    while got < len(PAYLOAD):
        chunk = sock.recv(len(PAYLOAD) - got)
        if not chunk:
            raise RuntimeError("app B closed the connection")
        got += len(chunk)


def measure_b(port: int, direct_port: int, seconds: float) -> dict[str, list[float]]:
    """B's latencies in microseconds: ``rtt`` on one connection through the
    proxy, ``connect`` for a new one (every CONNECT_EVERY-th sample), and
    ``direct``, B's backend without the proxy, interleaved: the control that
    shows what the machine itself added."""
    samples: dict[str, list[float]] = {"rtt": [], "connect": [], "direct": []}
    with socket.create_connection((HOST, port), timeout=5) as sock, \
            socket.create_connection((HOST, direct_port), timeout=5) as direct:
        for conn in (sock, direct):
            conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            _echo(conn)
        end = time.monotonic() + seconds
        n = 0
        while time.monotonic() < end:
            n += 1
            started = time.perf_counter()
            if n % 2:
                _echo(direct)
                samples["direct"].append((time.perf_counter() - started) * 1e6)
            elif n % (2 * CONNECT_EVERY):
                _echo(sock)
                samples["rtt"].append((time.perf_counter() - started) * 1e6)
            else:
                with socket.create_connection((HOST, port), timeout=5) as fresh:
                    fresh.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                    _echo(fresh)
                samples["connect"].append((time.perf_counter() - started) * 1e6)
    return samples


def percentile(values: list[float], fraction: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(fraction * len(ordered)))]


def background(argv: Sequence[str]) -> list[str]:
    """``argv`` pinned to the load CPU at nice 19, so that the measuring
    client and B's backend, on the same CPU, run first whenever they have
    work (SCHED_IDLE would starve the load whenever the machine is busy)."""
    return pinned(LOAD_CPU, ["nice", "-n", "19", *argv])


def _child(workdir: Path, role: str, port: int) -> Proc:
    argv = [sys.executable, "-m", "benchmarks.fairness", f"--{role}", str(port)]
    return Proc(role, background(argv), workdir / f"{role}-{port}.log", cwd=ROOT)


def _child_result(proc: Proc) -> dict[str, Any]:
    proc.stop()
    for line in reversed(proc.log_path.read_text(errors="replace").splitlines()):
        if line.startswith("{"):
            return dict(json.loads(line))
    return {}


def _admin_counts(admin_port: int) -> dict[str, float]:
    with socket.create_connection((HOST, admin_port), timeout=5) as sock:
        sock.sendall(b"GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        text = b"".join(iter(lambda: sock.recv(65536), b"")).decode()
    counts = {}
    for line in text.splitlines():
        for name in ("connections_accepted_total", "connections_client_limited_total"):
            if line.startswith(f'rawproxy_{name}{{app="a"}}'):
                counts[name] = float(line.rsplit(" ", 1)[1])
    return counts


def run_phase(phase: str, workdir: Path, ports: dict[str, int], seconds: float,
              flooders: int, proxy: Proc) -> dict[str, Any]:
    load: list[Proc] = []
    if phase == "flood":
        load = [_child(workdir, "flood", ports["a"]) for _ in range(flooders)]
    elif phase == "bulk":
        load = [_child(workdir, "bulk", ports["a"])]
    def counts() -> dict[str, float]:  # HAProxy's side has no admin port: zeros
        if "admin" in ports:
            return _admin_counts(ports["admin"])
        return dict.fromkeys(("connections_accepted_total",
                              "connections_client_limited_total"), 0.0)

    before = counts()
    cpu_before = sum(proxy.cpu_times())
    try:
        time.sleep(0.5)  # let the load reach its pace: this is the benchmark, not a test
        samples = measure_b(ports["b"], ports["echo_b"], seconds)
    finally:
        results = [_child_result(proc) for proc in load]
    elapsed = seconds + 0.5
    cpu = (sum(proxy.cpu_times()) - cpu_before) / elapsed
    after = counts()
    out: dict[str, Any] = {"samples": samples, "proxy_cpu": cpu}
    if phase == "flood":
        out["connects_per_s"] = sum(r.get("connects", 0) for r in results) / elapsed
        out["reset_per_s"] = (after["connections_client_limited_total"]
                              - before["connections_client_limited_total"]) / elapsed
        out["admitted_per_s"] = (after["connections_accepted_total"]
                                 - before["connections_accepted_total"]) / elapsed - out[
                                     "reset_per_s"]
    if phase == "bulk":
        out["bulk_MBps"] = sum(r.get("echoed_bytes", 0) for r in results) / elapsed / 1e6
    return out


def start_proxy(workdir: Path, launcher: str, extra: Sequence[str],
                boost: bool) -> tuple[list[Proc], dict[str, int]]:
    """The proxy, and one echo backend per app (A's at the lowest priority:
    its bulk echo must not delay B's answers on the load CPU)."""
    ports = {name: free_port() for name in ("echo_a", "echo_b", "a", "b", "admin")}
    server = [sys.executable, str(ROOT / "benchmarks" / "echo_server.py")]
    high = ["nice", "-n", "-20"] if boost else []
    procs = [Proc("echo-a", background([*server, str(ports["echo_a"])]), workdir / "echo-a.log"),
             Proc("echo-b", pinned(LOAD_CPU, [*high, *server, str(ports["echo_b"])]),
                  workdir / "echo-b.log")]
    config = workdir / "fairness.json"
    config.write_text(json.dumps({"Apps": [
        {"Name": "a", "Ports": [ports["a"]], "Targets": [f"{HOST}:{ports['echo_a']}"],
         "PerClient": PER_CLIENT},
        {"Name": "b", "Ports": [ports["b"]], "Targets": [f"{HOST}:{ports['echo_b']}"]}]}))
    if launcher == "haproxy":
        del ports["admin"]
        config = workdir / "fairness.cfg"
        config.write_text(HAPROXY_CONF.format(host=HOST, max_conn=PER_CLIENT["MaxConnections"],
                                              rate=PER_CLIENT["Rate"], **ports))
        procs.append(Proc("haproxy", pinned(PROXY_CPU, [*high, "haproxy", "-db", "-f",
                                                        str(config)]),
                          workdir / "haproxy.log", cwd=ROOT))
    else:
        procs.append(Proc("rawproxy", pinned(PROXY_CPU, [
            *high, sys.executable, launcher, "--config", str(config),
            "--listen-host", HOST, "--admin", f"{HOST}:{ports['admin']}",
            "--log-level", "warning", *extra]), workdir / "rawproxy.log", cwd=ROOT))
    try:
        procs[0].wait_listening([ports["echo_a"]])
        procs[1].wait_listening([ports["echo_b"]])
        procs[2].wait_listening([ports[name] for name in ("a", "b", "admin") if name in ports])
    except BaseException:  # a proxy that does not start: nothing is left running
        for proc in reversed(procs):
            proc.stop()
        raise
    return procs, ports


def reject_cost_us(batch: int, clients: int = 1000) -> tuple[float, float]:
    """CPU microseconds per client reset by PerClient at accept, and per
    loop turn, the listener's backlog full (see the module docstring)."""
    port = free_port()
    config = parse_config(json.dumps({"Apps": [{
        "Name": "a", "Ports": [port], "Targets": [f"{HOST}:1"],
        "PerClient": {"MaxConnections": 1, "Rate": 1}}]}), "reject-cost")
    loop = EventLoop()
    resolver = Resolver(loop.call_soon_threadsafe)
    server = Server(config, loop, resolver, listen_host=HOST, accept_batch=batch)
    waiting: list[socket.socket] = []
    try:
        server.start()
        for _ in range(clients):  # the kernel completes them: they wait in the backlog
            sock = socket.socket()
            waiting.append(sock)
            sock.bind((FLOOD_SOURCE, 0))
            sock.connect((HOST, port))
        stats = server.stats.app("a")
        started = time.process_time()
        turns = 0
        while stats.accepted < clients:
            loop.run_once(1.0)
            turns += 1
        spent_us = (time.process_time() - started) * 1e6
        return spent_us / clients, spent_us / turns
    finally:
        for sock in waiting:
            sock.close()
        server.close()
        resolver.close()
        loop.close()


def report_reject_cost() -> None:
    # The one admitted client's target refuses: that warning is no news here.
    logging.getLogger("rawproxy").setLevel(logging.ERROR)
    print(f"a flooded listener: CPU per reset at accept, and per loop turn (batch "
          f"{ACCEPT_BATCH}, 1 a turn once a client is reset; least of 5 runs: other load "
          "only ever adds)")
    for batch in sorted({16, ACCEPT_BATCH, 1}, reverse=True):
        runs = [reject_cost_us(batch) for _ in range(5)]
        print(f"  batch {batch:>2}: {min(r[0] for r in runs):5.1f} µs a reset, the loop held "
              f"{min(r[1] for r in runs):6.1f} µs a turn")


def report(rounds: list[dict[str, dict[str, Any]]], haproxy: bool = False) -> None:
    def median_of(phase: str, series: str, fraction: float) -> float:
        return statistics.median(percentile(r[phase]["samples"][series], fraction)
                                 for r in rounds)

    print(f"app B's latency, µs (median over {len(rounds)} rounds); x: p99 / the quiet p99; "
          "direct: B's backend without the proxy, interleaved (the machine's own noise)")
    print(f"  {'phase':<7} {'rtt p50':>8} {'rtt p99':>8} {'x':>6} {'connect p50':>12} "
          f"{'connect p99':>12} {'x':>6} {'direct p50':>11} {'direct p99':>11} "
          f"{'proxy CPU':>10}")
    quiet = {series: median_of("quiet", series, 0.99) for series in ("rtt", "connect")}
    for phase in PHASES:
        p50 = {series: median_of(phase, series, 0.5) for series in ("rtt", "connect", "direct")}
        p99 = {series: median_of(phase, series, 0.99) for series in ("rtt", "connect", "direct")}
        print(f"  {phase:<7} {p50['rtt']:>8.0f} {p99['rtt']:>8.0f} "
              f"{p99['rtt'] / quiet['rtt']:>6.2f} {p50['connect']:>12.0f} "
              f"{p99['connect']:>12.0f} {p99['connect'] / quiet['connect']:>6.2f} "
              f"{p50['direct']:>11.0f} {p99['direct']:>11.0f} "
              f"{statistics.median(r[phase]['proxy_cpu'] for r in rounds):>10.0%}")
    med = statistics.median
    connects = med(r['flood']['connects_per_s'] for r in rounds)
    if haproxy:  # no admin port to count from; conn_rate counts rejected attempts too,
        # so past the first second HAProxy admits next to none of the flood
        print(f"flood on A: {connects:,.0f} connects/s from one address (HAProxy: resets "
              "and admissions not counted)")
    else:
        print(f"flood on A: {connects:,.0f} connects/s from one address; "
              f"{med(r['flood']['reset_per_s'] for r in rounds):,.0f}/s reset, "
              f"{med(r['flood']['admitted_per_s'] for r in rounds):,.0f}/s admitted "
              f"(capacity {PER_CLIENT['Rate']}/s)")
    print(f"bulk on A: {med(r['bulk']['bulk_MBps'] for r in rounds):,.0f} MB/s echoed")


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.fairness",
                                     description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=4.0, help="per phase (default 4)")
    parser.add_argument("--rounds", type=int, default=3, help="default 3")
    parser.add_argument("--flooders", type=int, default=2,
                        help="flooding processes, all from one address (default 2)")
    parser.add_argument("--proxy-arg", action="append", default=[], metavar="ARG",
                        help="passed to rawproxy (repeat for several)")
    parser.add_argument("--launcher", default=str(ROOT / "rawproxy.py"), metavar="PATH",
                        help="the proxy to run (default: this checkout's rawproxy.py; "
                             "another checkout's to compare; 'haproxy': HAProxy, one "
                             "thread, A's limits as a stick table on the source)")
    parser.add_argument("--boost", action="store_true",
                        help="run the proxy, B's backend and the measuring client at nice -20 "
                             "(root), so that other work on the machine disturbs them less")
    parser.add_argument("--flood", type=int, metavar="PORT", help=argparse.SUPPRESS)
    parser.add_argument("--bulk", type=int, metavar="PORT", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.flood is not None:
        flood(args.flood)
        return 0
    if args.bulk is not None:
        bulk(args.bulk)
        return 0
    if args.rounds < 1 or args.seconds <= 0 or args.flooders < 1:
        parser.error("--rounds, --seconds and --flooders must be positive")
    raise_nofile()
    pin_self(LOAD_CPU)
    if args.boost:
        os.nice(-20)
    with tempfile.TemporaryDirectory(prefix="rawproxy-fairness-") as tmp:
        workdir = Path(tmp)
        procs, ports = start_proxy(workdir, args.launcher, args.proxy_arg, args.boost)
        try:
            rounds = [{phase: run_phase(phase, workdir, ports, args.seconds, args.flooders,
                                        procs[-1])
                       for phase in PHASES} for _ in range(args.rounds)]
        finally:
            for proc in reversed(procs):
                proc.stop()
    print(f"{args.launcher}; python {sys.version.split()[0]}, {os.cpu_count()} CPUs, "
          f"{args.seconds:g} s a phase, {args.flooders} flooding processes"
          f"{', boosted (nice -20)' if args.boost else ''}; proxy args: "
          f"{' '.join(args.proxy_arg) or 'none'}")
    report(rounds, haproxy=args.launcher == "haproxy")
    if args.launcher != "haproxy":  # measured in this process, on rawproxy's Server
        report_reject_cost()
    return 0


if __name__ == "__main__":
    sys.exit(main())
