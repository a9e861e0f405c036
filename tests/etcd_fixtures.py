"""Real etcd for tests: clusters from benchmarks.etcdlocal, and proxies fed by them.

:class:`~benchmarks.etcdlocal.EtcdCluster` starts one member or three on
free loopback ports with temporary data directories and stops them by PID
(port clashes: the cluster starts again elsewhere).  :class:`FleetFactory`
starts ``rawproxy --etcd`` processes with an admin endpoint on a free port
and stops them by PID; :func:`serve` and :func:`reconfigure` put a config on
fresh ports and retry when a port was taken meanwhile by a parallel test.
Nothing is mocked.
"""

from __future__ import annotations

import http.client
import json
import os
import signal
import sys
from pathlib import Path
from typing import Any, Callable

import pytest

from benchmarks.etcdlocal import (ETCD, OPENSSL, EtcdCluster, Member, TLSFiles,
                                  make_tls)
from tests.support import HOST, LAUNCHER, ProxyProcess, free_ports, wait_until

__all__ = ["ETCD", "OPENSSL", "EtcdCluster", "FleetFactory", "FleetProxy", "Member",
           "TLSFiles", "make_tls", "needs_etcd", "reconfigure", "register_argv", "serve"]

needs_etcd = pytest.mark.skipif(
    ETCD is None and os.environ.get("CI") != "true",
    reason="etcd is not installed (apt-get install etcd-server)")


# -- a proxy fed by etcd --------------------------------------------------------

def admin_get(port: int, path: str, timeout_s: float = 5.0) -> tuple[int, bytes]:
    conn = http.client.HTTPConnection(HOST, port, timeout=timeout_s)
    try:
        conn.request("GET", path)
        response = conn.getresponse()
        return response.status, response.read()
    finally:
        conn.close()


class FleetProxy:
    """``rawproxy --etcd ...`` with an admin endpoint, for its /config and /metrics."""

    def __init__(self, process: ProxyProcess, admin_port: int) -> None:
        self.process = process
        self.admin_port = admin_port

    def config(self) -> dict[str, Any]:
        status, body = admin_get(self.admin_port, "/config")
        assert status == 200, body
        view = json.loads(body)
        assert isinstance(view, dict)
        return view

    def revision(self) -> int:
        """The revision served (under --workers: by every worker)."""
        view = self.config()
        views = view["Workers"] if "Workers" in view else [view]
        return min(int(v["Revision"]) if v else -1 for v in views)

    def metric(self, name: str) -> float:
        _status, body = admin_get(self.admin_port, "/metrics")
        for line in body.decode().splitlines():
            if line.startswith(name + " "):
                return float(line.split()[1])
        raise AssertionError(f"no metric {name}")

    def targets(self, app: str) -> list[str]:
        for view in self.config()["Apps"]:
            if view["Name"] == app:
                return [t if isinstance(t, str) else t["Address"] for t in view["Targets"]]
        raise AssertionError(f"no app {app}")

    def wait_revision(self, revision: int, timeout_s: float = 15.0) -> None:
        wait_until(lambda: self.revision() >= revision, timeout_s=timeout_s,
                   message=f"the proxy at etcd revision {revision}")


def fleet_argv(endpoints: str, admin_port: int, *extra: str) -> list[str]:
    return [sys.executable, str(LAUNCHER), "--etcd", endpoints, "--listen-host", HOST,
            "--admin", f"{HOST}:{admin_port}", "--log-level", "debug", *extra]


class FleetFactory:
    """Starts fleet proxies; :meth:`close` stops each one by PID."""

    def __init__(self, tmp_path: Path) -> None:
        self.tmp_path = tmp_path
        self.started: list[ProxyProcess] = []

    def start(self, endpoints: str, *extra: str) -> FleetProxy:
        """A ready proxy; an admin port taken meanwhile is tried again."""
        for _attempt in range(5):
            admin_port = free_ports(1)[0]
            process = ProxyProcess(fleet_argv(endpoints, admin_port, *extra),
                                   self.tmp_path / "unused.json")
            self.started.append(process)
            if process.wait_ready(20.0):
                return FleetProxy(process, admin_port)
            if not any("already in use" in line for line in process.lines):
                raise AssertionError("proxy exited:\n" + "\n".join(process.lines))
        raise AssertionError("no free port for the proxy")

    def close(self) -> None:
        for process in self.started:
            if process.proc.poll() is None:
                os.kill(process.pid, signal.SIGCONT)  # a test may have stopped it
            process.stop()


def serve(cluster: EtcdCluster, fleet: FleetFactory,
          make_apps: Callable[[list[int]], list[dict[str, Any]]], n_ports: int,
          *extra: str) -> tuple[FleetProxy, list[int]]:
    """Put a config on ``n_ports`` fresh ports and start a proxy on it; a
    port taken meanwhile by another test: new ports, new proxy."""
    for _attempt in range(5):
        ports = free_ports(n_ports)
        revision = cluster.put_config(make_apps(ports))
        try:
            proxy = fleet.start(cluster.endpoints, *extra)
        except AssertionError:
            if any("already in use" in line for p in fleet.started for line in p.lines):
                continue
            raise
        proxy.wait_revision(revision)
        return proxy, ports
    raise AssertionError("no free ports for the apps")


def reconfigure(cluster: EtcdCluster, proxy: FleetProxy,
                make_apps: Callable[[list[int]], list[dict[str, Any]]],
                n_ports: int) -> tuple[int, list[int]]:
    """Put a config on fresh ports and wait until the proxy serves it; a
    reload rejected because a port was taken meanwhile is tried again."""
    for _attempt in range(5):
        ports = free_ports(n_ports)
        revision = cluster.put_config(make_apps(ports))
        pattern = rf"reload \(etcd revision {revision}\) rejected.*already in use"
        wait_until(lambda: proxy.revision() >= revision
                   or proxy.process.count_lines(pattern) > 0,
                   timeout_s=15.0, message=f"etcd revision {revision} applied or rejected")
        if proxy.revision() >= revision:
            return revision, ports
    raise AssertionError("no free ports for the apps")


def register_argv(endpoints: str, app: str, target: str, ident: str, ttl_s: int,
                  *extra: str) -> list[str]:
    return [sys.executable, "-m", "rawproxy.register", "--etcd", endpoints, "--app", app,
            "--target", target, "--id", ident, "--ttl", str(ttl_s), *extra]
