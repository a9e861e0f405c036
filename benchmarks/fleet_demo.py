"""``make fleet``: a fleet fed by etcd, end to end, on loopback.

A 3-member etcd cluster (Debian's etcd-server), local echo backends, three
rawproxy instances fed by the cluster, and the probe through each.  Then,
each shown converging on every instance: a config change (a new port and a
new backend), the etcd leader killed and a change made afterwards, a
machine registering itself with ``python3 -m rawproxy.register`` and
leaving when its lease runs out.  Everything started is stopped by PID
and its files removed.  Needs nothing but the repository and etcd.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable, Sequence

from benchmarks.etcdlocal import ETCD, EtcdCluster, stable_ports
from benchmarks.fleetprocs import REPO, Instance, start_fleet, stop_fleet
from probe.echo import EchoServer

INSTANCES = 3
TTL_S = 3
PREFIX = "/rawproxy/"


def say(text: str) -> None:
    print(text, flush=True)


def converge(instances: Sequence[Instance], done: Callable[[Instance], bool],
             timeout_s: float = 30.0) -> float:
    """Seconds until ``done`` holds for every instance (polled)."""
    start = time.monotonic()
    pending = list(instances)
    while pending:
        pending = [i for i in pending if not done(i)]
        if pending and time.monotonic() - start > timeout_s:
            raise RuntimeError(f"instances {[i.index for i in pending]} did not converge")
        if pending:
            time.sleep(0.005)
    return time.monotonic() - start


def probe_each(instances: Sequence[Instance], config: dict[str, object], work: Path) -> None:
    path = work / "probe-config.json"
    path.write_text(json.dumps(config))
    for instance in instances:
        result = subprocess.run(
            [sys.executable, "-m", "probe", "--config", str(path), "--host", instance.listen_host,
             "--connections", "2", "--frames", "4", "--max-frame", "65536"],
            cwd=str(REPO), capture_output=True, text=True, timeout=120)
        verdict = "PASS" if result.returncode == 0 else "FAIL"
        say(f"   probe via {instance.listen_host}: {verdict}")
        if result.returncode != 0:
            say(result.stdout + result.stderr)
            raise RuntimeError("the probe failed")


def app(ports: list[int], backends: list[int]) -> dict[str, object]:
    return {"Apps": [{"Name": "demo", "Ports": ports,
                      "Targets": [f"127.0.0.1:{port}" for port in backends]}]}


def put_config(etcd: EtcdCluster, config: dict[str, object]) -> int:
    return etcd.put(PREFIX + "config", config)


def demo(work: Path) -> None:
    etcd = EtcdCluster(work / "etcd", size=3).start()
    echo = EchoServer()
    instances: list[Instance] = []
    try:
        say(f"== etcd: 3 members, {etcd.endpoints}; leader {etcd.leader().name}")
        backends = [echo.add().port for _ in range(3)]
        ports = stable_ports(3)
        config = app(ports[:2], backends[:2])
        revision = put_config(etcd, config)
        say(f"== config put at revision {revision}: app demo, ports {ports[:2]}, "
            f"targets {backends[:2]}")
        instances = start_fleet(INSTANCES, etcd.endpoints)
        say(f"== {INSTANCES} rawproxy instances on "
            + ", ".join(i.listen_host for i in instances))
        probe_each(instances, config, work)
        change(etcd, instances, work, app(ports, backends), ports[2])
        kill_leader(etcd, instances, app(ports[1:], backends), ports[0])
        lease(etcd, instances, echo.add().port)
    finally:
        stop_fleet(instances)
        echo.close()
        etcd.close()
    say("== stopped everything")


def change(etcd: EtcdCluster, instances: list[Instance], work: Path,
           config: dict[str, object], port: int) -> None:
    revision = put_config(etcd, config)
    say(f"== change: a third port {port} and a third target (revision {revision})")
    took = converge(instances, lambda i: i.revision() >= revision)
    say(f"   every instance at revision {revision} after {took * 1000:.0f} ms")
    took = converge(instances, lambda i: i.accepts(port))
    say(f"   port {port} accepting on every instance after {took * 1000:.0f} ms")
    probe_each(instances, config, work)


def kill_leader(etcd: EtcdCluster, instances: list[Instance],
                config: dict[str, object], removed_port: int) -> None:
    leader = etcd.leader()
    leader.kill()
    say(f"== killed the etcd leader {leader.name} ({leader.url}) with SIGKILL")
    put_started = time.monotonic()
    revision = put_config(etcd, config)
    say(f"   then a change: port {removed_port} removed (revision {revision}; the put "
        f"took {time.monotonic() - put_started:.1f} s, while the members elected "
        f"{etcd.leader().name})")
    took = converge(instances, lambda i: i.revision() >= revision)
    moved = sum(1 for i in instances if i.find(rf"etcd: lost {leader.url}"))
    say(f"   every instance at revision {revision} after {took * 1000:.0f} ms; "
        f"{moved} of {len(instances)} had to leave {leader.name}")
    took = converge(instances, lambda i: not i.accepts(removed_port))
    say(f"   port {removed_port} closed on every instance after {took * 1000:.0f} ms")
    etcd.restart(leader)
    say(f"   {leader.name} restarted")


def lease(etcd: EtcdCluster, instances: list[Instance], machine_port: int) -> None:
    target = f"127.0.0.1:{machine_port}"
    register = subprocess.Popen(
        [sys.executable, "-m", "rawproxy.register", "--etcd", etcd.endpoints,
         "--app", "demo", "--target", target, "--id", "machine-1", "--ttl", str(TTL_S)],
        cwd=str(REPO), stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL)
    try:
        say(f"== a machine registers {target} with a {TTL_S}s lease (rawproxy.register)")
        took = converge(instances, lambda i: target in i.get("/config").decode())
        say(f"   listed by every instance after {took * 1000:.0f} ms "
            "(the helper's start included)")
        os.kill(register.pid, signal.SIGKILL)
        register.wait(10)
        say("   its keep-alive stopped (SIGKILL): the lease runs out")
        took = converge(instances, lambda i: target not in i.get("/config").decode())
        say(f"   gone from every instance after {took:.1f} s (TTL {TTL_S}s)")
    finally:
        if register.poll() is None:
            os.kill(register.pid, signal.SIGKILL)
            register.wait(10)


def main() -> int:
    if ETCD is None:
        print("make fleet needs etcd: apt-get install etcd-server", file=sys.stderr)
        return 1
    work = Path(tempfile.mkdtemp(prefix="rawproxy-fleet-"))
    try:
        demo(work)
    except (RuntimeError, AssertionError) as exc:
        print(f"fleet demo failed: {exc}", file=sys.stderr)
        return 1
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
