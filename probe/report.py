"""The report: what was checked, as a compact text table or as JSON.

``Report`` holds the results of one run: phases of port checks, in local
mode the port mapping, the spread of connections over the targets and the
checks of the whole run (isolation, proxy shutdown).  ``render`` gives the
text a person reads, ``to_json`` the same facts for a machine; both say
PASS only when every port check and every whole-run check passed.
"""

from __future__ import annotations

from typing import Any, Mapping, NamedTuple, Sequence

from .checks import PortResult, percentile

_MIB = float(1 << 20)


class Phase(NamedTuple):
    title: str
    results: Sequence[PortResult]


class SpreadRow(NamedTuple):
    app: str
    target: str            # as in the config
    local: str             # what stands in for it
    counts: Sequence[int]  # connections served, per phase
    state: str


class Check(NamedTuple):
    name: str
    passed: bool
    detail: str


class Report(NamedTuple):
    host: str
    phases: Sequence[Phase]
    elapsed_s: float
    port_map: Mapping[int, int] = {}
    spread: Sequence[SpreadRow] = ()
    checks: Sequence[Check] = ()
    load: bool = False     # load mode: connections/s is worth a column

    @property
    def results(self) -> list[PortResult]:
        return [r for phase in self.phases for r in phase.results]

    @property
    def ok(self) -> bool:
        results = self.results
        return bool(results) and all(r.passed for r in results) and all(
            c.passed for c in self.checks)


def _stats(result: PortResult) -> dict[str, Any]:
    conns = result.conns
    latencies = sorted(x for c in conns for x in c.latencies_s)
    connects = sorted(c.connect_s for c in conns if c.connect_s)
    verified = sum(c.bytes_verified for c in conns)
    elapsed = max(result.elapsed_s, 1e-9)
    return {
        "app": result.target.app, "port": result.target.port,
        "probe_port": result.target.probe_port, "passed": result.passed,
        "reason": result.reason, "connections": len(conns),
        "failed_connections": sum(c.defect is not None for c in conns),
        "frames": len(latencies), "bytes_verified": verified,
        "elapsed_s": round(result.elapsed_s, 4),
        "connections_per_s": round(len(conns) / elapsed, 1),
        "mib_per_s": round(verified / _MIB / elapsed, 2),
        "connect_ms": {"p50": _ms(percentile(connects, 0.5)), "max": _ms(max(connects,
                                                                           default=0.0))},
        "latency_ms": {k: _ms(percentile(latencies, f)) for k, f in
                       (("p50", 0.5), ("p90", 0.9), ("p99", 0.99), ("max", 1.0))},
    }


def _ms(seconds: float) -> float:
    return round(seconds * 1000, 3)


def _summary(report: Report) -> str:
    results = report.results
    failed = sum(not r.passed for r in results) + sum(not c.passed for c in report.checks)
    conns = sum(len(r.conns) for r in results)
    verified = sum(c.bytes_verified for r in results for c in r.conns)
    checks = len(results) + len(report.checks)
    verdict = (f"PASS: all {checks} checks passed" if report.ok
               else f"FAIL: {failed} of {checks} checks failed")
    return (f"{verdict}; {conns} connections, {verified / _MIB:.1f} MiB verified through "
            f"{report.host} in {report.elapsed_s:.1f}s")


def to_json(report: Report) -> dict[str, Any]:
    return {
        "ok": report.ok, "summary": _summary(report), "host": report.host,
        "elapsed_s": round(report.elapsed_s, 3),
        "port_map": {str(k): v for k, v in report.port_map.items()},
        "phases": [{"title": p.title, "ports": [_stats(r) for r in p.results]}
                   for p in report.phases],
        "spread": [{**row._asdict(), "counts": list(row.counts)} for row in report.spread],
        "checks": [c._asdict() for c in report.checks],
    }


def _fmt_ms(ms: float) -> str:
    if ms >= 10_000:
        return f"{ms / 1000:.1f}s"
    return f"{ms:.0f}ms" if ms >= 100 else f"{ms:.1f}ms"


def _table(rows: Sequence[Sequence[str]], right: str) -> list[str]:
    """Columns padded to fit; columns marked 'r' in ``right`` are right-aligned."""
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    return ["  ".join(cell.rjust(w) if right[i] == "r" else cell.ljust(w)
                      for i, (cell, w) in enumerate(zip(row, widths))).rstrip()
            for row in rows]


def _port_rows(phase: Phase, load: bool) -> list[list[str]]:
    rows = [["APP", "PORT", "RESULT", "CONNS", "CONN/S", "VERIFIED", "MiB/s", "CONNECT",
             "RTT p50", "p90", "p99", "max", "REASON"]]
    for result in phase.results:
        s = _stats(result)
        port = str(s["port"]) if s["port"] == s["probe_port"] else \
            f"{s['port']}->{s['probe_port']}"
        lat = s["latency_ms"]
        rows.append([s["app"], port, "PASS" if s["passed"] else "FAIL",
                     str(s["connections"]), f"{s['connections_per_s']:.0f}",
                     f"{s['bytes_verified'] / _MIB:.2f} MiB", f"{s['mib_per_s']:.1f}",
                     _fmt_ms(s["connect_ms"]["p50"]), _fmt_ms(lat["p50"]),
                     _fmt_ms(lat["p90"]), _fmt_ms(lat["p99"]), _fmt_ms(lat["max"]),
                     s["reason"]])
    return rows if load else [row[:4] + row[5:] for row in rows]


def render(report: Report) -> str:
    lines: list[str] = []
    for phase in report.phases:
        align = "llrrrrrrrrrrl" if report.load else "llrrrrrrrrrl"
        lines += [phase.title, *_table(_port_rows(phase, report.load), align), ""]
    if report.spread:
        counts = len(report.spread[0].counts)
        head = ["APP", "TARGET", "STANDS IN", *[f"PHASE {i + 1}" for i in range(counts)],
                "STATE"]
        rows = [head] + [[r.app, r.target, r.local, *map(str, r.counts), r.state]
                         for r in report.spread]
        lines += ["connections served per target:",
                  *_table(rows, "lll" + "r" * counts + "l"), ""]
    lines += [f"{'PASS' if c.passed else 'FAIL'} {c.name}: {c.detail}" for c in report.checks]
    lines.append(_summary(report))
    return "\n".join(lines)
