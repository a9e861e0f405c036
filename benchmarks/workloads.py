"""The workloads: which backend each needs, which tool drives it, one measurement.

``measure(name, port, settings, rss_kib)`` runs one bounded measurement
against ``port`` (the proxy's, or the backend's for ``direct``) and returns
``(metrics, problem)``; see :mod:`benchmarks.report` for what a problem is.
"""

from __future__ import annotations

from typing import Callable, Optional

from . import loadgen, pyclients
from .backends import TINY_FILE
from .procs import BenchError

Outcome = tuple[dict[str, float], Optional[str]]

WORKLOADS = ("bulk1", "bulk4", "reqresp", "churn", "idle", "integrity")
BACKEND = {"bulk1": "iperf3", "bulk4": "iperf3", "reqresp": "redis", "churn": "http",
           "idle": "echo", "integrity": "echo"}
TOOL = {"bulk1": "iperf3", "bulk4": "iperf3", "reqresp": "redis-benchmark", "churn": "wrk",
        "idle": "", "integrity": ""}

REDIS_CLIENTS = 50
WRK_CONNECTIONS = 50
REDIS_TESTS_RUN = 4  # -t ping,set,get runs PING_INLINE, PING_MBULK, SET, GET


class Settings:
    def __init__(self, seconds: float, idle_connections: int, idle_timeout_s: float,
                 integrity_bytes: int) -> None:
        self.seconds = seconds
        self.idle_connections = idle_connections
        self.idle_timeout_s = idle_timeout_s
        self.integrity_bytes = integrity_bytes
        # redis-benchmark is bounded by request count, not time: size -n
        # from the last rate seen for each peer so a run lasts ~seconds.
        self.redis_rps_estimate: dict[str, float] = {}

    def redis_requests(self, peer: str) -> int:
        rps = self.redis_rps_estimate.get(peer, 30_000.0)
        return int(min(2_000_000, max(5_000, rps * self.seconds / REDIS_TESTS_RUN)))


def cpu_metrics(name: str, metrics: dict[str, float], user_s: float, system_s: float,
                wall_s: float) -> dict[str, float]:
    """The proxy's CPU over one measurement, per unit of the workload's work.

    ``cpu_pct`` is of one core and ``cpu_user_pct`` the share of the CPU
    spent in user space (the interpreter, for the Python proxies; the rest
    is the kernel's socket work); per unit: microseconds per redis request
    (every test of the run), per churned connection, and CPU seconds per GB
    relayed in bulk.  A unit whose count is missing is left out.
    """
    cpu_s = user_s + system_s
    out = {"cpu_s": cpu_s}
    if cpu_s > 0:
        out["cpu_user_pct"] = 100.0 * user_s / cpu_s
    if wall_s > 0:
        out["cpu_pct"] = 100.0 * cpu_s / wall_s
    if name == "reqresp" and metrics.get("requests_per_test"):
        out["cpu_us_per_req"] = cpu_s * 1e6 / (metrics["requests_per_test"] * REDIS_TESTS_RUN)
    elif name == "churn" and metrics.get("requests"):
        out["cpu_us_per_conn"] = cpu_s * 1e6 / metrics["requests"]
    elif name in ("bulk1", "bulk4") and metrics.get("bytes"):
        out["cpu_s_per_gb"] = cpu_s / (metrics["bytes"] / 1e9)
    return out


def measure(name: str, port: int, peer: str, settings: Settings,
            rss_kib: Optional[Callable[[], int]]) -> Outcome:
    if name in ("bulk1", "bulk4"):
        return loadgen.run_iperf3(port, 1 if name == "bulk1" else 4, settings.seconds), None
    if name == "reqresp":
        requests = settings.redis_requests(peer)
        metrics = loadgen.run_redis_benchmark(port, REDIS_CLIENTS, requests,
                                              seconds_limit=settings.seconds * 20 + 60)
        settings.redis_rps_estimate[peer] = min(
            metrics[k] for k in ("ping_rps", "set_rps", "get_rps") if k in metrics)
        metrics["requests_per_test"] = float(requests)
        return metrics, None
    if name == "churn":
        metrics = loadgen.run_wrk(port, WRK_CONNECTIONS, settings.seconds, TINY_FILE)
        errors = int(metrics.get("errors", 0))
        return metrics, (f"{errors} socket errors / non-2xx responses" if errors else None)
    if name == "idle":
        metrics, problem = pyclients.idle(port, settings.idle_connections, rss_kib,
                                          settings.idle_timeout_s)
        return metrics, problem
    if name == "integrity":
        return pyclients.integrity(port, settings.integrity_bytes, timeout_s=120.0)
    raise BenchError(f"unknown workload {name}")
