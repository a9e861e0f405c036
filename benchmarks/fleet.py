"""``make bench-fleet``: how fast a fleet fed by etcd converges, and what an
idle watcher costs.

For each fleet size N (default 10, 25, 50): N ``rawproxy --etcd`` instances
on loopback (:mod:`benchmarks.fleetprocs`, each on its own 127.0.0.x, the
endpoint list rotated so the watches spread over the members), fed by a
3-member etcd cluster (:mod:`benchmarks.etcdlocal`).  Then:

* idle: each instance's CPU (utime + stime from /proc) over ``--idle``
  seconds of doing nothing but watching, as a share of one core, and its RSS;
  the etcd members' CPU over the same window;
* ``--puts`` times: a config that moves the app's second port to a new one
  is put, and the time from the put's start until *every* instance logged
  "applied" is taken from their logs (their own clock, millisecond stamps),
  with nothing asking the instances anything meanwhile;
* ``--puts`` times more, the same, but the time until every instance's
  ``/config`` has the revision and until every instance accepts on the new
  port is polled: round after round over the instances not there yet, all
  at once (one selector).  These include up to one round of polling, and
  the polling's own load on the instances.

Per size and way, the table gives min / median / max over the puts of that
"every instance" time; the etcd CPU per watcher per put (the members' CPU
during the puts, less their idle rate, over puts x N); and how long the
first polling round took (the polled columns' resolution).  Everything
shares this machine's cores (``nproc``): N edges on N hosts would each have
theirs.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Optional, Sequence

from benchmarks.etcdlocal import ETCD, EtcdCluster, stable_ports
from benchmarks.fleetprocs import Instance, poll_round, start_fleet, stop_fleet
from probe.echo import EchoServer

PREFIX = "/rawproxy/"
TIMEOUT_S = 60.0
WAYS = ("applied", "config", "connect")


def config(ports: list[int], backend: int) -> dict[str, object]:
    return {"Apps": [{"Name": "bench", "Ports": ports, "Targets": [f"127.0.0.1:{backend}"]}]}


def member_cpu(etcd: EtcdCluster) -> float:
    total = 0.0
    for member in etcd.members:
        assert member.proc is not None
        with open(f"/proc/{member.proc.pid}/stat") as stat:
            fields = stat.read().rsplit(")", 1)[1].split()
        total += int(fields[11]) + int(fields[12])
    return total / 100.0  # USER_HZ is 100 on Linux


def idle(instances: Sequence[Instance], etcd: EtcdCluster, seconds: float) -> dict[str, float]:
    time.sleep(2.0)  # let start-up settle
    before = [i.cpu_seconds() for i in instances]
    etcd_before = member_cpu(etcd)
    time.sleep(seconds)
    shares = [(i.cpu_seconds() - b) / seconds * 100 for i, b in zip(instances, before)]
    rss = [i.rss_bytes() / 2**20 for i in instances]
    return {"cpu_pct_mean": statistics.mean(shares), "cpu_pct_max": max(shares),
            "rss_mib_mean": statistics.mean(rss), "rss_mib_max": max(rss),
            "etcd_cpu_pct": (member_cpu(etcd) - etcd_before) / seconds * 100}


def quiet_put(etcd: EtcdCluster, instances: Sequence[Instance], ports: list[int],
              backend: int) -> float:
    """Seconds from the put until the last instance logged applying it;
    nothing asks the instances anything meanwhile."""
    started_wall = time.time()
    revision = etcd.put(PREFIX + "config", config(ports, backend))
    return max(_applied_at(i, revision) for i in instances) - started_wall


def polled_put(etcd: EtcdCluster, instances: Sequence[Instance], ports: list[int],
               backend: int) -> dict[str, float]:
    """Seconds from the put until every instance's /config has its revision,
    and until every instance accepts on the new port (polled)."""
    started = time.monotonic()
    revision = etcd.put(PREFIX + "config", config(ports, backend))
    seen_rev: dict[int, float] = {}
    seen_port: dict[int, float] = {}
    rounds: list[float] = []  # how long each polling round took
    while len(seen_rev) < len(instances) or len(seen_port) < len(instances):
        round_started = time.monotonic()
        if round_started - started > TIMEOUT_S:
            raise RuntimeError(f"revision {revision} not served everywhere in {TIMEOUT_S}s")
        pending = [i for i in instances if i.index not in seen_rev or i.index not in seen_port]
        accepting, current = poll_round(pending, ports[-1], revision)
        now = time.monotonic() - started
        for index in accepting:
            seen_port.setdefault(index, now)
        for index in current:
            seen_rev.setdefault(index, now)
        rounds.append(time.monotonic() - round_started)
        time.sleep(0.005)  # polling must not starve the instances it waits for
    return {"config": max(seen_rev.values()), "connect": max(seen_port.values()),
            "round": rounds[0]}


def _applied_at(instance: Instance, revision: int) -> float:
    """When the instance logged applying ``revision`` (its log reaches us a
    little after its /config does)."""
    deadline = time.monotonic() + 10.0
    while True:
        stamp = instance.logged_at(rf"etcd revision {revision} applied")
        if stamp is not None:
            return stamp
        if time.monotonic() > deadline:
            raise RuntimeError(f"instance {instance.index} did not log revision {revision}")
        time.sleep(0.01)


@dataclass
class Row:
    instances: int
    puts: int
    idle: dict[str, float]
    etcd_cpu_ms_per_watcher_put: float
    polling_round_s: float  # the first round over every instance, median over the puts
    ways: dict[str, dict[str, float]] = field(default_factory=dict)  # way -> min/median/max


def run_size(etcd: EtcdCluster, count: int, puts: int, idle_s: float, backend: int) -> Row:
    base = stable_ports(1)
    etcd.put(PREFIX + "config", config(base, backend))
    instances = start_fleet(count, etcd.endpoints)
    try:
        idle_row = idle(instances, etcd, idle_s)
        applied: list[float] = []
        cpu_before, started = member_cpu(etcd), time.monotonic()
        for _ in range(puts):
            applied.append(quiet_put(etcd, instances, base + stable_ports(1), backend))
            time.sleep(0.5)
        # Less what etcd spends anyway (heartbeats): the puts' own cost.
        baseline_s = idle_row["etcd_cpu_pct"] / 100 * (time.monotonic() - started)
        etcd_ms = max(0.0, member_cpu(etcd) - cpu_before - baseline_s) / (puts * count) * 1000
        samples = [polled_put(etcd, instances, base + stable_ports(1), backend)
                   for _ in range(puts)]
    finally:
        stop_fleet(instances)
    for sample, seconds in zip(samples, applied):
        sample["applied"] = seconds
    row = Row(count, puts, idle_row, etcd_ms, statistics.median(s["round"] for s in samples))
    for way in WAYS:
        values = sorted(sample[way] for sample in samples)
        row.ways[way] = {"min": values[0], "median": statistics.median(values),
                         "max": values[-1]}
    return row


def _ms(spread: dict[str, float]) -> str:
    return "-".join(f"{spread[k] * 1000:.0f}" for k in ("min", "median", "max"))


def render(rows: Sequence[Row]) -> str:
    lines = ["| instances | applied (log), ms | /config revision, ms | new port accepts, ms "
             "| idle CPU per instance, % of a core (mean / max) | RSS per instance, MiB "
             "| etcd CPU while idle, % of a core | etcd CPU per watcher per put, ms "
             "| polling round, ms |",
             "|---|---|---|---|---|---|---|---|---|"]
    for row in rows:
        idle_row = row.idle
        lines.append(
            f"| {row.instances} | {_ms(row.ways['applied'])} | {_ms(row.ways['config'])} "
            f"| {_ms(row.ways['connect'])} | {idle_row['cpu_pct_mean']:.3f} / "
            f"{idle_row['cpu_pct_max']:.3f} | {idle_row['rss_mib_mean']:.1f} "
            f"| {idle_row['etcd_cpu_pct']:.2f} | {row.etcd_cpu_ms_per_watcher_put:.2f} "
            f"| {row.polling_round_s * 1000:.0f} |")
    return "\n".join(lines)


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="benchmarks.fleet", description=__doc__.split("\n")[0])
    parser.add_argument("--sizes", default="10,25,50", help="fleet sizes (default: 10,25,50)")
    parser.add_argument("--puts", type=int, default=7, help="puts per size (default: 7)")
    parser.add_argument("--idle", type=float, default=30.0,
                        help="seconds of idle watching measured (default: 30; CPU time "
                             "comes in 10 ms ticks)")
    parser.add_argument("--json", metavar="PATH", help="also write the rows here")
    args = parser.parse_args(argv)
    if ETCD is None:
        print("bench-fleet needs etcd: apt-get install etcd-server", file=sys.stderr)
        return 1
    work = Path(tempfile.mkdtemp(prefix="rawproxy-bench-fleet-"))
    etcd = EtcdCluster(work / "etcd", size=3).start()
    echo = EchoServer()
    rows: list[Row] = []
    try:
        backend = echo.add().port
        for count in (int(size) for size in args.sizes.split(",")):
            rows.append(run_size(etcd, count, args.puts, args.idle, backend))
    finally:
        echo.close()
        etcd.close()
        shutil.rmtree(work, ignore_errors=True)
    print(f"{len(rows)} sizes, {args.puts} puts each, {args.idle:g}s idle; min-median-max "
          "over the puts of the time until every instance served the put")
    print(render(rows))
    if args.json:
        Path(args.json).write_text(json.dumps([asdict(row) for row in rows], indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
