"""The benchmark harness: ``python -m benchmarks.run`` (what ``make bench`` runs).

For each round, for each workload, each peer in turn (the order rotates
every round) gets a fresh proxy pinned to CPU 0, one bounded measurement
from clients on CPU 1, and SIGTERM.  The table shows the median over rounds
and the ratios to HAProxy and to direct; ``--json`` (default
``benchmarks/results/latest.json``) keeps every measurement.

    python -m benchmarks.run                      # 3 rounds x 5 s, every peer found
    python -m benchmarks.run --quick              # 1 round x 1 s, small idle/integrity
    python -m benchmarks.run --peers rawproxy,haproxy --workloads churn --rounds 5
    python -m benchmarks.run --rawproxy-args='--no-splice'   # e.g. a lever off

Peers whose program is missing, and workloads whose tools are missing, are
skipped with a note.  Exit status: 0 when every rawproxy measurement ran
clean, 1 when one errored or was marked (other peers' troubles are only
marked in the table), 2 for bad options.
"""

from __future__ import annotations

import argparse
import os
import platform
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Optional, Sequence

if __package__ in (None, ""):  # run as a file: python benchmarks/run.py
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks import procs  # noqa: E402
from benchmarks.backends import Backends  # noqa: E402
from benchmarks.peers import PEERS, Peer, PeerContext  # noqa: E402
from benchmarks.report import Record, Summary, render_table, write_json  # noqa: E402
from benchmarks.workloads import BACKEND, TOOL, WORKLOADS, Settings, cpu_metrics, measure  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_JSON = ROOT / "benchmarks" / "results" / "latest.json"
# Descriptors a proxy needs besides two per proxied connection.
FD_HEADROOM = 100


def parse_args(argv: Optional[Sequence[str]]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.run",
                                     description="rawproxy vs HAProxy, nginx, asyncio, uvloop")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--seconds", type=float, default=5.0,
                        help="length of each timed measurement (default 5)")
    parser.add_argument("--quick", action="store_true",
                        help="smoke run: 1 round, 1 s, 500 idle connections, 16 MiB integrity")
    parser.add_argument("--peers", default="",
                        help="comma list from: " + ",".join(p.name for p in PEERS))
    parser.add_argument("--workloads", default="", help="comma list from: " + ",".join(WORKLOADS))
    parser.add_argument("--idle-connections", type=int, default=10_000)
    parser.add_argument("--integrity-mib", type=int, default=256)
    parser.add_argument("--rawproxy-args", default="",
                        help="extra options for rawproxy (one shell-quoted string)")
    parser.add_argument("--json", type=Path, default=DEFAULT_JSON, help="results file")
    args = parser.parse_args(argv)
    if args.quick:
        args.rounds = 1
        args.seconds = 1.0
        args.idle_connections = min(args.idle_connections, 500)
        args.integrity_mib = min(args.integrity_mib, 16)
    if args.rounds < 1 or args.seconds <= 0 or args.idle_connections < 1 or args.integrity_mib < 1:
        parser.error("--rounds, --seconds, --idle-connections, --integrity-mib must be positive")
    return args


def _pick(names: str, known: Sequence[str], what: str) -> list[str]:
    chosen = [n.strip() for n in names.split(",") if n.strip()]
    unknown = [n for n in chosen if n not in known]
    if unknown:
        raise SystemExit(f"benchmarks: unknown {what}: {', '.join(unknown)} "
                         f"(known: {', '.join(known)})")
    return chosen


def select_peers(names: str, notes: list[str]) -> list[Peer]:
    wanted = _pick(names, [p.name for p in PEERS], "peer")
    peers = []
    for peer in PEERS:
        if (peer.name in wanted) if wanted else peer.default:
            reason = peer.unavailable()
            if reason is None:
                peers.append(peer)
            else:
                notes.append(f"peer {peer.name} skipped: {reason}")
    return peers


def select_workloads(names: str, backends: Backends, notes: list[str]) -> list[str]:
    chosen = _pick(names, WORKLOADS, "workload") or list(WORKLOADS)
    kept = []
    for name in chosen:
        missing = backends.missing(BACKEND[name]) or (
            TOOL[name] if TOOL[name] and shutil.which(TOOL[name]) is None else None)
        if missing:
            notes.append(f"workload {name} skipped: {missing} not installed")
        else:
            kept.append(name)
    return kept


def _version(argv: list[str]) -> str:
    if shutil.which(argv[0]) is None:
        return "missing"
    try:
        done = subprocess.run(argv, capture_output=True, text=True, timeout=10, check=False)
    except (OSError, subprocess.TimeoutExpired):
        return "?"
    lines = (done.stdout + done.stderr).strip().splitlines()
    return lines[0] if lines else "?"


def machine_info() -> dict[str, Any]:
    model = ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    commit = _version(["git", "-C", str(ROOT), "describe", "--always", "--dirty"])
    return {"cpu": model, "cpus": os.cpu_count(), "kernel": platform.release(),
            "python": platform.python_version(), "rawproxy_commit": commit,
            "tools": {"haproxy": _version(["haproxy", "-v"]), "nginx": _version(["nginx", "-v"]),
                      "iperf3": _version(["iperf3", "--version"]),
                      "redis-benchmark": _version(["redis-benchmark", "--version"]),
                      "wrk": _version(["wrk", "-v"])}}


def measure_once(round_no: int, workload: str, peer: Peer, backends: Backends,
                 ctx: PeerContext, settings: Settings) -> Record:
    backend_kind = BACKEND[workload]
    try:
        target = backends.port(backend_kind)
    except procs.BenchError as exc:
        return Record(round_no, workload, peer.name, error=f"backend: {exc}")
    proc: Optional[procs.Proc] = None
    port = target
    try:
        if not peer.is_direct:
            port = procs.free_port()
            proc = peer.start(ctx, port, target)
        user_before, system_before = proc.cpu_times() if proc is not None else (0.0, 0.0)
        started = time.monotonic()
        metrics, problem = measure(workload, port, peer.name, settings,
                                   proc.rss_kib if proc is not None else None)
        if proc is not None:
            user_after, system_after = proc.cpu_times()
            metrics.update(cpu_metrics(workload, metrics, user_after - user_before,
                                       system_after - system_before,
                                       time.monotonic() - started))
        record = Record(round_no, workload, peer.name, metrics, problem)
    except (procs.BenchError, OSError) as exc:
        record = Record(round_no, workload, peer.name, error=str(exc))
        if backend_kind == "iperf3":
            # A broken test can leave iperf3's server waiting for it: start afresh.
            backends.restart("iperf3")
    if proc is not None:
        lines = proc.log_lines()
        tail = proc.log_tail() if lines else ""
        if proc.popen.poll() is not None and record.error is None:
            record.error = f"{peer.name} died during the run (exit {proc.popen.returncode}): {tail}"
        record.proxy = {"exit": proc.stop(), "log_lines": lines, "log_tail": tail}
    return record


def _progress(record: Record) -> str:
    shown = {k: v for k, v in record.metrics.items()
             if k in ("gbps", "ping_rps", "conn_rps", "errors", "kib_per_conn", "held",
                      "echo_ms", "mb_s", "p99_ms")}
    text = " ".join(f"{k}={v:.4g}" for k, v in shown.items())
    if record.error:
        text = f"ERROR {record.error}"
    elif record.problem:
        text += f" [{record.problem}]"
    return f"  r{record.round + 1} {record.workload:<9} {record.peer:<11} {text}"


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = parse_args(argv)
    notes: list[str] = []
    if not procs.pin_self(procs.LOAD_CPU):
        notes.append("fewer than 2 CPUs or no taskset: nothing pinned, figures mix proxy and load")
    nofile = procs.raise_nofile()
    idle_max = max(1, (nofile - FD_HEADROOM) // 2)
    if args.idle_connections > idle_max:
        notes.append(f"idle: {args.idle_connections} connections asked, descriptor limit "
                     f"{nofile} (2 per proxied connection) allows {idle_max}: measured {idle_max}")
        args.idle_connections = idle_max
    rawproxy_args = shlex.split(args.rawproxy_args)
    peers = select_peers(args.peers, notes)
    workdir = Path(tempfile.mkdtemp(prefix="rawproxy-bench-"))
    backends = Backends(workdir)
    workloads = select_workloads(args.workloads, backends, notes)
    for note in notes:
        print(f"note: {note}", flush=True)
    settings = Settings(args.seconds, args.idle_connections,
                        idle_timeout_s=30.0 if args.quick else 120.0,
                        integrity_bytes=args.integrity_mib * 1024 * 1024)
    ctx = PeerContext(workdir, nofile, rawproxy_args)
    print(f"benchmarks: {args.rounds} round(s) x {args.seconds:g} s; peers "
          f"{', '.join(p.name for p in peers) or 'none'}; workloads "
          f"{', '.join(workloads) or 'none'}; proxies on CPU {procs.PROXY_CPU}, "
          f"load on CPU {procs.LOAD_CPU}", flush=True)
    # Recorded before the run: rawproxy/ may change on disk while it goes on.
    machine = machine_info()
    records: list[Record] = []
    started = time.monotonic()
    try:
        for round_no in range(args.rounds):
            for workload in workloads:
                shift = round_no % max(1, len(peers))
                for peer in peers[shift:] + peers[:shift]:
                    record = measure_once(round_no, workload, peer, backends, ctx, settings)
                    records.append(record)
                    print(_progress(record), flush=True)
    except KeyboardInterrupt:
        notes.append("interrupted: partial results")
    finally:
        backends.stop_all()
        shutil.rmtree(workdir, ignore_errors=True)
    elapsed = time.monotonic() - started
    summary = Summary(records, [p.name for p in peers])
    notes.extend(_record_notes(records))
    print()
    print(render_table(summary, workloads))
    print()
    print("cells are medians over rounds; '!' = some round had errors or problems (see notes),"
          " 'err' = no round produced a figure, '-' = not measured")
    for note in notes:
        print(f"note: {note}")
    document = {"meta": {**machine, "rounds": args.rounds, "seconds": args.seconds,
                         "idle_connections": args.idle_connections,
                         "integrity_mib": args.integrity_mib, "rawproxy_args": rawproxy_args,
                         "pinned": procs.can_pin(), "nofile": nofile,
                         "elapsed_s": round(elapsed, 1), "time": time.strftime("%Y-%m-%dT%H:%M:%S%z")},
                "peers": [p.name for p in peers], "workloads": workloads, "notes": notes,
                "summary": summary.as_json(),
                "records": [r.as_json() for r in records]}
    write_json(args.json, document)
    print(f"results: {args.json} ({elapsed:.0f} s)")
    # The subject is rawproxy: its errors fail the run; other peers' are marked.
    clean = all(r.error is None and r.problem is None for r in records
                if r.peer.startswith("rawproxy"))
    return 0 if clean else 1


def _record_notes(records: Sequence[Record]) -> list[str]:
    """One note per (peer, workload) that erred, was marked, or logged."""
    seen: dict[tuple[str, str, str], int] = {}
    first: dict[tuple[str, str, str], str] = {}
    for record in records:
        for kind, text in (("error", record.error), ("problem", record.problem),
                           ("logged", record.proxy.get("log_tail") or None)):
            if text:
                key = (record.peer, record.workload, kind)
                seen[key] = seen.get(key, 0) + 1
                first.setdefault(key, str(text)[:240])
    return [f"{peer}/{workload} {kind} in {count} round(s): {first[(peer, workload, kind)]}"
            for (peer, workload, kind), count in seen.items()]


if __name__ == "__main__":
    sys.exit(main())
