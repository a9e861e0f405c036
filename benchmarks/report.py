"""Medians over rounds, ratios to HAProxy and to direct, the table and the JSON.

A :class:`Record` is one measurement (round, workload, peer).  ``problem``
marks a measurement that produced numbers that must not look good (socket
errors under churn, a failed integrity check, fewer idle connections held
than asked); ``error`` is a measurement that produced nothing.  In the
table a marked median ends in ``!`` and a failed integrity check reads
``FAIL``; the notes under the table say why.
"""

from __future__ import annotations

import json
import statistics
from pathlib import Path
from typing import Any, Optional, Sequence


class Record:
    __slots__ = ("round", "workload", "peer", "metrics", "problem", "error", "proxy")

    def __init__(self, round_no: int, workload: str, peer: str,
                 metrics: Optional[dict[str, float]] = None,
                 problem: Optional[str] = None, error: Optional[str] = None,
                 proxy: Optional[dict[str, Any]] = None) -> None:
        self.round = round_no
        self.workload = workload
        self.peer = peer
        self.metrics = metrics or {}
        self.problem = problem
        self.error = error
        self.proxy = proxy or {}

    def as_json(self) -> dict[str, Any]:
        return {"round": self.round, "workload": self.workload, "peer": self.peer,
                "metrics": self.metrics, "problem": self.problem, "error": self.error,
                "proxy": self.proxy}


class Row:
    """One line of the table: a metric of a workload."""

    def __init__(self, label: str, workload: str, metric: str,
                 higher_is_better: Optional[bool]) -> None:
        self.label = label
        self.workload = workload
        self.metric = metric
        # None: not a performance figure (counts), so no ratio row.
        self.higher_is_better = higher_is_better


ROWS: tuple[Row, ...] = (
    Row("bulk1 Gbit/s", "bulk1", "gbps", True),
    Row("bulk4 Gbit/s", "bulk4", "gbps", True),
    Row("bulk1 CPU s/GB", "bulk1", "cpu_s_per_gb", False),
    Row("redis ping req/s", "reqresp", "ping_rps", True),
    Row("redis set req/s", "reqresp", "set_rps", True),
    Row("redis get req/s", "reqresp", "get_rps", True),
    Row("redis ping p50 ms", "reqresp", "ping_p50_ms", False),
    Row("redis CPU us/req", "reqresp", "cpu_us_per_req", False),
    Row("redis CPU % user", "reqresp", "cpu_user_pct", None),
    Row("churn conn/s", "churn", "conn_rps", True),
    Row("churn p99 ms", "churn", "p99_ms", False),
    Row("churn errors", "churn", "errors", None),
    Row("churn CPU us/conn", "churn", "cpu_us_per_conn", False),
    Row("churn CPU % user", "churn", "cpu_user_pct", None),
    Row("idle conns held", "idle", "held", None),
    Row("idle KiB/conn", "idle", "kib_per_conn", False),
    Row("idle echo ms", "idle", "echo_ms", False),
    Row("integrity MB/s", "integrity", "mb_s", True),
)


def _format(value: float) -> str:
    magnitude = abs(value)
    if magnitude >= 10_000:
        return f"{value / 1000:.1f}k"
    if magnitude >= 100:
        return f"{value:.0f}"
    if magnitude >= 10:
        return f"{value:.1f}"
    return f"{value:.2f}"


class Summary:
    """Medians per (peer, workload, metric), with the marks that go with them."""

    def __init__(self, records: Sequence[Record], peers: Sequence[str]) -> None:
        self.peers = list(peers)
        self.medians: dict[str, dict[str, dict[str, float]]] = {}
        self.marked: set[tuple[str, str]] = set()
        self.failed: set[tuple[str, str]] = set()
        self.measured: set[tuple[str, str]] = set()
        values: dict[tuple[str, str, str], list[float]] = {}
        for record in records:
            key = (record.peer, record.workload)
            if record.error is not None:
                self.marked.add(key)
                continue
            self.measured.add(key)
            if record.problem is not None:
                self.marked.add(key)
                if record.problem.startswith("FAIL"):
                    self.failed.add(key)
            for metric, value in record.metrics.items():
                values.setdefault((record.peer, record.workload, metric), []).append(value)
        for (peer, workload, metric), samples in values.items():
            self.medians.setdefault(peer, {}).setdefault(workload, {})[metric] = \
                statistics.median(samples)

    def value(self, peer: str, row: Row) -> Optional[float]:
        return self.medians.get(peer, {}).get(row.workload, {}).get(row.metric)

    def ratio(self, peer: str, row: Row, reference: str) -> Optional[float]:
        mine = self.value(peer, row)
        theirs = self.value(reference, row)
        if mine is None or not theirs:
            return None
        return mine / theirs

    def cell(self, peer: str, row: Row) -> str:
        key = (peer, row.workload)
        if key in self.failed and row.workload == "integrity":
            return "FAIL"
        value = self.value(peer, row)
        if value is None:
            return "err" if key in self.marked else "-"
        return _format(value) + ("!" if key in self.marked else "")

    def as_json(self) -> dict[str, Any]:
        ratios: dict[str, dict[str, dict[str, Optional[float]]]] = {}
        for peer in self.peers:
            for row in ROWS:
                if row.higher_is_better is None:
                    continue
                ratios.setdefault(peer, {})[row.label] = {
                    "haproxy": self.ratio(peer, row, "haproxy"),
                    "direct": self.ratio(peer, row, "direct")}
        return {"medians": self.medians, "ratios": ratios,
                "marked": sorted(f"{p}/{w}" for p, w in self.marked),
                "failed": sorted(f"{p}/{w}" for p, w in self.failed)}


def _grid(header: Sequence[str], lines: Sequence[Sequence[str]]) -> list[str]:
    widths = [max(len(line[i]) for line in [header, *lines]) for i in range(len(header))]
    def fmt(line: Sequence[str]) -> str:
        first = line[0].ljust(widths[0])
        rest = "  ".join(cell.rjust(width) for cell, width in zip(line[1:], widths[1:]))
        return f"{first}  {rest}".rstrip()
    return [fmt(header), *(fmt(line) for line in lines)]


def render_table(summary: Summary, workloads: Sequence[str]) -> str:
    rows = [row for row in ROWS if row.workload in workloads]
    header = ["median", *summary.peers]
    out = _grid(header, [[row.label, *(summary.cell(p, row) for p in summary.peers)]
                         for row in rows])
    ratio_lines = []
    for row in rows:
        if row.higher_is_better is None:
            continue
        cells = []
        for peer in summary.peers:
            to_haproxy = summary.ratio(peer, row, "haproxy")
            to_direct = summary.ratio(peer, row, "direct")
            cells.append(f"{_ratio(to_haproxy)}/{_ratio(to_direct)}")
        ratio_lines.append([row.label, *cells])
    if ratio_lines:
        out.append("")
        out.extend(_grid(["x haproxy / x direct", *summary.peers], ratio_lines))
    return "\n".join(out)


def _ratio(value: Optional[float]) -> str:
    return "-" if value is None else f"{value:.2f}"


def write_json(path: Path, document: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(document, indent=1, sort_keys=False) + "\n")
