"""External load generators, run on CPU 1 against a port: iperf3, redis-benchmark, wrk.

Each ``run_*`` function returns a flat ``{metric: value}`` dict and raises
:class:`~benchmarks.procs.BenchError` when the tool failed outright; the
``parse_*`` functions are pure (text in, numbers out).  Metric names carry
their unit: ``_gbps`` (Gbit/s), ``_rps`` (per second), ``_ms``.
"""

from __future__ import annotations

import csv
import io
import json
import re
from typing import Optional

from .procs import LOAD_CPU, BenchError, pinned, run_tool

Metrics = dict[str, float]

# redis-benchmark test names -> metric prefixes.  ``-t ping`` runs both
# PING_INLINE and PING_MBULK; the table shows PING_MBULK as "ping" (the
# RESP form real clients send) and keeps the inline one in the JSON.
REDIS_TESTS = {"PING_INLINE": "ping_inline", "PING_MBULK": "ping", "SET": "set", "GET": "get"}


def run_iperf3(port: int, streams: int, seconds: float) -> Metrics:
    argv = pinned(LOAD_CPU, ["iperf3", "-c", "127.0.0.1", "-p", str(port),
                             "-t", str(max(1, round(seconds))), "-P", str(streams), "--json"])
    rc, out, err = run_tool(argv, timeout_s=seconds + 30, check=False)
    return parse_iperf3(out, rc, err)


def parse_iperf3(text: str, rc: int = 0, err: str = "") -> Metrics:
    try:
        document = json.loads(text)
    except ValueError as exc:
        raise BenchError(f"iperf3 exited {rc} without JSON: {err.strip()[-200:]}") from exc
    if document.get("error"):
        raise BenchError(f"iperf3: {document['error']}")
    received = document["end"]["sum_received"]
    return {"gbps": received["bits_per_second"] / 1e9,
            "bytes": float(received["bytes"])}


def run_redis_benchmark(port: int, clients: int, requests_per_test: int,
                        seconds_limit: float) -> Metrics:
    argv = pinned(LOAD_CPU, ["redis-benchmark", "-h", "127.0.0.1", "-p", str(port),
                             "-c", str(clients), "-n", str(requests_per_test),
                             "-t", "ping,set,get", "--csv"])
    _, out, _ = run_tool(argv, timeout_s=seconds_limit)
    return parse_redis_csv(out)


def parse_redis_csv(text: str) -> Metrics:
    metrics: Metrics = {}
    for row in csv.DictReader(io.StringIO(text)):
        prefix = REDIS_TESTS.get(row.get("test") or "")
        if prefix is None:
            continue
        metrics[f"{prefix}_rps"] = float(row["rps"])
        if row.get("p50_latency_ms"):
            metrics[f"{prefix}_p50_ms"] = float(row["p50_latency_ms"])
    if "ping_rps" not in metrics:
        raise BenchError(f"redis-benchmark printed no results: {text.strip()[-200:]}")
    return metrics


def run_wrk(port: int, connections: int, seconds: float, path: str) -> Metrics:
    argv = pinned(LOAD_CPU, ["wrk", "-c", str(connections), "-t", "1",
                             "-d", f"{max(1, round(seconds))}s", "--latency",
                             "-H", "Connection: close", f"http://127.0.0.1:{port}/{path}"])
    _, out, _ = run_tool(argv, timeout_s=seconds + 30)
    return parse_wrk(out)


_UNITS_MS = {"us": 1e-3, "ms": 1.0, "s": 1e3, "m": 60e3}


def _duration_ms(text: str) -> float:
    match = re.fullmatch(r"([\d.]+)(us|ms|s|m)", text)
    if match is None:
        raise BenchError(f"wrk: unreadable duration {text!r}")
    return float(match.group(1)) * _UNITS_MS[match.group(2)]


def _find(pattern: str, text: str) -> Optional[re.Match[str]]:
    return re.search(pattern, text, re.MULTILINE)


def parse_wrk(text: str) -> Metrics:
    rps = _find(r"^Requests/sec:\s+([\d.]+)", text)
    if rps is None:
        raise BenchError(f"wrk printed no Requests/sec: {text.strip()[-200:]}")
    metrics: Metrics = {"conn_rps": float(rps.group(1)), "errors": 0.0}
    done = _find(r"^\s*(\d+) requests in ", text)
    if done is not None:
        metrics["requests"] = float(done.group(1))
    p99 = _find(r"^\s+99%\s+(\S+)", text)
    if p99 is not None:
        metrics["p99_ms"] = _duration_ms(p99.group(1))
    errors = _find(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", text)
    if errors is not None:
        metrics["errors"] = float(sum(int(n) for n in errors.groups()))
    non2xx = _find(r"Non-2xx or 3xx responses: (\d+)", text)
    if non2xx is not None:
        metrics["errors"] += float(non2xx.group(1))
    return metrics
