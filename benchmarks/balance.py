"""What least-connections buys against a slow target (``make bench-balance``).

``python -m benchmarks.balance [--seconds S] [--rounds N] [--concurrency C]``:
two backends behind one app, equal weights; each answers one request per
connection (read a byte, wait, answer a byte, close), the slow one waiting
5x as long as the fast one (``--fast-ms``, default 10 ms; ``--slow-factor``).
For each ``Balance`` (``random``, ``least-connections``), ``C`` clients
(default 16) each run requests back to back over new connections for ``S``
seconds, through a fresh rawproxy pinned to CPU 0 (clients and backends on
CPU 1).  Printed, median over rounds: requests/s, p50 and p99 latency, and
the share of requests each backend got.  ``--json`` keeps every round
(default ``benchmarks/results/balance.json``).

The backends are asyncio servers in a child process of their own, so their
timers do not share a GIL with the clients.  Everything is on 127.0.0.1;
every process is stopped by its PID.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import socket
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Awaitable, Callable, Optional, Sequence

if __package__ in (None, ""):  # run as a file
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.procs import Proc, pin_self, pinned  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
HOST = "127.0.0.1"
POLICIES = ("random", "least-connections")
DEFAULT_JSON = ROOT / "benchmarks" / "results" / "balance.json"


# -- the backends (run as: python -m benchmarks.balance --backend PORT:MS:NAME ...) --

async def _serve_one(delay_s: float, name: bytes, reader: asyncio.StreamReader,
                     writer: asyncio.StreamWriter) -> None:
    try:
        if await reader.read(1):
            await asyncio.sleep(delay_s)
            writer.write(name)
            await writer.drain()
    except OSError:
        pass
    finally:
        writer.close()


def _handler(delay_s: float, name: bytes) -> Callable[[asyncio.StreamReader,
                                                       asyncio.StreamWriter], Awaitable[None]]:
    return lambda reader, writer: _serve_one(delay_s, name, reader, writer)


async def _backends(specs: Sequence[str]) -> None:
    servers = []
    for spec in specs:
        port, ms, name = spec.split(":")
        handler = _handler(float(ms) / 1000.0, name.encode()[:1])
        servers.append(await asyncio.start_server(handler, HOST, int(port), backlog=1024))
    await asyncio.gather(*(server.serve_forever() for server in servers))


# -- the clients ---------------------------------------------------------------------

async def _client(port: int, until: float, latencies: list[float],
                  counts: dict[str, int]) -> None:
    loop = asyncio.get_running_loop()
    while loop.time() < until:
        started = loop.time()
        try:
            reader, writer = await asyncio.open_connection(HOST, port)
            writer.write(b"x")
            answer = await reader.read(1)
            writer.close()
        except OSError:
            answer = b""
        key = answer.decode() or "error"
        counts[key] = counts.get(key, 0) + 1
        if answer:
            latencies.append(loop.time() - started)


async def _load(port: int, seconds: float, concurrency: int) -> tuple[list[float], dict[str, int]]:
    latencies: list[float] = []
    counts: dict[str, int] = {}
    until = asyncio.get_running_loop().time() + seconds
    await asyncio.gather(*(_client(port, until, latencies, counts) for _ in range(concurrency)))
    return latencies, counts


def free_port() -> int:
    """A port the kernel just handed out (other benchmarks may be running:
    the harness's fixed range could be taken between a probe and a bind)."""
    with socket.socket() as probe:
        probe.bind((HOST, 0))
        port: int = probe.getsockname()[1]
        return port


def percentile(values: Sequence[float], fraction: float) -> float:
    """The nearest-rank percentile (0 < fraction <= 1) of ``values``."""
    ordered = sorted(values)
    if not ordered:
        return float("nan")
    rank = max(1, min(len(ordered), int(fraction * len(ordered) + 0.999999)))
    return ordered[rank - 1]


def one_round(workdir: Path, policy: str, backends: dict[str, int], seconds: float,
              concurrency: int) -> dict[str, Any]:
    port = free_port()
    config = workdir / f"balance-{port}.json"
    targets = [f"{HOST}:{backends['fast']}", f"{HOST}:{backends['slow']}"]
    config.write_text(json.dumps({"Apps": [{"Name": "bench", "Ports": [port],
                                            "Targets": targets, "Balance": policy}]}))
    proxy = Proc("rawproxy", pinned(0, [sys.executable, str(ROOT / "rawproxy.py"),
                                        "--config", str(config), "--listen-host", HOST,
                                        "--log-level", "warning"]),
                 workdir / f"balance-{port}.log", cwd=ROOT)
    try:
        proxy.wait_listening([port])
        started = time.perf_counter()
        latencies, counts = asyncio.run(_load(port, seconds, concurrency))
        elapsed = time.perf_counter() - started
    finally:
        proxy.stop()
    served = counts.get("F", 0) + counts.get("S", 0)
    return {"policy": policy, "requests": served, "errors": counts.get("error", 0),
            "rate": served / elapsed,
            "p50_ms": percentile(latencies, 0.50) * 1e3,
            "p99_ms": percentile(latencies, 0.99) * 1e3,
            "fast_share": counts.get("F", 0) / served if served else float("nan"),
            "slow_share": counts.get("S", 0) / served if served else float("nan")}


def render(rounds: list[dict[str, Any]], fast_ms: float, slow_ms: float) -> str:
    lines = [f"two backends: fast {fast_ms:g} ms, slow {slow_ms:g} ms per request "
             f"(medians over {len(rounds) // len(POLICIES)} rounds)",
             f"{'Balance':<18} {'req/s':>8} {'p50 ms':>8} {'p99 ms':>8} "
             f"{'fast':>6} {'slow':>6} {'errors':>6}"]
    for policy in POLICIES:
        mine = [r for r in rounds if r["policy"] == policy]

        def median(field: str, rows: list[dict[str, Any]] = mine) -> float:
            return float(statistics.median(r[field] for r in rows))
        lines.append(f"{policy:<18} {median('rate'):>8.0f} {median('p50_ms'):>8.2f} "
                     f"{median('p99_ms'):>8.2f} {median('fast_share'):>6.1%} "
                     f"{median('slow_share'):>6.1%} {sum(r['errors'] for r in mine):>6}")
    return "\n".join(lines)


def parse_args(argv: Optional[Sequence[str]]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.balance",
                                     description="random against least-connections, "
                                                 "one target 5x slower")
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--fast-ms", type=float, default=10.0)
    parser.add_argument("--slow-factor", type=float, default=5.0)
    parser.add_argument("--json", type=Path, default=DEFAULT_JSON)
    parser.add_argument("--backend", nargs="+", help=argparse.SUPPRESS)  # the child
    args = parser.parse_args(argv)
    if args.seconds <= 0 or args.rounds < 1 or args.concurrency < 1 or args.fast_ms <= 0:
        parser.error("--seconds, --rounds, --concurrency and --fast-ms must be positive")
    return args


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = parse_args(argv)
    if args.backend:
        asyncio.run(_backends(args.backend))
        return 0
    slow_ms = args.fast_ms * args.slow_factor
    backends = {"fast": free_port(), "slow": free_port()}
    pin_self(1)  # the clients, and (inherited) the backends, on CPU 1
    rounds: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="rawproxy-balance-") as tmp:
        workdir = Path(tmp)
        specs = [f"{backends['fast']}:{args.fast_ms}:F", f"{backends['slow']}:{slow_ms}:S"]
        server = Proc("backends", [sys.executable, "-m", "benchmarks.balance",
                                   "--backend", *specs], workdir / "backends.log", cwd=ROOT)
        try:
            server.wait_listening(list(backends.values()))
            for round_index in range(args.rounds):
                order = POLICIES if round_index % 2 == 0 else POLICIES[::-1]
                for policy in order:
                    rounds.append(one_round(workdir, policy, backends, args.seconds,
                                            args.concurrency))
        finally:
            server.stop()
    print(render(rounds, args.fast_ms, slow_ms))
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps({"fast_ms": args.fast_ms, "slow_ms": slow_ms,
                                     "concurrency": args.concurrency, "seconds": args.seconds,
                                     "rounds": rounds}, indent=2) + "\n")
    print(f"every round: {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
